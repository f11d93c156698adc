"""A tiny stand-in for ``python -m dist_marsm.train`` with the same outside contract, for launcher tests.

Contract mirrored: ``--recipe PATH [--section.key value ...]``; one rank per process under torchrun; every rank
prints a start line naming its rank, world size and hostname; rank 0 appends one JSON object per step
(``step``, ``loss``) to ``<[job] dump_folder>/metrics.jsonl``; with ``[checkpoint] enable`` it saves every
``interval`` steps into ``<dump_folder>/<folder>/step-N`` and resumes from the latest complete one.

The model: least squares ``w`` fitted by gradient descent with the gradient averaged by a gloo all_reduce over
all ranks (each rank owns a fixed slice of a global synthetic data set), so the losses depend on the world
size only through float rounding.  ``STANDIN_STEP_SLEEP`` seconds are slept per step (requeue tests).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import tomllib
from pathlib import Path


def parse(argv):
    args = list(argv)
    if "--recipe" not in args:
        sys.exit("standin_train: --recipe PATH is required")
    i = args.index("--recipe")
    recipe = Path(args[i + 1])
    del args[i : i + 2]
    cfg = tomllib.loads(recipe.read_text())
    while args:
        key = args.pop(0)
        if not key.startswith("--") or "." not in key or not args:
            sys.exit(f"standin_train: bad override {key!r}")
        sec, name = key[2:].split(".", 1)
        val = args.pop(0)
        try:
            val = json.loads(val)
        except json.JSONDecodeError:
            pass
        cfg.setdefault(sec, {})[name] = val
    return cfg


def main():
    import torch
    import torch.distributed as dist

    cfg = parse(sys.argv[1:])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    print(
        f"[standin] start rank={rank} world_size={world} host={socket.gethostname()} "
        f"node={os.environ.get('SLURMD_NODENAME', '-')}",
        flush=True,
    )
    dump = Path(cfg["job"]["dump_folder"])
    steps = int(cfg["training"]["steps"])
    ck = cfg.get("checkpoint", {})
    ck_dir = dump / ck.get("folder", "checkpoint")
    interval = int(ck.get("interval", 0)) if ck.get("enable", False) else 0
    sleep = float(os.environ.get("STANDIN_STEP_SLEEP", "0"))

    g = torch.Generator().manual_seed(0)
    n, d = 64, 8
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, generator=g, dtype=torch.float64)
    mine = slice(rank * n // world, (rank + 1) * n // world)
    w = torch.zeros(d, dtype=torch.float64)
    start = 0
    done = sorted(
        (p for p in ck_dir.glob("step-*") if (p / "COMPLETE").exists()), key=lambda p: int(p.name.split("-")[1])
    )
    if done:
        state = torch.load(done[-1] / "state.pt")
        w, start = state["w"], state["step"]
        print(f"[standin] rank={rank} resumed from {done[-1]} (step {start})", flush=True)
    for step in range(start + 1, steps + 1):
        r = x[mine] @ w - y[mine]
        loss_grad = torch.cat([(r * r).sum().view(1), 2 * x[mine].T @ r])
        dist.all_reduce(loss_grad)
        loss_grad /= n
        w = w - 0.05 * loss_grad[1:]
        if rank == 0:
            dump.mkdir(parents=True, exist_ok=True)
            with open(dump / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": float(loss_grad[0])}) + "\n")
            if interval and step % interval == 0:
                out = ck_dir / f"step-{step}"
                out.mkdir(parents=True, exist_ok=True)
                torch.save({"w": w, "step": step}, out / "state.pt")
                (out / "COMPLETE").touch()
        dist.barrier()
        time.sleep(sleep)
    print(f"[standin] rank={rank} done", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
