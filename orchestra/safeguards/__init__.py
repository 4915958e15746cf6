"""Safeguards that run at every step's barrier: budgets (and, later, loop detection)."""

from .budgets import Budget as Budget

__all__ = ("Budget",)
