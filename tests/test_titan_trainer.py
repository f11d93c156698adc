"""The real torchtitan Trainer with MARS-M on 2 spawned gloo ranks, through the project's entry points.

``python -m dist_marsm.train`` launches the local 2-rank job itself (torch.distributed.run), exactly as
a user runs the main job; a shortened debug recipe (8 steps) keeps it to about a minute on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchtitan")

ROOT = Path(__file__).resolve().parents[1]
# Independent fact about torchtitan's llama3 debugmodel: 6 layers x (wqkv, wo, w1, w2, w3) matrices go to
# MARS-M; embeddings, lm_head and the 13 RMSNorm weights go to MARSM's AdamW route.
N_MARS_MATRICES = 6 * 5


def _env(tmp_path):
    env = dict(os.environ, DIST_MARSM_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


@pytest.mark.slow
def test_main_job_trains_with_marsm(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "dist_marsm.train",
        "--recipe",
        "recipes/debug_cpu.toml",
        "--training.steps",
        "8",
        "--lr_scheduler.warmup_steps",
        "2",
        "--checkpoint.interval",
        "4",
        "--validator.freq",
        "4",
        "--dump_folder",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]

    host = socket.gethostname()
    # rank 0's output only (as torchtitan's launcher), each step's console line once
    assert f"dist_marsm.train: rank 0 of 2 on {host}" in log and "rank 1 of 2" not in log
    assert sum(1 for line in log.splitlines() if "step:  3  loss:" in line) == 1, log[-3000:]
    # torchtitan's container built MARSM for the matrices and its AdamW route for the rest
    assert f"Optimizer MARSM (model_part=0): {N_MARS_MATRICES} params" in log
    assert "Optimizer MARSM (model_part=0): 15 params" in log

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in records if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(x) for x in losses)
    # ln(2048) = 7.62 is the loss of a uniform guess over the vocabulary; training must get well below it
    assert losses[0] > 7.5 and (losses[-1] + losses[-2]) / 2 < losses[0] - 0.4, losses
    for r in rows:
        # every step: each MARS-M matrix orthogonalized exactly once across the 2 ranks
        assert r["ns_matrices_total"] == N_MARS_MATRICES
        assert 0 < r["ns_matrices"] < N_MARS_MATRICES  # and the work is split between the ranks
        assert r["marsm_step_time_s"] > 0 and r["optimizer_time_s"] >= r["marsm_step_time_s"]
        assert r["bytes_sent"] > 0
        assert "lr/MARSM/0" in r and "lr/MARSM/1" in r
    # lm_head init: truncated normal, std dim^-1/2 -> rows of l2 norm ~1 -> norm ~ sqrt(256) x (max row ~1.1)
    assert 12 < rows[0]["output_rms_inf_norm"] < 30

    plot = subprocess.run(
        [sys.executable, "-m", "dist_marsm.plot", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert plot.returncode == 0, plot.stderr
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    val = [r for r in records if "validation_loss" in r]
    assert [v["step"] for v in val] == [1, 4, 8]
    assert val[-1]["validation_loss"] < val[0]["validation_loss"]
    assert (out / "checkpoint" / "step-4").is_dir() and (out / "checkpoint" / "step-8").is_dir()


@pytest.mark.slow
def test_torchtitan_train_module_entry(tmp_path):
    """``python -m torchtitan.train --module dist_marsm.titan --config debug_cpu`` runs MARS-M too."""
    out = tmp_path / "tt"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "torchtitan.train",
        "--module",
        "dist_marsm.titan",
        "--config",
        "debug_cpu",
        "--training.steps",
        "2",
        "--lr_scheduler.warmup_steps",
        "1",
        "--optimizer.gamma",
        "0",
        "--dump_folder",
        str(out),
        "--checkpoint.no-enable",
        "--validator.no-enable",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert "--optimizer.gamma" in " ".join(cmd) and all(r["ns_matrices_total"] > 0 for r in rows)
    assert all(r["ns_matrices_total"] == N_MARS_MATRICES for r in rows)
