"""Tests of orchestra.runtime.gateway."""
