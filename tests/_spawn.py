"""Run named scenario functions on N spawned gloo ranks, once per world size.

Each rank runs every scenario in order and records None or the traceback; a scenario that fails
on one rank usually fails on all (the optimizer raises collectively). The process group carries a
timeout so a hang becomes an error, and the parent kills stragglers after ``timeout`` seconds.
"""

from __future__ import annotations

import datetime
import functools
import importlib
import os
import traceback

import torch.multiprocessing as mp


from torch.distributed.elastic.utils.distributed import get_free_port as free_port


def _rank_main(rank, world, port, module, names, queue, pg_timeout_s):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=pg_timeout_s))
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
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, module, names, queue, pg_timeout_s))
             for r in range(world)]
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


def scenario_check(module: str, scenarios, **kwargs):
    """``check(world, scenario)`` asserts that ``scenario`` passed on every rank. ``scenarios`` is a list
    or ``{world: list}``; each world size's scenarios run together once, on the first check."""
    @functools.cache
    def results(world):
        names = scenarios[world] if isinstance(scenarios, dict) else scenarios
        return run_scenarios(module, names, world, **kwargs)

    def check(world: int, scenario: str) -> None:
        failed = [(r, e) for r, e in enumerate(results(world)[scenario]) if e is not None]
        assert not failed, "\n".join(f"rank {r}:\n{e}" for r, e in failed)

    return check
