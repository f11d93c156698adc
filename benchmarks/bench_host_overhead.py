"""Host overhead of one optimizer step: many tiny matrices, where compute is negligible and what is left
is Python and dispatch. MARSM vs torch.optim.AdamW (foreach) on the same parameters, at 1 and 2 ranks
(FSDP2, gloo), plus the debug model; and the count of tensor ops dispatched per step, which is what
becomes kernel launches on a GPU.

    python benchmarks/bench_host_overhead.py [--counts 64,512,4096] [--ranks 1,2] [--steps 10]

Newton-Schulz runs in float32 (``ns_dtype="float32"``) so the table is about the host, not the CPU's
bf16 units. Ops are counted with a TorchDispatchMode: every aten op called from Python, each foreach op
once; ``stage`` counts the element-wise stage (MARSM._stage), ``step`` the whole step.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import make_model, markdown_table, median, save  # noqa: E402

from dist_marsm import MARSM, build_param_groups  # noqa: E402

SIZE = 16


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


class TinyMatrices(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.mats = nn.ParameterList([nn.Parameter(torch.randn(SIZE, SIZE) * 0.1) for _ in range(n)])


def _models(kind: str):
    if kind == "debug":
        model = make_model("debug")
        return model, lambda: build_param_groups(model)
    model = TinyMatrices(int(kind))
    return model, lambda: [{"params": list(model.parameters()), "use_mars": True}]


def _set_grads(model, step):
    g = torch.Generator().manual_seed(step)
    for p in model.parameters():
        full = torch.randn(p.shape, generator=g) * 0.01
        if hasattr(p, "_local_tensor"):
            from torch.distributed.tensor import distribute_tensor

            p.grad = distribute_tensor(full, p.device_mesh, p.placements)
        else:
            p.grad = full


def measure(kind: str, world: int, rank: int, steps: int) -> dict:
    model, groups = _models(kind)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    optimizers = {
        "MARSM": lambda: MARSM(groups(), lr=1e-3, ns_dtype="float32"),
        "AdamW foreach": lambda: torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True),
    }
    row = {"kind": kind, "ranks": world, "matrices": sum(p.ndim >= 2 for p in model.parameters())}
    for name, build in optimizers.items():
        opt = build()
        times = []
        for step in range(steps + 2):
            _set_grads(model, step)
            start = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - start)
        row[f"{name} ms"] = median(times[2:]) * 1e3
        _set_grads(model, 999)
        with OpCounter() as total:
            if isinstance(opt, MARSM):
                stage, counter = opt._stage, OpCounter()

                def counted(*a, **k):
                    with counter:
                        return stage(*a, **k)

                opt._stage = counted
            opt.step()
        row[f"{name} ops/step"] = total.count
        if isinstance(opt, MARSM):
            row["MARSM stage ops"] = counter.count
            row["allreduce bytes/step"] = opt.last_step_stats["allreduce_bytes"]
            row["agreement digest us/step"] = _digest_cost_us(opt)
    return row


def _digest_cost_us(opt: MARSM, reps: int = 200) -> float:
    """Host time of the cross-rank agreement per step: the guard's header of every flat group (settings and
    plan digests, the replan flag; nine float64 values that ride in the step's existing all-reduce, so it adds
    no collective), recomputed as if the settings had changed at every step (the worst case)."""
    start = time.perf_counter()
    for _ in range(reps):
        opt._settings_version += 1
        for fg in opt.step_plan.flat_groups:
            opt._header_values(fg)
    return (time.perf_counter() - start) / reps * 1e6


def _rank_main(rank, world, port, kinds, steps, queue):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    rows = [measure(k, world, rank, steps) for k in kinds]
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def run(kinds: list[str], world: int, steps: int) -> list[dict]:
    if world == 1:
        torch.set_num_threads(1)
        return [measure(k, 1, 0, steps) for k in kinds]
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, kinds, steps, queue)) for r in range(world)]
    for p in procs:
        p.start()
    rows = queue.get(timeout=3600)
    for p in procs:
        p.join()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="64,512,4096", help="numbers of 16 x 16 matrices")
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-debug", action="store_true", help="skip the debug model rows")
    args = ap.parse_args()
    kinds = args.counts.split(",") + ([] if args.no_debug else ["debug"])
    rows = []
    for world in map(int, args.ranks.split(",")):
        rows += run(kinds, world, args.steps)
    headers = [
        "model",
        "ranks",
        "matrices",
        "MARSM step",
        "AdamW foreach step",
        "MARSM / AdamW",
        "MARSM ops/step",
        "of which stage",
        "AdamW ops/step",
        "agreement check",
        "all-reduce",
    ]
    table = [
        [
            f"{r['kind']} x 16x16" if r["kind"] != "debug" else "debug model",
            r["ranks"],
            r["matrices"],
            f"{r['MARSM ms']:.1f} ms",
            f"{r['AdamW foreach ms']:.1f} ms",
            f"{r['MARSM ms'] / r['AdamW foreach ms']:.2f}x",
            r["MARSM ops/step"],
            r["MARSM stage ops"],
            r["AdamW foreach ops/step"],
            f"{r['agreement digest us/step']:.0f} us",
            f"{r['allreduce bytes/step']} B",
        ]
        for r in rows
    ]
    md = markdown_table(headers, table)
    print(md)
    save("bench_host_overhead", {"rows": rows}, md)


if __name__ == "__main__":
    main()
