"""The operator CLI: the ``orchestra`` command group, its global options, and its commands.

``orchestra demo`` runs a demo graph live. On a run database (``--db`` or ``ORCHESTRA_DB``):
``runs``, ``show``, ``checkpoints`` and ``pending`` read it; ``approve``, ``reject``,
``edit``, ``answer`` and ``resolve`` answer a run's open requests (checked with the run's
app; ``--resume`` resumes it after); ``resume``, ``abort``, ``stop-all``, ``budget``,
``fork`` and ``prune`` change it; ``db check`` looks after the file. ``graph check`` and
``graph render`` look at an app's graph (``module:attribute``) without running it.

Formatting is kept apart from printing: :mod:`.format`, :mod:`.records`, :mod:`.history`,
:mod:`.requests`, :mod:`.budgets` and :mod:`.graphs` turn events, outcomes, records,
checkpoints, requests, budgets, graph checks and errors into strings and rich renderables;
only :mod:`.output` and the commands (:mod:`.demo`, :mod:`.inspection`, :mod:`.answers`,
:mod:`.control`, :mod:`.maintenance`, :mod:`.structure`) print. click, rich and the
logging setup load here only; ``import orchestra`` never imports this package.

Exit codes: 0 when the command did its job (for ``demo``, ``resume`` and an answer with
``--resume``: the run completed), 1 when it did not or an error stopped it (one line on
stderr, no traceback unless ``--verbose``), 2 for a usage error.
"""

from __future__ import annotations

from pathlib import Path

import click

from .._version import __version__
from . import answers, control, demo, inspection, maintenance, structure
from .database import Settings
from .output import Group, logging_configured

__all__ = ("main",)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(
    __version__, "-V", "--version", prog_name="orchestra", message="%(prog)s %(version)s"
)
@click.option(
    "--db",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="ORCHESTRA_DB",
    show_envvar=True,
    help="The run database (SQLite) the run commands read and write.",
)
@click.option(
    "-v", "--verbose", is_flag=True, help="Log everything (debug up) to stderr; show tracebacks."
)
@click.pass_context
def main(ctx: click.Context, db: Path | None, verbose: bool) -> None:
    """Run multi-agent graphs, and watch, approve, resume and abort their runs."""
    ctx.obj = Settings(db=db, verbose=verbose)
    ctx.with_resource(logging_configured(verbose=verbose))


for _command in (
    demo.demo,
    inspection.runs,
    inspection.show,
    answers.pending,
    answers.approve,
    answers.reject,
    answers.edit,
    answers.answer,
    answers.resolve,
    control.resume,
    control.abort,
    control.stop_all,
    control.budget,
    inspection.checkpoints,
    maintenance.fork,
    maintenance.prune,
    maintenance.db_group,
    structure.graph_group,
):
    main.add_command(_command)
