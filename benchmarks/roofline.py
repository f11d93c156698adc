"""Step-time floor of distributed Newton-Schulz for Llama 3 8B and 70B on H100s or H200s (arithmetic, no timing).

    python benchmarks/roofline.py                 # H100 (results/roofline.*)
    python benchmarks/roofline.py --gpu H200      # H200 (results/roofline_h200.*)
    [--ns-method gram] [--tflops R] [--nvlink-gbs 450] [--ib-gbs 50] [--wire-bytes 2] [--tokens N] [--mfu 0.4]

Compute: total Newton-Schulz FLOPs per optimizer step (5 iterations; per iteration on an m x n matrix with
m <= n: 2 m^2 n for X X^T, 2 m^3 for S S, 2 m^2 n for the product with X; ``--ns-method gram`` counts the
Gram form's FLOPs instead, dist_marsm.newton_schulz.newton_schulz_flops), at the GPU's GEMM rate
(benchmarks/_common.GPUS, where each rate's source is stated: H100 989 TFLOP/s = datasheet dense bf16 peak,
H200 ~790 TFLOP/s measured). Two compute floors: the perfect split total / W, and the busiest rank of the
library's default owner plan (largest_first), which can never beat the largest single matrix; "bound / even
split" = max(total / W, largest matrix) / (total / W) says how far that design limit sits above the split.
Communication: each rank sends its shard of every matrix to the owner and receives its shard of the result
(bytes sent per rank = (W-1)/W x 2 x local matrix-shard bytes, in the wire dtype, bf16 by default), at a
stated per-GPU bandwidth per direction: NVLink 4 (900 GB/s bidirectional -> 450 GB/s) inside one 8-GPU node,
400 Gb/s InfiniBand (50 GB/s) per GPU across nodes (W > 8).
Floor = max(compute, communication) with perfect overlap, and their sum without overlap. For scale, the
AdamW step is memory-bound: 28 bytes of HBM traffic per parameter (read p, g, m, v; write p, m, v in fp32)
over all parameters / W at the GPU's HBM rate; and the training step is 6 x parameters x tokens FLOPs over
W GPUs at the stated MFU of the datasheet peak (attention FLOPs left out), the optimizer step taken to run
after the backward.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (  # noqa: E402
    GPUS,
    LLAMA3,
    MFU,
    TOKENS_PER_STEP,
    llama3_matrix_shapes,
    llama3_params,
    markdown_table,
    save,
    train_step_seconds,
)

from dist_marsm.newton_schulz import NS_METHODS, newton_schulz_flops  # noqa: E402
from dist_marsm.owner_plan import assign_owners  # noqa: E402

WORLDS = (8, 64, 128, 256, 512, 1024)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", choices=sorted(GPUS), default="H100", help="GEMM rate, peak and HBM preset")
    ap.add_argument(
        "--ns-method",
        choices=NS_METHODS,
        default="standard",
        help="Newton-Schulz method the FLOPs are counted for (bf16, 5 steps, muon coefficients)",
    )
    ap.add_argument("--tflops", type=float, default=None, help="override the preset's bf16 GEMM TFLOP/s per GPU")
    ap.add_argument("--nvlink-gbs", type=float, default=450.0, help="GB/s per GPU per direction inside a node")
    ap.add_argument("--ib-gbs", type=float, default=50.0, help="GB/s per GPU per direction across nodes")
    ap.add_argument("--hbm-tbs", type=float, default=None, help="override the preset's HBM TB/s (AdamW reference)")
    ap.add_argument("--wire-bytes", type=int, default=2, help="bytes per element on the wire (2 = bf16)")
    ap.add_argument("--tokens", type=int, default=TOKENS_PER_STEP, help="tokens per training step")
    ap.add_argument("--mfu", type=float, default=MFU, help="forward+backward MFU against the datasheet peak")
    args = ap.parse_args()
    gpu = GPUS[args.gpu]
    source = gpu["source"] if args.tflops is None else "given with --tflops"
    args.tflops = gpu["gemm_tflops"] if args.tflops is None else args.tflops
    args.hbm_tbs = gpu["hbm_tbs"] if args.hbm_tbs is None else args.hbm_tbs
    rate = args.tflops * 1e12
    rows, data = [], {"assumptions": vars(args), "rows": []}
    for model in LLAMA3:
        shapes = llama3_matrix_shapes(model)
        costs = [float(newton_schulz_flops(s, 5, args.ns_method)) for s in shapes]
        total = sum(costs)
        matrix_elems = sum(math.prod(s) for s in shapes)
        for world in WORLDS:
            owners, _ = assign_owners(costs, world, "largest_first")
            load = [0.0] * world
            for c, o in zip(costs, owners):
                load[o] += c
            t_split = total / world / rate
            t_plan = max(load) / rate
            bw = (args.nvlink_gbs if world <= 8 else args.ib_gbs) * 1e9
            sent = 2 * (world - 1) / world * matrix_elems / world * args.wire_bytes
            t_comm = sent / bw
            t_adamw = llama3_params(model) * 28 / world / (args.hbm_tbs * 1e12)
            t_train = train_step_seconds(model, world, args.gpu, args.tokens, args.mfu)
            bound_over_even = max(total / world, max(costs)) / (total / world)
            row = dict(
                model=model,
                world=world,
                ns_tflop=total / 1e12,
                split_ms=t_split * 1e3,
                plan_ms=t_plan * 1e3,
                largest_matrix_ms=max(costs) / rate * 1e3,
                bytes_sent_per_rank=sent,
                link_gbs=bw / 1e9,
                comm_ms=t_comm * 1e3,
                floor_overlap_ms=max(t_plan, t_comm) * 1e3,
                floor_serial_ms=(t_plan + t_comm) * 1e3,
                adamw_ms=t_adamw * 1e3,
                bound_over_even_split=bound_over_even,
                train_step_ms=t_train * 1e3,
                floor_overlap_share_of_step=max(t_plan, t_comm) / t_train,
                plan_over_split_share_of_step=(t_plan - t_split) / t_train,
            )
            data["rows"].append(row)
            rows.append(
                [
                    f"Llama 3 {model}",
                    world,
                    total / 1e12,
                    row["split_ms"],
                    f"{bound_over_even:.2f}",
                    row["plan_ms"],
                    f"{sent / 2**20:,.0f} MiB @ {bw / 1e9:.0f} GB/s",
                    row["comm_ms"],
                    row["floor_overlap_ms"],
                    row["floor_serial_ms"],
                    row["adamw_ms"],
                    row["train_step_ms"],
                    f"{100 * row['floor_overlap_share_of_step']:.2f}%",
                    f"{100 * row['plan_over_split_share_of_step']:.2f}%",
                ]
            )
    table = markdown_table(
        [
            "model",
            "ranks W",
            "NS TFLOP/step",
            "compute total/W ms",
            "bound / even split",
            "compute busiest rank ms",
            "sent per rank",
            "comm ms",
            "floor (overlap) ms",
            "floor (no overlap) ms",
            "AdamW step ms (HBM-bound)",
            "train step ms",
            "floor (overlap) share of step",
            "busiest over even split, share of step",
        ],
        rows,
    )
    md = (
        f"Assumptions: Newton-Schulz method {args.ns_method!r} (5 iterations, bf16); {args.gpu}, "
        f"{args.tflops:g} TFLOP/s bf16 GEMM per GPU ({source}); NVLink "
        f"{args.nvlink_gbs:g} GB/s per GPU per direction (W = 8, one node); InfiniBand {args.ib_gbs:g} GB/s per "
        f"GPU (W > 8); wire {args.wire_bytes} bytes/element; AdamW at {args.hbm_tbs:g} TB/s HBM, 28 B/param; "
        f"training step 6 x parameters x {args.tokens:,} tokens / (W x {args.mfu:.0%} MFU x "
        f"{gpu['peak_tflops']:g} TFLOP/s datasheet peak), attention FLOPs left out.\n\n" + table
    )
    print(md)
    suffix = "" if args.gpu == "H100" else f"_{args.gpu.lower()}"
    suffix += "" if args.ns_method == "standard" else f"_{args.ns_method}"
    save("roofline" + suffix, data, md)


if __name__ == "__main__":
    main()
