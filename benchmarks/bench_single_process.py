"""Single-process optimizer step time on Llama-like shapes: MARSM vs torch.optim.AdamW (foreach) vs torch.optim.Muon.

    python benchmarks/bench_single_process.py [--model debug] [--threads 1] [--steps 3]

Parameters are plain tensors with the shapes of a Llama-like model (benchmarks/_common.py), gradients are
fixed random tensors; each optimizer takes ``--warmup`` steps, then the median of ``--steps`` timed steps.
torch.optim.Muon accepts only 2-D matrices, so it gets the matrices and a torch.optim.AdamW (foreach) gets
the rest, which is what MARSM's built-in AdamW route does in one optimizer. Newton-Schulz runs in bf16 in
every Muon-type row except the one labelled float32 (torch.optim.Muon hard-codes bf16).

Second table: Newton-Schulz alone on the same matrices, one call per matrix vs same-shape matrices stacked
into one batched call (what MARSM does), in bf16 and float32.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import MODEL_CONFIGS, Combined, make_model, markdown_table, median, save  # noqa: E402

from dist_marsm import MARSM, build_param_groups  # noqa: E402
from dist_marsm.newton_schulz import newton_schulz, newton_schulz_flops  # noqa: E402

LR, WD = 3e-3, 0.1


def timed(fn, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return median(times)


def optimizers(model):
    groups = build_param_groups(model)
    mats = [p for g in groups if g["use_mars"] for p in g["params"]]
    rest = [p for g in groups if not g["use_mars"] for p in g["params"]]

    def adamw(params):
        return torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=WD, foreach=True)

    return {
        "torch.optim.AdamW (foreach), all params": lambda: adamw(model.parameters()),
        "torch.optim.Muon (nesterov=False, match_rms_adamw) + AdamW": lambda: Combined(
            torch.optim.Muon(mats, lr=LR, weight_decay=WD, nesterov=False, adjust_lr_fn="match_rms_adamw"), adamw(rest)
        ),
        "torch.optim.Muon default (Nesterov) + AdamW": lambda: Combined(
            torch.optim.Muon(mats, lr=LR, weight_decay=WD), adamw(rest)
        ),
        "MARSM approx (default)": lambda: MARSM(build_param_groups(model), lr=LR, weight_decay=WD),
        "MARSM efficient": lambda: MARSM(build_param_groups(model), lr=LR, weight_decay=WD, variant="efficient"),
        "MARSM gamma=0, clip off (Muon)": lambda: MARSM(
            build_param_groups(model), lr=LR, weight_decay=WD, gamma=0.0, clip=False
        ),
        "MARSM approx, ns_dtype=float32": lambda: MARSM(
            build_param_groups(model), lr=LR, weight_decay=WD, ns_dtype="float32"
        ),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="debug", choices=list(MODEL_CONFIGS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--ns-only", action="store_true", help="only the Newton-Schulz stacking table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = make_model(args.model)
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-2
    shapes = [tuple(p.shape) for gr in build_param_groups(model) if gr["use_mars"] for p in gr["params"]]
    ns_gflop = sum(newton_schulz_flops(s) for s in shapes) / 1e9

    rows, data = [], {"args": vars(args), "shapes": shapes, "ns_gflop": ns_gflop, "optimizers": {}, "ns": {}}
    adamw_time = None
    for name, build in ({} if args.ns_only else optimizers(model)).items():
        opt = build()
        t = timed(opt.step, args.warmup, args.steps)
        adamw_time = adamw_time or t
        data["optimizers"][name] = t
        rows.append([name, t * 1e3, t / adamw_time])
        print(f"{name}: {t * 1e3:.1f} ms", flush=True)
        del opt
    table1 = markdown_table(["optimizer (one process)", "step ms", "/ AdamW"], rows)

    # The model's matrices, and many small same-shape matrices (MoE-expert-like, 64 x [128, 64]) where the
    # per-call overhead, not the arithmetic, dominates.
    shape_sets = {f"{args.model} model": shapes, "64 small [128, 64]": [(128, 64)] * 64}
    rows2 = []
    for set_name, set_shapes in shape_sets.items():
        by_shape = defaultdict(list)
        for s in set_shapes:
            by_shape[s].append(torch.randn(s, generator=g))
        stacked = {s: torch.stack(ms) for s, ms in by_shape.items()}
        gflop = sum(newton_schulz_flops(s) for s in set_shapes) / 1e9
        for dtype in (torch.bfloat16, torch.float32):
            each = timed(
                lambda: [newton_schulz(m, 5, dtype) for ms in by_shape.values() for m in ms], args.warmup, args.steps
            )
            batched = timed(
                lambda: [newton_schulz(torch.stack(ms), 5, dtype) for ms in by_shape.values()], args.warmup, args.steps
            )
            name = str(dtype).removeprefix("torch.")
            data["ns"][f"{set_name} {name}"] = {"per_matrix_s": each, "stacked_s": batched}
            rows2.append(
                [
                    set_name,
                    name,
                    len(set_shapes),
                    len(stacked),
                    each * 1e3,
                    batched * 1e3,
                    f"{each / batched:.2f}",
                    gflop / batched,
                ]
            )
            print(f"NS {set_name} {name}: per matrix {each * 1e3:.1f} ms, stacked {batched * 1e3:.1f} ms", flush=True)
    table2 = markdown_table(
        [
            "matrices",
            "NS dtype",
            "count",
            "stacked calls",
            "one call per matrix ms",
            "stacked ms (incl. torch.stack)",
            "speed-up from stacking",
            "GFLOP/s stacked",
        ],
        rows2,
    )
    if args.ns_only:
        table1 = "(optimizer table skipped: --ns-only)"
    md = (
        f"Model shapes: {args.model} {MODEL_CONFIGS[args.model]}: {len(shapes)} matrices, {ns_gflop:.1f} GFLOP "
        f"of Newton-Schulz per step; {args.threads} thread(s); median of {args.steps} steps after "
        f"{args.warmup} warm-up.\n\n" + table1 + "\n\nNewton-Schulz alone (5 iterations):\n\n" + table2
    )
    print("\n" + md)
    save(f"bench_single_process_{args.model}{'_ns' if args.ns_only else ''}", data, md)


if __name__ == "__main__":
    main()
