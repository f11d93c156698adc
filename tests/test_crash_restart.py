"""Crash and restart of a real torchtitan job with MARS-M (2 gloo ranks under torchrun, CPU).

A rank is killed with os._exit (dist_marsm.titan.fault_injection) and the job comes back from the
last *complete* checkpoint; its losses and final parameters and optimizer state must equal - bitwise -
those of an uninterrupted run of the same recipe (6 steps, checkpoints every 2 steps).

* crash mid-run under ``torchrun --max-restarts 1``: rank 1 dies at the start of step 5; torchrun
  restarts both ranks, they load step-4 and finish.
* crash while a checkpoint is written: rank 1 truncates its data file of step-4 and dies before the
  coordinator writes ``.metadata``. With no restarts left the job fails, and the folder step-4 is left
  without ``.metadata``; relaunching the same command (as a requeued SLURM job would) loads step-2,
  never the torn step-4, and ends equal to the uninterrupted run.
About 2-3 minutes on 2 cores.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests._titan_jobs import flat_full_state, loaded_from, losses, read_checkpoint, run_job

pytestmark = pytest.mark.slow

STEPS = ["--training.steps", "6", "--checkpoint.interval", "2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    dump = str(tmp_path_factory.mktemp("uninterrupted"))
    rc, log = run_job(dump, 2, STEPS)
    assert rc == 0, log[-4000:]
    return dump, losses(dump), _state(dump)


def _state(dump: str, step: int = 6) -> dict:
    state = flat_full_state(read_checkpoint(os.path.join(dump, "checkpoint", f"step-{step}")))
    return {
        k: v for k, v in state.items() if k.startswith(("optimizer.", "layers.", "tok_embeddings", "norm", "lm_head"))
    }


def _assert_same_run(dump: str, reference) -> None:
    _, ref_losses, ref_state = reference
    got = losses(dump)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    assert got == ref_losses, (got, ref_losses)
    state = _state(dump)
    assert state.keys() == ref_state.keys()
    assert any(k.endswith(".momentum") for k in state)
    different = [k for k in state if not torch.equal(state[k], ref_state[k])]
    assert not different, different[:5]


def test_rank_killed_mid_run_torchrun_restarts_and_resumes(reference, tmp_path):
    dump = str(tmp_path / "crash")
    env = {"DIST_MARSM_FAULT": "crash_at_step", "DIST_MARSM_FAULT_RANK": "1", "DIST_MARSM_FAULT_STEP": "5"}
    rc, log = run_job(dump, 2, STEPS, env=env, max_restarts=1)
    assert rc == 0, log[-4000:]
    assert "rank 1 exits with code 13 (crash_at_step: start of step 5)" in log
    loads = loaded_from(log)
    assert loads and all(p.endswith("step-4") for p in loads), loads  # restart attempt, both ranks
    _assert_same_run(dump, reference)


def test_rank_killed_while_saving_never_leaves_a_complete_looking_checkpoint(reference, tmp_path):
    dump = str(tmp_path / "crash_in_save")
    marker = str(tmp_path / "fault_fired")
    env = {
        "DIST_MARSM_FAULT": "crash_in_save",
        "DIST_MARSM_FAULT_RANK": "1",
        "DIST_MARSM_FAULT_STEP": "4",
        "DIST_MARSM_FAULT_MARKER": marker,
    }
    rc, log = run_job(dump, 2, STEPS, env=env, max_restarts=0)
    assert rc != 0, "the job should fail: a rank died and no restarts were allowed"
    assert os.path.exists(marker), log[-4000:]
    torn = os.path.join(dump, "checkpoint", "step-4")
    assert os.path.isdir(torn) and any(f.endswith(".distcp") for f in os.listdir(torn))
    assert not os.path.exists(os.path.join(torn, ".metadata")), os.listdir(torn)
    assert os.path.exists(os.path.join(dump, "checkpoint", "step-2", ".metadata"))
    # Relaunch (a requeue): the fault does not fire again (marker), the job resumes from step-2.
    rc, log = run_job(dump, 2, STEPS, env=env, max_restarts=0)
    assert rc == 0, log[-4000:]
    loads = loaded_from(log)
    assert loads and all(p.endswith("step-2") for p in loads), loads
    _assert_same_run(dump, reference)
