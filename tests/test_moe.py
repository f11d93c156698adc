"""MoE with MARS-M: torchtitan's deepseek_v3 ``debugmodel_cpu`` (MLA attention, 8 routed experts per MoE layer,
1 shared expert, softmax top-2 router) on 2 gloo ranks, with expert parallelism 2 and with FSDP-sharded experts.

* Equality: the parallel run equals the same model, data and steps in one process (fp32 wire, fp32
  Newton-Schulz; tolerances below with their reasons).
* Counts: each rank holds 4 whole experts of each stack and owns them, so the bytes sent per step are
  exactly those of the other (FSDP-sharded) MARS-M matrices: each is sent once to its owner in halves and
  its result once back, numel x 4 bytes in all (an independent count from the parameter shapes); the
  Newton-Schulz FLOPs of all ranks sum to the one process's, and the matrices orthogonalized add up to the
  model's (counted here from its structure).
* The recipe trains through torchtitan's Trainer; its checkpoint resumes at EP 2 with the same losses and
  loads at 1 rank (EP 1) with every tensor equal.
"""

from __future__ import annotations

import json
import math
import os
import re

import pytest

pytest.importorskip("torchtitan")

from tests._spawn import run_scenarios, scenario_cases  # noqa: E402
from tests._titan_jobs import ROOT, TINY, copy_checkpoint, losses, run_job  # noqa: E402

RECIPE = os.path.join(ROOT, "recipes", "moe_debug_cpu.toml")
# Independent count of the model's MARS-M matrices: 3 layers x 5 MLA projections (wq_a, wq_b, wkv_a, wkv_b,
# wo), the dense layer's w1, w2, w3, and per MoE layer (2) the shared expert's 3 and 3 stacks of 8 experts.
# The router gates go to AdamW (docs/moe.md).
N_MATRICES = 3 * 5 + 3 + 2 * (3 + 3 * 8)
WIRE_BYTES = 4  # float32 wire


@pytest.mark.slow
@pytest.mark.parametrize("world,scenario", scenario_cases("tests.moe_scenarios"))
def test_moe_parallel_equals_one_process(world, scenario, tmp_path, monkeypatch):
    monkeypatch.setenv("DIST_MARSM_MOE_OUT", str(tmp_path))
    results = run_scenarios("tests.moe_scenarios", [scenario], world, timeout=500)
    assert results[scenario] == [None, None], results[scenario]
    ranks = [json.loads((tmp_path / f"{scenario}_rank{r}.json").read_text()) for r in range(2)]
    single = ranks[0]["single"]
    expert_names = [n for n in ranks[0]["mars"] if ".routed_experts." in n]
    assert len(expert_names) == 6 and len(ranks[0]["mars"]) == N_MATRICES - 6 * 8 + 6
    if scenario == "expert_parallel":  # torchtitan put the experts on the EP mesh (and efsdp, size 1)
        assert all("_StridedShard" in ranks[0]["placements"][n] for n in expert_names)
    # The owners of expert matrices are their holders: rank r owns experts [4r .. 4r+3] of every stack.
    owners = {k: v for g in ranks[0]["report"] for k, v in g["owners"].items() if ".routed_experts." in k}
    assert owners == {f"{n}[{4 * r}..{4 * r + 3}]": r for n in expert_names for r in range(2)}, owners

    # Losses: fp32 everywhere; the two runs differ only in summation order (gradient reductions, tokens of
    # both ranks in one grouped GEMM), ~1e-7 relative per step.
    for got, ref in zip(ranks[0]["losses"], single["losses"]):
        assert abs(got - ref) <= 1e-5 * abs(ref), (ranks[0]["losses"], single["losses"])
    assert single["losses"][-1] < single["losses"][0] - 1.0
    # Parameters after 3 steps. MARS-M matrices (experts included): Newton-Schulz of a unit-norm momentum
    # keeps the fp32 rounding differences at ~1e-7; measured 3e-7, bound 2e-6. AdamW route: m / sqrt(v)
    # turns rounding in near-cancelling gradient entries (lm_head rows of rare tokens) into changes of up
    # to lr per step; measured 1.4e-4 at lr 0.02, bound 1e-3.
    mars = set(ranks[0]["mars"])
    for name, diff in single["max_param_diff"].items():
        assert diff <= (2e-6 if name in mars else 1e-3), (name, diff)

    dense_numel = sum(math.prod(shape) for n, shape in ranks[0]["mars"].items() if n not in expert_names)
    for step in range(3):
        sent = [r["stats"][step]["bytes_sent"] for r in ranks]
        assert sum(sent) == WIRE_BYTES * dense_numel, (sent, dense_numel)  # zero bytes for the experts
        assert sum(r["stats"][step]["ns_matrices"] for r in ranks) == N_MATRICES
        assert single["stats"][step]["ns_matrices"] == N_MATRICES and single["stats"][step]["bytes_sent"] == 0
    per_rank = [row for g in ranks[0]["report"] for row in g["per_rank"]]
    single_flops = sum(row["ns_flops"] for g in single["report"] for row in g["per_rank"])
    assert sum(row["ns_flops"] for row in per_rank) == single_flops
    assert max(row["ns_flops"] for row in per_rank) < 0.51 * single_flops  # and the work is split


# The MoE recipe's own dtypes (bf16 Newton-Schulz and wire), unlike the float32 SMALL of _titan_jobs.
MOE_SMALL = [*TINY, "--training.steps", "8", "--checkpoint.interval", "4"]


def _trainer(dump: str, nproc: int, extra: list[str], env: dict | None = None) -> str:
    code, log = run_job(dump, nproc, extra, env, recipe=RECIPE, base=MOE_SMALL)
    assert code == 0, log[-5000:]
    return log


@pytest.mark.slow
def test_moe_recipe_trains_resumes_and_reshards(tmp_path):
    full = str(tmp_path / "ep2")
    log = _trainer(full, 2, [])
    assert "ep=2" in log, log[-3000:]  # torchtitan built the expert-parallel mesh
    ref = losses(full)
    assert sorted(ref) == list(range(1, 9)) and all(math.isfinite(v) for v in ref.values())
    assert ref[1] > 7.5 and (ref[7] + ref[8]) / 2 < ref[1] - 0.3, ref  # ln(2048) = 7.62: a uniform guess
    rows = [json.loads(line) for line in open(os.path.join(full, "metrics.jsonl")) if line.strip()]
    assert all(r["ns_matrices_total"] == N_MATRICES for r in rows if "loss" in r)

    resumed = str(tmp_path / "resume_ep2")
    copy_checkpoint(full, 4, resumed)
    _trainer(resumed, 2, [])
    assert losses(resumed) == {s: ref[s] for s in range(5, 9)}  # resume at EP 2: the same losses, bit for bit

    one = str(tmp_path / "one_rank")
    copy_checkpoint(full, 4, one)
    verify = str(tmp_path / "verify.json")
    # torchtitan 0.3.0's dataloader cannot change its dp degree: its state is not loaded (data restarts).
    _trainer(
        one,
        1,
        ["--parallelism.data_parallel_shard_degree", "1", "--parallelism.expert_parallel_degree", "1"],
        env={"DIST_MARSM_TEST_EXCLUDE_FROM_LOADING": "dataloader", "DIST_MARSM_TEST_VERIFY_LOAD": verify},
    )
    check = json.loads(open(verify).read())
    assert check["step_dir"].endswith("step-4") and not check["missing"], check
    assert check["compared"] > 2 * 30 + 15  # model and optimizer tensors (30 MARS-M matrices, 17 others)
    assert check["max_abs_diff"] == 0.0  # resharding EP 2 x FSDP 2 -> one process moves bytes only
    got = losses(one)
    assert sorted(got) == [5, 6, 7, 8] and all(math.isfinite(v) and v < ref[1] for v in got.values()), got


def test_routing_per_parameter_kind():
    """build_param_groups on the real deepseek_v3 MoE model (meta device): each kind on its route."""
    import torch
    from torchtitan.models import deepseek_v3

    from dist_marsm import build_param_groups
    from dist_marsm.titan import moe

    moe.register_flavors()
    with torch.device("meta"):
        model = deepseek_v3.model_registry(moe.FLAVOR).model.build()
    groups = build_param_groups(model)
    mars = set(next(g for g in groups if g["use_mars"])["param_names"])
    adamw = set(next(g for g in groups if not g["use_mars"])["param_names"])
    assert mars | adamw == {n for n, _ in model.named_parameters()} and not mars & adamw
    kinds = {
        "routed experts": (r"\.moe\.routed_experts\.inner_experts\.w[123]_E", True),
        "shared experts": (r"\.moe\.shared_experts\.w[123]\.weight$", True),
        "MLA low-rank": (r"\.attention\.(wq_a|wq_b|wkv_a|wkv_b)\.weight$", True),
        "router gate": (r"\.moe\.router\.gate\.weight$", False),
        "MLA norms": (r"\.attention\.(q_norm|kv_norm)\.weight$", False),
    }
    for kind, (pattern, on_mars) in kinds.items():
        names = [n for n in mars | adamw if re.search(pattern, n)]
        assert (
            len(names)
            == {"routed experts": 6, "shared experts": 6, "MLA low-rank": 12, "router gate": 2, "MLA norms": 6}[kind]
        ), (kind, names)
        assert all((n in mars) == on_mars for n in names), (kind, names)
    buffers = {n for n, _ in model.named_buffers()}
    assert {"layers.1.moe.expert_bias_E", "layers.1.moe.tokens_per_expert_E"} <= buffers
    assert not buffers & (mars | adamw)  # buffers are no optimizer's
    assert len(mars) == 30
