"""Pipeline parallelism (PP degree 2) of the real torchtitan Trainer with MARS-M on CPU/gloo.

torchtitan 0.3.0's pipeline schedules (here 1F1B, 2 microbatches) run on CPU with gloo: the stages
exchange activations with point-to-point send/recv, which gloo has. torchtitan builds one optimizer
per model part, so each stage's MARSM sees and plans over its own parameters only.

4 ranks = PP 2 x FSDP 2 (torchtitan's mesh puts pp outermost: stage 0 on ranks {0, 1}, stage 1 on
{2, 3}). Checked, from each rank's MARSM after its steps (tests/titan_driver.py writes the plans):
* each rank's optimizer holds exactly its stage's parameters (stage 0: tok_embeddings and the first 3
  blocks; stage 1: the last 3 blocks, norm, lm_head - the split torchtitan logs), the stages are
  disjoint and together hold every parameter of the model;
* every owner plan spans only the ranks of its own stage, and every matrix's owner is one of them;
* 15 matrices per stage (3 blocks x qkv, wo, w1, w2, w3), each orthogonalized by exactly one rank;
* a resume from the step-2 checkpoint (flat FQN keys: the stages' optimizer states do not collide)
  gives bitwise the losses of steps 3-4 of the uninterrupted run.
About 2 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os

import pytest

from tests._titan_jobs import copy_checkpoint, loaded_from, losses, run_job

pytestmark = pytest.mark.slow

PP = [
    "--training.steps",
    "4",
    "--checkpoint.interval",
    "2",
    "--parallelism.pipeline_parallel_degree",
    "2",
    "--parallelism.data_parallel_shard_degree",
    "2",
    "--parallelism.pipeline_parallel_microbatch_size",
    "1",
]
STAGE_RANKS = {0: [0, 1], 1: [2, 3]}
N_LAYERS = 6


def _stage_of(name: str) -> int:
    if name.startswith("tok_embeddings"):
        return 0
    if name.startswith("layers."):
        return 0 if int(name.split(".")[1]) < N_LAYERS // 2 else 1
    return 1


def test_pp2_fsdp2_each_stage_plans_its_own_parameters_and_resumes(tmp_path):
    dump, plans = str(tmp_path / "pp"), str(tmp_path / "plans")
    rc, log = run_job(dump, 4, PP, env={"DIST_MARSM_TEST_PLAN_DIR": plans})
    assert rc == 0, log[-4000:]
    assert "Using pipeline schedule 1F1B" in log
    ref = losses(dump)
    assert sorted(ref) == [1, 2, 3, 4] and ref[4] < ref[1]

    per_stage_names, per_stage_owned = {0: set(), 1: set()}, {0: [], 1: []}
    for rank in range(4):
        with open(os.path.join(plans, f"plan_rank{rank}.json")) as f:
            (info,) = json.load(f)  # one model part per rank, one MARSM
        stage = 0 if rank in STAGE_RANKS[0] else 1
        names = set(info["param_names"])
        assert {_stage_of(n) for n in names} == {stage}, (rank, sorted(names)[:5])
        assert all(info["dtensor"])
        if per_stage_names[stage]:
            assert names == per_stage_names[stage]  # both FSDP ranks of a stage hold the same parameters
        per_stage_names[stage] = names
        assert len(info["mars_names"]) == 5 * N_LAYERS // 2
        for plan in info["plans"]:
            assert plan["ranks"] == STAGE_RANKS[stage], (rank, plan["ranks"])
            assert set(plan["owners"]) <= names
            assert all(owner in STAGE_RANKS[stage] for owner in plan["owners"].values())
        per_stage_owned[stage].append(info["ns_matrices"])
    assert not per_stage_names[0] & per_stage_names[1]
    all_names = per_stage_names[0] | per_stage_names[1]
    assert {"tok_embeddings.weight", "norm.weight", "lm_head.weight"} <= all_names
    assert {n for n in all_names if n.startswith("layers.")} >= {f"layers.{i}.attention.wo.weight" for i in range(6)}
    assert sum(per_stage_owned[0]) == sum(per_stage_owned[1]) == 5 * N_LAYERS // 2  # each matrix once

    resumed = str(tmp_path / "resumed")
    copy_checkpoint(dump, 2, resumed)
    rc, log = run_job(resumed, 4, PP)
    assert rc == 0, log[-4000:]
    assert loaded_from(log) and all(p.endswith("step-2") for p in loaded_from(log))
    got = losses(resumed)
    assert sorted(got) == [3, 4]
    assert got[3] == ref[3] and got[4] == ref[4], (got, ref)
