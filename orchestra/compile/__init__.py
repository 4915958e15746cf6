"""Compile a graph definition into a frozen plan: validation (every problem at once), the
plan and its structure hash, the Mermaid drawing."""

from .compiler import DEFAULT_GUARD as DEFAULT_GUARD
from .compiler import compile_graph as compile_graph
from .compiler import price_problems as price_problems
from .plan import Plan as Plan

__all__ = ("DEFAULT_GUARD", "Plan", "compile_graph", "price_problems")
