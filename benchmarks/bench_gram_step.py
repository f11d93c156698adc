"""Whole MARSM optimizer step on an FSDP2 model with Llama 3 8B's proportions scaled down, ns_method
standard vs gram, side by side in one run.

    python benchmarks/bench_gram_step.py [--ranks 2] [--steps 4] [--ns-dtype bfloat16]

Model: benchmarks/_common.py's LlamaLike with 4 layers, d 1024, MLP 3584 (8B's MLP/d ratio 3.5), vocab
2048; its attention projections are d x d (no grouped-query attention, so only the MLP matrices are
rectangular; in real Llama 3 wk/wv are rectangular too). FSDP2 ``fully_shard`` per block and at the
root on a 1-D mesh, gloo, spawned ranks, one thread each. Both optimizers hold their own copy of the
model (same seed, same gradients from one backward pass); their steps alternate (standard, gram, gram,
standard, ...) so drift in the shared machine's load hits both alike. Per step: barrier, then
``opt.step()``; the step's time is the slowest rank's; the table shows the median of ``--steps``
after one warm-up step each.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import LlamaLike, lm_loss, markdown_table, median, save  # noqa: E402

CONFIG = dict(dim=1024, n_layers=4, ffn=3584, vocab=2048, n_heads=8)
METHODS = ("standard", "gram")


def rank_main(rank, world, port, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from dist_marsm import MARSM, build_param_groups
    from dist_marsm.newton_schulz import newton_schulz_flops

    CONFIG.update(dim=args.dim, ffn=args.ffn, n_layers=args.layers)
    mesh = init_device_mesh("cpu", (world,))
    opts = {}
    for method in METHODS:
        torch.manual_seed(0)
        model = LlamaLike(**CONFIG)
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        lm_loss(model, 0, batch=2, seq=32).backward()
        opts[method] = MARSM(
            build_param_groups(model), lr=3e-3, ns_dtype=args.ns_dtype, ns_method=method, wire_dtype="bfloat16"
        )
    times = {m: [] for m in METHODS}
    for step in range(1 + args.steps):
        order = METHODS if step % 2 == 0 else METHODS[::-1]
        for method in order:
            dist.barrier()
            t = time.perf_counter()
            opts[method].step()
            elapsed = torch.tensor([time.perf_counter() - t])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if step > 0:
                times[method].append(elapsed.item())
    flops = {}
    for method, opt in opts.items():
        total = torch.tensor(
            [
                float(
                    sum(
                        e.flops
                        for fg in opt.step_plan.flat_groups
                        for e in fg.owner_plan.entries
                        if e.owner == fg.owner_plan.my_rank
                    )
                )
            ]
        )
        busiest = total.clone()
        dist.all_reduce(busiest, op=dist.ReduceOp.MAX)
        dist.all_reduce(total)
        flops[method] = {"total_gflop": total.item() / 1e9, "busiest_rank_gflop": busiest.item() / 1e9}
    if rank == 0:
        shapes = [tuple(p.shape) for g in opts["standard"].param_groups if g["use_mars"] for p in g["params"]]
        single = {m: sum(newton_schulz_flops(s, 5, m, dtype=args.ns_dtype) for s in shapes) / 1e9 for m in METHODS}
        queue.put({"times": times, "flops": flops, "single_process_gflop": single, "n_matrices": len(shapes)})
    dist.barrier()
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--ns-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--dim", type=int, default=CONFIG["dim"])
    ap.add_argument("--ffn", type=int, default=CONFIG["ffn"])
    ap.add_argument("--layers", type=int, default=CONFIG["n_layers"])
    args = ap.parse_args()
    CONFIG.update(dim=args.dim, ffn=args.ffn, n_layers=args.layers)
    import torch.multiprocessing as mp
    from torch.distributed.elastic.utils.distributed import get_free_port as free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=rank_main, args=(r, args.ranks, port, args, queue)) for r in range(args.ranks)]
    for p in procs:
        p.start()
    out = queue.get(timeout=3600)
    for p in procs:
        p.join(timeout=60)
    rows = []
    for m in METHODS:
        t = median(out["times"][m])
        f = out["flops"][m]
        rows.append(
            [
                m,
                t * 1e3,
                median(out["times"]["standard"]) / t,
                f["total_gflop"],
                f["busiest_rank_gflop"],
                f["busiest_rank_gflop"] / t,
                ", ".join(f"{x * 1e3:.0f}" for x in out["times"][m]),
            ]
        )
    md = (
        f"MARSM optimizer step, FSDP2 LlamaLike {CONFIG} ({out['n_matrices']} matrices), {args.ranks} gloo ranks, "
        f"one thread each, Newton-Schulz in {args.ns_dtype}, bf16 wire; median of {args.steps} steps after a "
        "warm-up, methods alternating. Machine shared with other jobs.\n\n"
        + markdown_table(
            [
                "ns_method",
                "optimizer step ms",
                "speed-up vs standard",
                "NS GFLOP / step (all ranks)",
                "busiest rank NS GFLOP",
                "busiest rank GFLOP/s",
                "each step ms",
            ],
            rows,
        )
    )
    print(md)
    save(f"bench_gram_step_{args.ranks}r_{args.ns_dtype}", {"config": CONFIG, "args": vars(args), **out}, md)


if __name__ == "__main__":
    main()
