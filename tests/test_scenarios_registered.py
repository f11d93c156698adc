"""Every spawned scenario runs: a module-level function of tests/ that takes exactly (rank, world) must be
marked ``@scenario`` (tests/_spawn.py), every module with scenarios must hand them to ``scenario_cases``
(which parametrizes the test that spawns them), and a scenario defined below that call is refused.

The first check reads the source (ast), so it needs no imports and sees modules whose tests are skipped here.
"""

from __future__ import annotations

import ast
import importlib
import sys
import types
from pathlib import Path

import pytest
from _spawn import run_scenarios, scenario_cases

TESTS = Path(__file__).resolve().parent


def _module_functions(path: Path) -> list[ast.FunctionDef]:
    return [n for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)]


def _takes_rank_and_world(fn: ast.FunctionDef) -> bool:
    a = fn.args
    return [p.arg for p in a.posonlyargs + a.args] == ["rank", "world"] and not (a.vararg or a.kwonlyargs)


def _marked(fn: ast.FunctionDef) -> bool:
    return any(
        isinstance(d, ast.Call) and "scenario" in (getattr(d.func, "id", None), getattr(d.func, "attr", None))
        for d in fn.decorator_list
    )


def _scenario_modules() -> dict[str, list[str]]:
    """{module stem: names of its @scenario functions} over tests/*.py."""
    found = {}
    for path in sorted(TESTS.glob("*.py")):
        names = [fn.name for fn in _module_functions(path) if _marked(fn)]
        if names:
            found[path.stem] = names
    return found


def test_every_rank_world_function_is_a_marked_scenario():
    unmarked = [
        f"tests/{path.name}:{fn.lineno} {fn.name}"
        for path in sorted(TESTS.glob("*.py"))
        for fn in _module_functions(path)
        if _takes_rank_and_world(fn) and not _marked(fn)
    ]
    assert not unmarked, (
        f"functions that look like spawned scenarios but are not marked @scenario, so no test runs them: {unmarked}"
    )


def test_every_module_with_scenarios_lists_them_for_a_test():
    """Importing the test modules runs their scenario_cases() calls; each scenario module must have been listed."""
    modules = _scenario_modules()
    assert {"test_distributed", "moe_scenarios"} <= set(modules), modules  # the scan finds what is there
    for path in sorted(TESTS.glob("test_*.py")):
        if "scenario_cases" in path.read_text():
            try:
                importlib.import_module(path.stem)
            except pytest.skip.Exception:  # e.g. torchtitan missing: its own scenarios are skipped with it
                modules.pop(path.stem, None)
    unlisted = []
    for stem in modules:
        mod = sys.modules.get(stem) or sys.modules.get(f"tests.{stem}")
        if mod is None or not getattr(mod, "_spawned_scenarios_listed", False):
            unlisted.append(stem)
    assert not unlisted, f"modules whose @scenario functions no test lists with scenario_cases(): {unlisted}"


def _example_module(monkeypatch, source: str) -> types.ModuleType:
    mod = types.ModuleType("scenario_registration_example")
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    exec(source, mod.__dict__)  # noqa: S102 - a module built here, from the literal below
    return mod


def test_cases_are_grouped_by_world_and_a_late_scenario_is_refused(monkeypatch):
    mod = _example_module(
        monkeypatch,
        (
            "from _spawn import scenario, scenario_cases\n"
            "@scenario(3, 2)\n"
            "def first(rank, world): pass\n"
            "@scenario(2)\n"
            "def second(rank, world): pass\n"
            "CASES = scenario_cases(__name__)\n"
        ),
    )
    assert mod.CASES == [(2, "first"), (2, "second"), (3, "first")]
    with pytest.raises(RuntimeError, match="below the module's scenario_cases"):
        exec("@scenario(2)\ndef late(rank, world): pass\n", mod.__dict__)  # noqa: S102
    with pytest.raises(ValueError, match="world sizes"):
        exec("@scenario()\ndef no_world(rank, world): pass\n", mod.__dict__)  # noqa: S102


def test_unregistered_names_are_refused_before_spawning(monkeypatch):
    mod = _example_module(
        monkeypatch,
        ("from _spawn import scenario\n@scenario(2)\ndef marked(rank, world): pass\ndef unmarked(rank, world): pass\n"),
    )
    with pytest.raises(ValueError, match=r"\['unmarked'\] are not @scenario functions for world 2"):
        run_scenarios(mod.__name__, ["marked", "unmarked"], 2)
    with pytest.raises(ValueError, match=r"\['marked'\] are not @scenario functions for world 3"):
        run_scenarios(mod.__name__, ["marked"], 3)
    with pytest.raises(ValueError, match="no @scenario functions"):
        scenario_cases("_spawn")
