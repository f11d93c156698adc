"""Owner-plan balance for real Llama 3 8B and 70B shapes at 8, 64 and 512 ranks (plan only, no timing).

    python benchmarks/plan_balance.py

For each model, world size and owner policy (dist_marsm.owner_plan.assign_owners: "largest_first" = LPT,
the library default, and "round_robin" in model order): the Newton-Schulz FLOPs of the busiest rank divided
by the lower bound max(total / W, largest matrix) - 1.0 is a perfect plan. Matrices are every attention and
MLP weight (embeddings and the output head go to AdamW), one owner per matrix, as in a 1-D FSDP group.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import LLAMA3, llama3_matrix_shapes, markdown_table, save  # noqa: E402

from dist_marsm.newton_schulz import newton_schulz_flops  # noqa: E402
from dist_marsm.owner_plan import OWNER_POLICIES, assign_owners, balance_ratio  # noqa: E402

WORLDS = (8, 64, 512)


def busiest(costs: list[float], world: int, policy: str) -> tuple[float, int]:
    """(max-rank FLOPs, ranks that own nothing)."""
    owners, _ = assign_owners(costs, world, policy)
    load = [0.0] * world
    for c, o in zip(costs, owners):
        load[o] += c
    return max(load), sum(1 for x in load if x == 0)


def main():
    rows, data = [], {"rows": []}
    for model in LLAMA3:
        shapes = llama3_matrix_shapes(model)
        costs = [float(newton_schulz_flops(s)) for s in shapes]
        total, largest = sum(costs), max(costs)
        for world in WORLDS:
            bound = max(total / world, largest)
            row = {"model": model, "matrices": len(shapes), "world": world, "total_tflop": total / 1e12,
                   "bound_tflop": bound / 1e12}
            for policy in OWNER_POLICIES:
                top, idle = busiest(costs, world, policy)
                ratio = balance_ratio(shapes, world, policy)
                assert abs(ratio - top / bound) < 1e-9
                row[policy] = ratio
                row[policy + "_max_tflop"] = top / 1e12
                row[policy + "_idle_ranks"] = idle
            data["rows"].append(row)
            rows.append([f"Llama 3 {model}", len(shapes), world, total / 1e12, bound / 1e12,
                         row["largest_first_max_tflop"], f"{row['largest_first']:.3f}", row["round_robin_max_tflop"],
                         f"{row['round_robin']:.3f}", f"{row['round_robin'] / row['largest_first']:.3f}"])
    table = markdown_table(["model", "matrices", "ranks", "total NS TFLOP/step", "bound TFLOP",
                            "largest_first max-rank TFLOP", "largest_first ratio", "round_robin max-rank TFLOP",
                            "round_robin ratio", "round_robin / largest_first"], rows)
    wins = sum(1 for r in data["rows"] if r["largest_first"] < r["round_robin"] - 1e-12)
    ties = sum(1 for r in data["rows"] if abs(r["largest_first"] - r["round_robin"]) <= 1e-12)
    verdict = (f"largest_first is better in {wins} of {len(data['rows'])} cases, equal in {ties}, worse in "
               f"{len(data['rows']) - wins - ties}; worst largest_first ratio "
               f"{max(r['largest_first'] for r in data['rows']):.3f}, worst round_robin ratio "
               f"{max(r['round_robin'] for r in data['rows']):.3f}.")
    data["verdict"] = verdict
    md = ("Ratio = busiest rank's Newton-Schulz FLOPs / max(total / W, largest matrix); 1.0 is optimal. "
          "5 iterations, FLOPs per iteration 4 m^2 n + 2 m^3 (m <= n).\n\n" + table + "\n\n" + verdict)
    print(md)
    save("plan_balance", data, md)


if __name__ == "__main__":
    main()
