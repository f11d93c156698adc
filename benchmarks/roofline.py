"""Step-time floor of distributed Newton-Schulz for Llama 3 8B and 70B on H100s (arithmetic, no timing).

    python benchmarks/roofline.py [--tflops 989] [--nvlink-gbs 450] [--ib-gbs 50] [--wire-bytes 2]

Compute: total Newton-Schulz FLOPs per optimizer step (5 iterations; per iteration on an m x n matrix with
m <= n: 2 m^2 n for X X^T, 2 m^3 for S S, 2 m^2 n for the product with X), split over W ranks, at the
H100 SXM dense bf16 tensor-core rate (989 TFLOP/s, no sparsity; NVIDIA H100 datasheet). Two compute floors:
the perfect split total / W, and the busiest rank of the library's default owner plan (largest_first), which
can never beat the largest single matrix.
Communication: each rank sends its shard of every matrix to the owner and receives its shard of the result
(bytes sent per rank = (W-1)/W x 2 x local matrix-shard bytes, in the wire dtype, bf16 by default), at a
stated per-GPU bandwidth per direction: NVLink 4 (900 GB/s bidirectional -> 450 GB/s) inside one 8-GPU node,
400 Gb/s InfiniBand (50 GB/s) per GPU across nodes (W = 64, 512).
Floor = max(compute, communication) with perfect overlap, and their sum without overlap. For scale, the
AdamW step is memory-bound: 28 bytes of HBM traffic per parameter (read p, g, m, v; write p, m, v in fp32)
over all parameters / W at 3.35 TB/s.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import LLAMA3, llama3_matrix_shapes, markdown_table, save  # noqa: E402

from dist_marsm.newton_schulz import newton_schulz_flops  # noqa: E402
from dist_marsm.owner_plan import assign_owners  # noqa: E402

WORLDS = (8, 64, 512)


def all_params(model: str) -> int:
    c = LLAMA3[model]
    matrices = sum(math.prod(s) for s in llama3_matrix_shapes(model))
    return matrices + 2 * c["vocab"] * c["dim"] + (2 * c["n_layers"] + 1) * c["dim"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tflops", type=float, default=989.0, help="bf16 dense matmul TFLOP/s per GPU (H100 SXM)")
    ap.add_argument("--nvlink-gbs", type=float, default=450.0, help="GB/s per GPU per direction inside a node")
    ap.add_argument("--ib-gbs", type=float, default=50.0, help="GB/s per GPU per direction across nodes")
    ap.add_argument("--hbm-tbs", type=float, default=3.35, help="HBM TB/s (for the AdamW reference)")
    ap.add_argument("--wire-bytes", type=int, default=2, help="bytes per element on the wire (2 = bf16)")
    args = ap.parse_args()
    rate = args.tflops * 1e12
    rows, data = [], {"assumptions": vars(args), "rows": []}
    for model in LLAMA3:
        shapes = llama3_matrix_shapes(model)
        costs = [float(newton_schulz_flops(s)) for s in shapes]
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
            t_adamw = all_params(model) * 28 / world / (args.hbm_tbs * 1e12)
            row = dict(model=model, world=world, ns_tflop=total / 1e12, split_ms=t_split * 1e3, plan_ms=t_plan * 1e3,
                       largest_matrix_ms=max(costs) / rate * 1e3, bytes_sent_per_rank=sent, link_gbs=bw / 1e9,
                       comm_ms=t_comm * 1e3, floor_overlap_ms=max(t_plan, t_comm) * 1e3,
                       floor_serial_ms=(t_plan + t_comm) * 1e3, adamw_ms=t_adamw * 1e3)
            data["rows"].append(row)
            rows.append([f"Llama 3 {model}", world, total / 1e12, row["split_ms"], row["plan_ms"],
                         f"{sent / 2**20:,.0f} MiB @ {bw / 1e9:.0f} GB/s", row["comm_ms"], row["floor_overlap_ms"],
                         row["floor_serial_ms"], row["adamw_ms"]])
    table = markdown_table(["model", "ranks W", "NS TFLOP/step", "compute total/W ms", "compute busiest rank ms",
                            "sent per rank", "comm ms", "floor (overlap) ms", "floor (no overlap) ms",
                            "AdamW step ms (HBM-bound)"], rows)
    md = (f"Assumptions: {args.tflops:g} TFLOP/s dense bf16 per H100 SXM; NVLink {args.nvlink_gbs:g} GB/s per GPU "
          f"per direction (W = 8, one node); InfiniBand {args.ib_gbs:g} GB/s per GPU (W = 64, 512); wire "
          f"{args.wire_bytes} bytes/element; AdamW at {args.hbm_tbs:g} TB/s HBM, 28 B/param.\n\n" + table)
    print(md)
    save("roofline", data, md)


if __name__ == "__main__":
    main()
