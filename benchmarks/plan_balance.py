"""Owner-plan balance for real Llama 3 8B and 70B shapes at 8 to 1024 ranks (plan and arithmetic, no timing).

    python benchmarks/plan_balance.py [--ns-method gram]

For each model, world size W and owner policy (dist_marsm.owner_plan.assign_owners: "largest_first" = LPT,
the library default, and "round_robin" in model order), with one owner per matrix as in a 1-D FSDP group
(every attention and MLP weight; embeddings and the output head go to AdamW):
- policy / bound: the busiest rank's Newton-Schulz FLOPs over the lower bound max(total / W, largest matrix);
  1.0 means the policy is as good as any one-owner-per-matrix plan can be.
- bound / even split: max(total / W, largest matrix) over total / W; above 1.0 the design itself (a matrix
  is never split between owners) keeps the busiest rank above an even split, whatever the policy.
- what the busiest rank costs over the even split, in ms at each GPU's GEMM rate (benchmarks/_common.GPUS),
  and as a share of a training step of TOKENS_PER_STEP tokens (6 x parameters x tokens FLOPs, split over W
  GPUs at MFU of the datasheet peak; the optimizer step is taken to run after the backward, not under it).
"""

from __future__ import annotations

import argparse
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
from dist_marsm.owner_plan import OWNER_POLICIES, assign_owners, balance_ratio  # noqa: E402

WORLDS = (8, 64, 128, 256, 512, 1024)
SHARES = (0.01, 0.05)  # "matters": the bound's excess over the even split reaches this share of a step


def loads(costs: list[float], world: int, policy: str) -> list[float]:
    owners, _ = assign_owners(costs, world, policy)
    load = [0.0] * world
    for c, o in zip(costs, owners):
        load[o] += c
    return load


def world_where_bound_costs(share: float, model: str, total: float, largest: float, gpu: str) -> float:
    """W at which (largest - total / W) at the GPU's GEMM rate is ``share`` of a training step.

    Solves (largest - total / W) / gemm = share x F / W, with F / W the step's seconds (F = train_step_seconds
    at W = 1): W = (share x F x gemm + total) / largest.
    """
    gemm = GPUS[gpu]["gemm_tflops"] * 1e12
    return (share * train_step_seconds(model, 1, gpu) * gemm + total) / largest


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--ns-method",
        choices=NS_METHODS,
        default="standard",
        help="Newton-Schulz method the FLOPs are counted for (bf16, 5 steps, muon coefficients)",
    )
    method = ap.parse_args().ns_method
    balance_rows, cost_rows, data = (
        [],
        [],
        {
            "rows": [],
            "crossovers": [],
            "gpus": GPUS,
            "ns_method": method,
            "tokens_per_step": TOKENS_PER_STEP,
            "mfu": MFU,
        },
    )
    for model in LLAMA3:
        shapes = llama3_matrix_shapes(model)
        costs = [float(newton_schulz_flops(s, 5, method)) for s in shapes]
        total, largest = sum(costs), max(costs)
        for world in WORLDS:
            even = total / world
            bound = max(even, largest)
            row = {
                "model": model,
                "matrices": len(shapes),
                "world": world,
                "total_tflop": total / 1e12,
                "even_split_tflop": even / 1e12,
                "largest_tflop": largest / 1e12,
                "bound_tflop": bound / 1e12,
                "bound_over_even_split": bound / even,
            }
            for policy in OWNER_POLICIES:
                load = loads(costs, world, policy)
                ratio = balance_ratio(shapes, world, policy, ns_method=method)
                assert abs(ratio - max(load) / bound) < 1e-9
                row[policy] = ratio
                row[policy + "_max_tflop"] = max(load) / 1e12
                row[policy + "_idle_ranks"] = sum(1 for x in load if x == 0)
            busiest = row["largest_first_max_tflop"] * 1e12
            for gpu, g in GPUS.items():
                rate = g["gemm_tflops"] * 1e12
                step = train_step_seconds(model, world, gpu)
                row[gpu] = {
                    "even_split_ms": even / rate * 1e3,
                    "busiest_ms": busiest / rate * 1e3,
                    "over_even_ms": (busiest - even) / rate * 1e3,
                    "train_step_ms": step * 1e3,
                    "busiest_share_of_step": busiest / rate / step,
                    "over_even_share_of_step": (busiest - even) / rate / step,
                }
            data["rows"].append(row)
            balance_rows.append(
                [
                    f"Llama 3 {model}",
                    len(shapes),
                    world,
                    total / 1e12,
                    even / 1e12,
                    largest / 1e12,
                    f"{row['bound_over_even_split']:.2f}",
                    row["largest_first_max_tflop"],
                    f"{row['largest_first']:.3f}",
                    f"{row['round_robin']:.3f}",
                    row["largest_first_idle_ranks"],
                ]
            )
            h100, h200 = row["H100"], row["H200"]
            cost_rows.append(
                [
                    f"Llama 3 {model}",
                    world,
                    f"{row['bound_over_even_split']:.2f}",
                    h100["even_split_ms"],
                    h100["busiest_ms"],
                    h100["over_even_ms"],
                    h200["even_split_ms"],
                    h200["busiest_ms"],
                    h200["over_even_ms"],
                    h100["train_step_ms"],
                    f"{100 * h100['busiest_share_of_step']:.2f}%",
                    f"{100 * h100['over_even_share_of_step']:.2f}%",
                    f"{100 * h200['busiest_share_of_step']:.2f}%",
                    f"{100 * h200['over_even_share_of_step']:.2f}%",
                ]
            )
        cross = {"model": model, "bound_exceeds_even_split_above_world": total / largest}
        for gpu in GPUS:
            for share in SHARES:
                cross[f"{gpu}_world_at_{share:g}_of_step"] = world_where_bound_costs(share, model, total, largest, gpu)
        data["crossovers"].append(cross)
    balance = markdown_table(
        [
            "model",
            "matrices",
            "ranks W",
            "total NS TFLOP/step",
            "even split TFLOP (total/W)",
            "largest matrix TFLOP",
            "bound / even split",
            "largest_first max-rank TFLOP",
            "largest_first / bound",
            "round_robin / bound",
            "idle ranks (largest_first)",
        ],
        balance_rows,
    )
    cost = markdown_table(
        [
            "model",
            "ranks W",
            "bound / even split",
            "H100 even split ms",
            "H100 busiest rank ms",
            "H100 over even ms",
            "H200 even split ms",
            "H200 busiest rank ms",
            "H200 over even ms",
            "train step ms",
            "H100 NS share of step",
            "H100 over-even share",
            "H200 NS share of step",
            "H200 over-even share",
        ],
        cost_rows,
    )
    cross_lines = []
    for c in data["crossovers"]:
        parts = [f"{gpu} {c[f'{gpu}_world_at_{s:g}_of_step']:,.0f} ({100 * s:g}%)" for gpu in GPUS for s in SHARES]
        cross_lines.append(
            f"- Llama 3 {c['model']}: the largest matrix exceeds the even split above "
            f"W = {c['bound_exceeds_even_split_above_world']:.0f}; its excess reaches a share of the "
            f"step at W = " + ", ".join(parts) + "."
        )
    wins = sum(1 for r in data["rows"] if r["largest_first"] < r["round_robin"] - 1e-12)
    ties = sum(1 for r in data["rows"] if abs(r["largest_first"] - r["round_robin"]) <= 1e-12)
    verdict = (
        f"largest_first is better in {wins} of {len(data['rows'])} cases, equal in {ties}, worse in "
        f"{len(data['rows']) - wins - ties}; worst largest_first / bound "
        f"{max(r['largest_first'] for r in data['rows']):.3f}, worst round_robin / bound "
        f"{max(r['round_robin'] for r in data['rows']):.3f}."
    )
    data["verdict"] = verdict
    gpu_lines = "\n".join(
        f"- {gpu}: {g['gemm_tflops']:g} TFLOP/s for Newton-Schulz ({g['source']})" for gpu, g in GPUS.items()
    )
    md = (
        f"Newton-Schulz method {method!r}, 5 iterations, bf16 (FLOPs: dist_marsm.newton_schulz."
        "newton_schulz_flops; standard: 4 m^2 n + 2 m^3 per iteration, m <= n); one owner per matrix. "
        "policy / bound = busiest rank / max(total / W, largest matrix) (1.0: no plan does better); "
        "bound / even split = max(total / W, largest matrix) / (total / W) (above 1.0 the one-owner-per-matrix "
        "design, not the policy, holds the busiest rank above an even split).\n\n"
        + balance
        + "\n\n"
        + verdict
        + '\n\nWhat it costs (largest_first plan). "over even" = busiest rank minus even split. Training step = '
        f"6 x parameters x {TOKENS_PER_STEP:,} tokens / (W x {MFU:.0%} MFU x 989 TFLOP/s datasheet peak, the "
        "same for both GPUs), attention FLOPs left out; parameters 8B "
        f"{llama3_params('8B') / 1e9:.2f} G, 70B {llama3_params('70B') / 1e9:.2f} G. The share assumes the "
        "optimizer step runs after the backward (not hidden under it). GEMM rates:\n"
        + gpu_lines
        + "\n\n"
        + cost
        + "\n\nWhere the single-matrix bound starts to matter:\n"
        + "\n".join(cross_lines)
    )
    print(md)
    save("plan_balance" if method == "standard" else f"plan_balance_{method}", data, md)


if __name__ == "__main__":
    main()
