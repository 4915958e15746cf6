"""Tests of orchestra.runtime."""
