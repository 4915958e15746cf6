"""The public surface: what `import orchestra` offers, and what it costs."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
import types

import pytest

import orchestra
from orchestra import errors, events

PUBLIC_MODULES = (orchestra, errors, events)
HEAVY_MODULES = (
    "networkx",
    "httpx",
    "sqlite_utils",
    "click",
    "rich",
    # agents bring the model types (pydantic models costly to build): loaded on first use
    "orchestra.agents",
    "orchestra.models",
    "orchestra.tools",
)


def _ruff_sort_key(name: str) -> tuple[int, list[tuple[int, int | str]]]:
    """Order names like ruff's RUF022: CONSTANTS, then Classes, then the rest, naturally."""
    if len(name) > 1 and name.isupper():
        category = 0
    elif name[:1].isupper():
        category = 1
    else:
        category = 2
    natural = [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name)]
    return category, natural


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda m: m.__name__)
def test_public_all_is_a_tuple(module: types.ModuleType) -> None:
    """__all__ is a tuple, so nobody can append to it at run time."""
    assert isinstance(module.__all__, tuple)


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda m: m.__name__)
def test_public_all_is_sorted_as_ruff_wants(module: types.ModuleType) -> None:
    """__all__ is in ruff's isort-style order (RUF022)."""
    assert list(module.__all__) == sorted(module.__all__, key=_ruff_sort_key)


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda m: m.__name__)
def test_public_all_has_no_duplicates(module: types.ModuleType) -> None:
    """Every name appears once in __all__."""
    assert len(set(module.__all__)) == len(module.__all__)


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda m: m.__name__)
def test_public_all_names_resolve(module: types.ModuleType) -> None:
    """Every name in __all__ is an attribute of its module."""
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert missing == []


def test_public_orchestra_exports_every_public_name() -> None:
    """Every public, non-module attribute of orchestra is listed in __all__."""
    public = {
        name
        for name, value in vars(orchestra).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public - set(orchestra.__all__) == set()


@pytest.mark.parametrize("module", [errors, events], ids=lambda m: m.__name__)
def test_public_module_lists_every_class_it_defines(module: types.ModuleType) -> None:
    """Every public class defined in orchestra.errors / orchestra.events is in its __all__."""
    defined = {
        name
        for name, value in vars(module).items()
        if inspect.isclass(value) and value.__module__ == module.__name__ and name[0] != "_"
    }
    assert defined - set(module.__all__) == set()


def test_public_errors_derive_from_orchestra_error() -> None:
    """Every exception in orchestra.errors belongs to the one tree under OrchestraError."""
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.OrchestraError), name


def test_public_errors_tree_is_drawn_in_the_module_docstring() -> None:
    """The errors module docstring names every exception of the tree."""
    assert errors.__doc__ is not None
    for name in errors.__all__:
        assert name in errors.__doc__, name


def test_public_errors_reexported_from_orchestra_are_the_same_objects() -> None:
    """An error importable from orchestra is the very class in orchestra.errors."""
    for name in orchestra.__all__:
        if name in errors.__all__:
            assert getattr(orchestra, name) is getattr(errors, name)


def test_public_events_derive_from_event() -> None:
    """Every event class in orchestra.events derives from Event and has its own kind."""
    kinds = set()
    for name in events.__all__:
        cls = getattr(events, name)
        assert issubclass(cls, events.Event), name
        kinds.add(cls.kind)
    assert len(kinds) == len(events.__all__)


def test_public_version_is_a_string() -> None:
    """orchestra.__version__ is a non-empty string."""
    assert isinstance(orchestra.__version__, str)
    assert orchestra.__version__


def test_public_import_is_light() -> None:
    """import orchestra loads none of networkx, httpx, sqlite_utils, click or rich, nor the
    agents and models until they are used."""
    code = "import json, sys; import orchestra; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    heavy = sorted(
        name
        for name in loaded
        if any(name == root or name.startswith(root + ".") for root in HEAVY_MODULES)
    )
    assert heavy == []


def test_public_agent_names_load_on_first_use() -> None:
    """Agent, tool and the other agent names are importable from orchestra (lazily)."""
    code = (
        "import sys; import orchestra; assert 'orchestra.agents' not in sys.modules; "
        "from orchestra import Agent, Effect, Tool, ToolContext, tool; "
        "print(Agent.__module__, tool.__module__, 'orchestra.agents' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.split() == ["orchestra.agents", "orchestra.tools", "True"]
