"""Loading an app from module:attribute or path.py:attribute, and the store resume binds."""

from __future__ import annotations

from pathlib import Path

import pytest
from apps import cli_app

from orchestra.cli.loading import AppLoadError, load_app, resume_store

pytestmark = pytest.mark.usefixtures("_isolated")


def test_load_app_from_module_and_file() -> None:
    """load_app finds module:attribute and path.py:attribute, and refuses non-apps."""
    assert load_app("apps.cli_app:app") is cli_app.app
    by_path = load_app(f"{Path(cli_app.__file__).resolve()}:app")
    assert by_path.structure_hash == cli_app.app.structure_hash
    with pytest.raises(AppLoadError, match="is a Graph, not a compiled graph"):
        load_app("apps.cli_app:graph")


def test_resume_store_keeps_the_apps_store_settings(tmp_path: Path) -> None:
    """Resume binds --db with the durability and lease of the app's own SQLite store."""
    store = resume_store(cli_app.app, tmp_path / "x.db")
    assert (store.path, store.lease_seconds, store.durability) == (
        str(tmp_path / "x.db"),
        cli_app.LEASE_SECONDS,
        "full",
    )
    assert resume_store(cli_app.changed, tmp_path / "x.db").lease_seconds == 30.0
