"""An invalid setting given to one rank's constructor, under torchrun: the job ends at once, and its
error report names the setting and the rank, instead of the other ranks waiting for the timeout.

MARSM's constructor takes part in no collective (optimizers are built per pipeline stage and model part,
not always on every rank, and a collective there would turn that into a hang at construction). The rank
that raises exits; torchrun's agent then stops the others. The control runs the same job with valid
settings on every rank and must train.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.slow

PG_TIMEOUT_S = 120  # a rank that waited for the others would take this long

SCRIPT = textwrap.dedent("""
    import datetime, os, sys
    import torch, torch.distributed as dist, torch.nn as nn
    from dist_marsm import MARSM
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds={timeout}))
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    lr = float(sys.argv[1]) if rank == 1 else 0.01
    opt = MARSM(model.parameters(), lr=lr)
    for step in range(3):
        model(torch.ones(4, 8)).square().mean().backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
        opt.step()
        opt.zero_grad()
    open(os.path.join(sys.argv[2], "rank%d.trained" % rank), "w").close()
    dist.destroy_process_group()
""")


def _run(tmp_path, lr: str) -> tuple[int, str, float]:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT.format(timeout=PG_TIMEOUT_S))
    start = time.monotonic()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(script),
            lr,
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=2 * PG_TIMEOUT_S,
    )
    return r.returncode, r.stdout + r.stderr, time.monotonic() - start


def test_invalid_setting_on_one_rank_ends_the_job_naming_it(tmp_path):
    rc, log, elapsed = _run(tmp_path, "-1")
    assert rc != 0
    assert "[rank1]: ValueError: MARSM: lr must be" in log and "got -1.0" in log, log[-3000:]
    assert elapsed < PG_TIMEOUT_S / 2, f"the job took {elapsed:.0f} s: a rank waited for the timeout"


def test_control_valid_settings_train(tmp_path):
    rc, log, _ = _run(tmp_path, "0.01")
    assert rc == 0, log[-3000:]
    assert (tmp_path / "rank0.trained").exists() and (tmp_path / "rank1.trained").exists(), log[-3000:]
