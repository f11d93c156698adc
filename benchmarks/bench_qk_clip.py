"""Cost of QK-clip per training step on CPU: the max-logit capture, the rescale and the packed all-reduce.

    python benchmarks/bench_qk_clip.py [--repeats 5] [--shapes 4x256,1x1024]

torchtitan's llama3 debugmodel (6 layers, dim 256, 16 heads of 16, fused QKV, causal SDPA, float32),
one thread. Per shape (batch x sequence): the train step (forward + backward) without hooks and with
the capture hooks, interleaved (A, B, A, B, ...) so load drifts hit both; the capture alone
(``per_head_max_logits`` on each layer's q/k); ``QKClip.apply`` with every head clipped. Then the one
MAX all-reduce at 2 gloo ranks and its bytes, and the bytes for Llama 3 8B / 70B shapes.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import LLAMA3, markdown_table, median, save  # noqa: E402

from dist_marsm.qk_clip import per_head_max_logits  # noqa: E402


def build_model():
    from torchtitan.models.llama3 import model_registry

    from dist_marsm.titan.cpu_shims import use_causal_sdpa

    spec = model_registry("debugmodel", attn_backend="flex")
    use_causal_sdpa(spec.model)
    torch.manual_seed(0)
    model = spec.model.build()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.ndim > 1 else p.fill_(1.0)
    return model


def train_step(model, tokens):
    logits = model(tokens[:, :-1])
    F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1)).backward()
    model.zero_grad(set_to_none=True)


def time_it(fn, repeats):
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _allreduce_rank(rank, world, port, n, reps, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    x = torch.full((n,), float(rank))
    for _ in range(5):
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    times = []
    for _ in range(reps):
        dist.barrier()
        t = time.perf_counter()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
        times.append(time.perf_counter() - t)
    if rank == 0:
        queue.put(median(times))
    dist.destroy_process_group()


def allreduce_time(n, world=2, reps=100):
    import torch.multiprocessing as mp

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from _spawn import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_allreduce_rank, args=(r, world, port, n, reps, queue)) for r in range(world)]
    for p in procs:
        p.start()
    t = queue.get(timeout=120)
    for p in procs:
        p.join(timeout=10)
    return t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shapes", default="4x256,1x1024")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from dist_marsm.titan.qk_clip_hooks import install_qk_clip

    model = build_model()
    attn = model.layers["0"].attention
    n_layers, n_heads, hd = len(model.layers), attn.n_heads, attn.head_dim
    rows, data = [], {"shapes": []}
    for shape in args.shapes.split(","):
        b, length = (int(v) for v in shape.split("x"))
        tokens = torch.randint(0, 2048, (b, length + 1), generator=torch.Generator().manual_seed(0))
        hooks = install_qk_clip(model, 1e-3)  # tau tiny: every head clips, the apply's worst case
        hooks.remove()
        plain, hooked = [], []
        train_step(model, tokens)
        for _ in range(args.repeats):
            plain += time_it(lambda: train_step(model, tokens), 1)
            hooks = install_qk_clip(model, 1e-3)
            hooked += time_it(lambda: train_step(model, tokens), 1)
            hooks.remove()
        q = torch.randn(b, length, n_heads, hd)
        k = torch.randn(b, length, attn.n_kv_heads, hd)
        capture = time_it(lambda: [per_head_max_logits(q, k) for _ in range(n_layers)], args.repeats)
        clip = hooks

        def apply_all():
            for spec in (layer.spec for layer in clip._layers.values()):
                clip.record(spec.name, torch.full((spec.n_heads,), 2.0))
            clip.apply()

        with torch.no_grad():
            snapshot = [p.detach().clone() for p in model.parameters()]
        apply_t = time_it(apply_all, args.repeats)
        with torch.no_grad():
            for p, s in zip(model.parameters(), snapshot):
                p.copy_(s)
        flops = 2 * b * n_heads * length * length * hd * n_layers
        r = dict(
            shape=shape,
            step_plain_ms=median(plain) * 1e3,
            step_hooked_ms=median(hooked) * 1e3,
            capture_ms=median(capture) * 1e3,
            apply_ms=median(apply_t) * 1e3,
            capture_gflop=flops / 1e9,
        )
        r["overhead_pct"] = 100 * (r["step_hooked_ms"] / r["step_plain_ms"] - 1)
        r["capture_pct_of_step"] = 100 * r["capture_ms"] / r["step_plain_ms"]
        data["shapes"].append(dict(r, plain_s=plain, hooked_s=hooked))
        rows.append(
            [
                shape,
                r["step_plain_ms"],
                r["step_hooked_ms"],
                f"{r['overhead_pct']:+.1f}%",
                r["capture_ms"],
                f"{r['capture_pct_of_step']:.1f}%",
                r["capture_gflop"],
                r["apply_ms"],
            ]
        )
        print(rows[-1], flush=True)
    n_slots = n_layers * n_heads
    ar = allreduce_time(n_slots)
    data.update(
        allreduce_elements=n_slots,
        allreduce_bytes=4 * n_slots,
        allreduce_2ranks_ms=ar * 1e3,
        bytes_llama3={k: 4 * c["n_layers"] * c["n_heads"] for k, c in LLAMA3.items()},
    )
    md = (
        "llama3 debugmodel (6 layers x 16 heads, head_dim 16), float32, 1 thread, median of "
        f"{args.repeats}, taken under load (shared 2-core machine; Xeon with AMX-bf16, unused here: fp32).\n\n"
    )
    md += markdown_table(
        [
            "batch x seq",
            "train step ms",
            "with capture ms",
            "overhead",
            "capture alone ms",
            "capture / step",
            "q.k^T GFLOP (full L x L)",
            "apply (all heads clip) ms",
        ],
        rows,
    )
    md += (
        f"\n\nOne MAX all-reduce per step: {n_slots} float32 = {4 * n_slots} bytes, {ar * 1e3:.3f} ms at 2 gloo "
        f"ranks (median of 100). Llama 3 shapes: "
        + ", ".join(f"{k} {v} bytes" for k, v in data["bytes_llama3"].items())
        + ".\n"
    )
    print(md)
    save("bench_qk_clip", data, md)


if __name__ == "__main__":
    main()
