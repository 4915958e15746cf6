"""The commands that look at an app's graph without running it: graph check, graph render."""

from __future__ import annotations

import click

from .database import json_option
from .graphs import check_graph, report_json, report_lines
from .loading import load_app
from .output import echo_json

__all__ = ("graph_group",)

_app_argument = click.argument("app_ref", metavar="APP")


@click.group(name="graph")
def graph_group() -> None:
    """Look at an app's graph without running it (APP: module:attribute or
    path/to/file.py:attribute, a compiled graph)."""


@graph_group.command(name="check")
@_app_argument
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="List at most this many cycles.",
)
@json_option
def check(app_ref: str, limit: int, as_json: bool) -> None:
    """List the graph's size, every cycle with its ways out, and the runtime loop guard.

    A cycle with no way out is already a compile error, so every cycle listed can end; the
    ones through agents end when the models' answers let them. Exits 0 when the app loads
    (its graph compiled), 1 when it cannot be imported.
    """
    report = check_graph(load_app(app_ref), app_ref, limit=limit)
    if as_json:
        echo_json(report_json(report))
        return
    for line in report_lines(report):
        click.echo(line)


@graph_group.command(name="render")
@_app_argument
def render(app_ref: str) -> None:
    """Print the graph as a Mermaid flowchart (solid: edges, dotted: routes and targets)."""
    click.echo(load_app(app_ref).render())
