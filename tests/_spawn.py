"""Run a test module's scenario functions on N spawned gloo ranks, once per world size.

A scenario is a module-level function ``fn(rank, world)`` marked ``@scenario(2, 3)`` (the world sizes it
runs at). ``scenario_cases(__name__)``, written below a module's last scenario, lists them as
(world, name) test cases; a scenario defined below that line is refused at import, and
tests/test_scenarios_registered.py fails on a (rank, world) function without the mark, so none can
exist without running.

Each rank runs every scenario of its world in order and records None or the traceback; a scenario
that fails on one rank usually fails on all (the optimizer raises collectively). The process group
carries a timeout so a hang becomes an error, and the parent kills stragglers after ``timeout`` seconds.
"""

from __future__ import annotations

import datetime
import functools
import importlib
import os
import sys
import traceback

import torch.multiprocessing as mp
from torch.distributed.elastic.utils.distributed import get_free_port as free_port

_LISTED = "_spawned_scenarios_listed"  # set on a module once scenario_cases() has read its scenarios


def scenario(*worlds: int):
    """Marks ``fn(rank, world)`` as a scenario run on spawned ranks at each of ``worlds``."""
    if not worlds or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in worlds):
        raise ValueError(f"@scenario needs one or more world sizes >= 1, got {worlds!r}")

    def mark(fn):
        if getattr(sys.modules.get(fn.__module__), _LISTED, False):
            raise RuntimeError(
                f"scenario {fn.__module__}.{fn.__name__} is defined below the module's "
                "scenario_cases() call, so no test would run it: move it above"
            )
        fn.spawn_worlds = tuple(worlds)
        return fn

    return mark


def scenarios_of(module: str) -> dict[str, tuple[int, ...]]:
    """{name: worlds} of the ``@scenario`` functions defined in ``module``, in definition order."""
    mod = importlib.import_module(module)
    return {
        name: fn.spawn_worlds
        for name, fn in vars(mod).items()
        if callable(fn) and hasattr(fn, "spawn_worlds") and getattr(fn, "__module__", None) == mod.__name__
    }


def scenario_cases(module: str) -> list[tuple[int, str]]:
    """Every (world, scenario) of ``module``, grouped by world; call it below the module's last scenario."""
    found = scenarios_of(module)
    if not found:
        raise ValueError(f"{module} has no @scenario functions")
    setattr(importlib.import_module(module), _LISTED, True)
    return [
        (w, name) for w in sorted({w for ws in found.values() for w in ws}) for name, ws in found.items() if w in ws
    ]


def _rank_main(rank, world, port, module, names, queue, pg_timeout_s):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=pg_timeout_s))
    mod = importlib.import_module(module)
    for name in names:
        try:
            getattr(mod, name)(rank, world)
            queue.put((name, rank, None))
        except BaseException:  # noqa: BLE001 - reported to the parent test
            queue.put((name, rank, traceback.format_exc()))
    dist.destroy_process_group()


def run_scenarios(module: str, names: list[str], world: int, timeout: float = 600, pg_timeout_s: float = 60):
    """Returns {scenario: [None or traceback per rank]}; missing entries mean the rank died or hung."""
    registered = scenarios_of(module)
    unknown = [n for n in names if world not in registered.get(n, ())]
    if unknown:
        raise ValueError(f"{module}: {unknown} are not @scenario functions for world {world}")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(r, world, port, module, names, queue, pg_timeout_s)) for r in range(world)
    ]
    for p in procs:
        p.start()
    results = {n: ["rank did not report (died or hung)"] * world for n in names}
    import queue as queue_mod
    import time

    deadline = time.time() + timeout
    for _ in range(len(names) * world):
        try:
            name, rank, err = queue.get(timeout=max(1.0, deadline - time.time()))
        except queue_mod.Empty:
            break
        results[name][rank] = err
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    return results


def scenario_check(module: str, **kwargs):
    """``check(world, scenario)`` asserts that ``scenario`` passed on every rank. All of ``module``'s
    scenarios of one world size run together, in one spawn, on that world's first check."""

    @functools.cache
    def results(world):
        return run_scenarios(module, [n for w, n in scenario_cases(module) if w == world], world, **kwargs)

    def check(world: int, scenario: str) -> None:
        failed = [(r, e) for r, e in enumerate(results(world)[scenario]) if e is not None]
        assert not failed, "\n".join(f"rank {r}:\n{e}" for r, e in failed)

    return check
