"""Helpers for the tests that run torchtitan's Trainer through tests/titan_driver.py under torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "tests", "titan_driver.py")
RECIPE = os.path.join(ROOT, "recipes", "debug_cpu.toml")

# Tiny and fast: 2 sequences of 64 tokens per rank, no validation, every checkpoint kept.
TINY = [
    "--training.seq_len",
    "64",
    "--training.local_batch_size",
    "2",
    "--lr_scheduler.warmup_steps",
    "1",
    "--validator.enable",
    "false",
    "--checkpoint.keep_latest_k",
    "0",
]
# TINY with float32 Newton-Schulz and wire.
SMALL = [
    *TINY,
    "--optimizer.ns_dtype",
    "float32",
    "--optimizer.wire_dtype",
    "float32",
]


def run_job(
    dump: str,
    nproc: int,
    overrides: list[str] | None = None,
    env: dict | None = None,
    max_restarts: int = 0,
    timeout: float = 420,
    recipe: str = RECIPE,
    base: list[str] | None = None,
) -> tuple[int, str]:
    """torchrun (standalone) of the driver on ``recipe`` with ``base`` (default SMALL), then ``overrides``;
    returns (exit code, combined log)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        "--max-restarts",
        str(max_restarts),
        "--monitor-interval",
        "0.5",
        DRIVER,
        "--recipe",
        recipe,
        "--dump_folder",
        dump,
        *(SMALL if base is None else base),
        *(overrides or []),
    ]
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    full_env.update(env or {})
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    os.makedirs(dump, exist_ok=True)
    with open(os.path.join(dump, "job.log"), "a") as f:
        f.write(log)
    return proc.returncode, log


def losses(dump: str) -> dict[int, float]:
    """step -> loss from rank 0's metrics.jsonl."""
    out = {}
    with open(os.path.join(dump, "metrics.jsonl")) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                out[int(row["step"])] = float(row["loss"])
    return out


def read_checkpoint(step_dir: str) -> dict:
    """A DCP checkpoint folder read back in this process (no process group) as full tensors."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "full.pt")
        dcp_to_torch_save(step_dir, path)
        return torch.load(path, weights_only=False)


def flat_full_state(state: dict, prefix: str = "") -> dict:
    """Nested checkpoint dict -> {dotted key: tensor} (non-tensors dropped)."""
    out = {}
    for k, v in state.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_full_state(v, key + "."))
        elif torch.is_tensor(v):
            out[key] = v
    return out


def copy_checkpoint(src_dump: str, step: int, dst_dump: str) -> None:
    """A fresh dump folder holding only checkpoint step-<step> of another run."""
    shutil.rmtree(dst_dump, ignore_errors=True)
    shutil.copytree(
        os.path.join(src_dump, "checkpoint", f"step-{step}"), os.path.join(dst_dump, "checkpoint", f"step-{step}")
    )


def loaded_from(log: str) -> list[str]:
    """Checkpoint folders torchtitan reported loading from (one line per rank and attempt)."""
    return [
        line.split("Loading the checkpoint from ", 1)[1].rstrip(". \n")
        for line in log.splitlines()
        if "Loading the checkpoint from " in line
    ]
