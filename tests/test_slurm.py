"""launch/slurm.sbatch, unchanged, under a real SLURM cluster (slurmctld + two slurmd on this machine).

What these tests prove (see docs/multinode.md):
* ``sbatch --nodes=2 --ntasks-per-node=1 launch/slurm.sbatch recipes/debug_cpu.toml ...`` finishes (COMPLETED,
  exit 0) with one torchrun per SLURM node rendezvousing on the first node; both nodes and every rank
  report in the one job log; the loss falls; the per-step losses equal those of a single-node run of the
  same recipe and world size (launch/local.sh) within ``LOSS_RTOL``.
* The same with 2 ranks per node (``--ntasks-per-node=2``) against a single-node 4-rank run.
* Requeue: submitted with ``--requeue`` and checkpoints on, the running job is requeued
  (``scontrol requeue``), released (``scontrol update starttime=now``), reruns with SLURM_RESTART_COUNT=1,
  resumes from the last complete checkpoint (its first step is checkpoint + 1, not 1) and ends with the same
  losses as the uninterrupted run.
The trainer is the real entry point (``python -m dist_marsm.train``) with recipes/debug_cpu.toml (llama3
debugmodel, MARS-M, gloo), shortened by overrides.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from slurm_cluster import _free_ports

REPO = Path(__file__).resolve().parents[1]
SBATCH = "launch/slurm.sbatch"
RECIPE = "recipes/debug_cpu.toml"

STEPS = 6  # few steps: CI has 2 cores (2x2 runs use STEPS_2X2)
STEPS_2X2 = 4
CKPT_INTERVAL = 2  # checkpoints at steps 2, 4, 6
LOSS_RTOL = 1e-5  # 2 nodes x N ranks vs 1 node x 2N ranks: same math, same gloo reductions
RESUME_RTOL = 1e-6  # resumed vs uninterrupted: checkpoint restores the full state

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def trainer_env(extra=None):
    env = {
        "TORCHRUN": f"{sys.executable} -m torch.distributed.run",
        "OMP_NUM_THREADS": "1",
        "RDZV_PORT": str(_free_ports(1)[0]),
    }
    env.update(extra or {})
    return env


def recipe() -> str:
    cfg = tomllib.loads((REPO / RECIPE).read_text())
    assert cfg["optimizer"]["name"] == "MARS-M", "the CPU debug recipe must train with MARS-M"
    return RECIPE


def overrides(dump: Path, steps: int = STEPS) -> list[str]:
    """The debug recipe shortened: a few steps, warm-up within them, checkpoints every CKPT_INTERVAL steps,
    FSDP over however many ranks the launcher starts."""
    return [
        "--training.steps",
        str(steps),
        "--lr_scheduler.warmup_steps",
        "2",
        "--dump_folder",
        str(dump),
        "--checkpoint.enable",
        "true",
        "--checkpoint.interval",
        str(CKPT_INTERVAL),
        "--parallelism.data_parallel_shard_degree",
        "-1",
    ]


def read_metrics(dump: Path) -> list[dict]:
    f = dump / "metrics.jsonl"
    return [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()] if f.exists() else []


def losses(records: list[dict]) -> dict[int, float]:
    """step -> loss, the last record of each step winning (a resumed attempt rewrites steps it repeats)."""
    return {int(r["step"]): float(r["loss"]) for r in records if "loss" in r}


def assert_close(a: dict[int, float], b: dict[int, float], rtol: float, what: str):
    assert sorted(a) == sorted(b) == list(range(1, max(b) + 1)), (what, sorted(a), sorted(b))
    worst = max(abs(a[s] - b[s]) / max(abs(b[s]), 1e-12) for s in a)
    print(f"{what}: max relative loss difference {worst:.3e} (tolerance {rtol:g})")
    assert worst <= rtol, f"{what}: {a} vs {b}"


def assert_loss_falls(ls: dict[int, float]):
    first, last = ls[1], ls[max(ls)]
    assert all(math.isfinite(v) for v in ls.values()), ls
    assert last < 0.97 * first, f"loss did not fall: {ls}"


def assert_mars_m_ran(records: list[dict]):
    """Every training step orthogonalized matrices (MARS-M's Newton-Schulz), not an AdamW fallback.
    Validation rows (``validation_loss``, no ``loss``) are not steps."""
    steps = [r for r in records if "loss" in r]
    assert steps and all(r.get("ns_matrices_total", r.get("ns_matrices", 0)) > 0 for r in steps), steps[:2]


def submit(cluster, tmp: Path, name: str, nodes: int, per_node: int, extra_sbatch=(), env=None, steps=STEPS):
    dump = tmp / name
    log = tmp / f"{name}-%j.log"
    args = [
        f"--job-name={name}",
        f"--nodes={nodes}",
        f"--ntasks-per-node={per_node}",
        f"--output={log}",
        *extra_sbatch,
        SBATCH,
        recipe(),
        *overrides(dump, steps),
    ]
    t0 = time.time()
    jobid = cluster.sbatch(args, cwd=REPO, env=trainer_env(env))
    return jobid, dump, Path(str(log).replace("%j", str(jobid))), t0


def finish(cluster, jobid, logf, t0, timeout=600):
    info = cluster.wait_job(jobid, timeout=timeout)
    took = time.time() - t0
    text = logf.read_text() if logf.exists() else "(no log)"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text[-4000:]}"
    print(f"job {jobid}: {info['JobState']} on {info['NodeList']} in {took:.1f} s")
    return info, text, took


def assert_all_took_part(text: str, nodes: int, per_node: int, restart: int = 0):
    world = nodes * per_node
    for i, n in enumerate(("n1", "n2")[:nodes]):
        assert re.search(rf"\[launch\] node={n} node_id={i} host=\S+ job=\d+ restart={restart}: starting", text), (
            f"node {n} did not start (attempt {restart}):\n{text[-4000:]}"
        )
    for r in range(world):
        assert re.search(rf"dist_marsm.train: rank {r} of {world} on \S+", text), (
            f"no start line for rank {r} of {world}:\n{text[-4000:]}"
        )


def run_local(tmp: Path, name: str, nproc: int, steps: int = STEPS) -> tuple[dict[int, float], float]:
    dump = tmp / name
    env = dict(os.environ, **trainer_env())
    env.pop("DRY_RUN", None)
    t0 = time.time()
    r = subprocess.run(
        ["bash", "launch/local.sh", str(nproc), recipe(), *overrides(dump, steps)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    took = time.time() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    print(f"single-node {nproc} ranks: {took:.1f} s")
    return losses(read_metrics(dump)), took


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("slurm_runs")


@pytest.fixture(scope="module")
def two_by_one(slurm_cluster, tmp):
    """The uninterrupted 2 nodes x 1 rank job (reference for the requeue test too)."""
    jobid, dump, logf, t0 = submit(slurm_cluster, tmp, "two_by_one", 2, 1)
    info, text, took = finish(slurm_cluster, jobid, logf, t0)
    return dict(
        jobid=jobid, info=info, log=text, records=read_metrics(dump), losses=losses(read_metrics(dump)), took=took
    )


def test_dry_run_sees_slurm_variables(slurm_cluster, tmp):
    """Under real SLURM the script reads the allocation it got: nodes, tasks per node, first node's address."""
    logf = tmp / "dry-%j.log"
    env = trainer_env({"DRY_RUN": "1", "RDZV_PORT": "29999"})
    jobid = slurm_cluster.sbatch(
        ["--nodes=2", "--ntasks-per-node=2", f"--output={logf}", SBATCH, "recipes/x.toml", "--a.b", "c d"],
        cwd=REPO,
        env=env,
    )
    slurm_cluster.wait_job(jobid, timeout=120)
    out = Path(str(logf).replace("%j", str(jobid))).read_text()
    cmd = next(ln for ln in out.splitlines() if ln.startswith("CMD: "))
    assert "--nnodes=2 --nproc_per_node=2" in cmd and "--rdzv_endpoint=127.0.0.1:29999" in cmd, out
    assert f"--rdzv_id={jobid}-0" in cmd and cmd.rstrip().endswith("--recipe recipes/x.toml --a.b c\\ d"), out
    # 2 tasks x 1 CPU per node were allocated: the one srun task per node must hold both CPUs.
    assert "srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task=2" in out, out


def test_two_nodes_one_rank_each(two_by_one, tmp):
    assert two_by_one["info"]["NodeList"] == "n[1-2]"
    assert_all_took_part(two_by_one["log"], 2, 1)
    assert_loss_falls(two_by_one["losses"])
    assert_mars_m_ran(two_by_one["records"])
    print("2x1 losses:", two_by_one["losses"])
    single, _ = run_local(tmp, "local2", 2)
    assert_close(two_by_one["losses"], single, LOSS_RTOL, "2 nodes x 1 rank vs 1 node x 2 ranks")


def test_two_nodes_two_ranks_each(slurm_cluster, tmp):
    jobid, dump, logf, t0 = submit(slurm_cluster, tmp, "two_by_two", 2, 2, steps=STEPS_2X2)
    info, text, _ = finish(slurm_cluster, jobid, logf, t0)
    assert info["NodeList"] == "n[1-2]"
    assert_all_took_part(text, 2, 2)
    dist = losses(read_metrics(dump))
    assert_loss_falls(dist)
    assert_mars_m_ran(read_metrics(dump))
    print("2x2 losses:", dist)
    single, _ = run_local(tmp, "local4", 4, steps=STEPS_2X2)
    assert_close(dist, single, LOSS_RTOL, "2 nodes x 2 ranks vs 1 node x 4 ranks")


def test_requeue_resumes_from_checkpoint(slurm_cluster, tmp, two_by_one):
    c = slurm_cluster
    jobid, dump, logf, t0 = submit(c, tmp, "requeue", 2, 1, extra_sbatch=["--requeue"])
    # Interrupt once step CKPT_INTERVAL + 1 is logged: the checkpoint of step CKPT_INTERVAL is complete then
    # (it is written at the end of its step, before the next one starts).
    deadline = time.time() + 600
    while max(losses(read_metrics(dump)), default=0) < CKPT_INTERVAL + 1:
        info = c.job(jobid)
        assert info.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), info
        assert time.time() < deadline, f"no progress: {info}"
        time.sleep(0.1)
    c.run(["scontrol", "requeue", str(jobid)])
    info = c.wait_job(jobid, until=lambda i: i.get("JobState") == "PENDING", timeout=120)
    before = losses(read_metrics(dump))
    assert max(before) < STEPS, f"the first attempt finished before the requeue took effect: {before}"
    # Checkpoints complete when the first attempt was stopped (DCP writes .metadata last).
    complete = sorted(
        int(d.name.split("-")[1]) for d in (dump / "checkpoint").glob("step-*") if (d / ".metadata").exists()
    )
    assert complete, "no complete checkpoint before the requeue"
    print(
        f"requeued after step {max(before)} (complete checkpoints {complete}): {info['JobState']} "
        f"Reason={info.get('Reason')}"
    )
    c.run(["scontrol", "update", f"jobid={jobid}", "starttime=now"])
    info, text, took = finish(c, jobid, logf, t0)
    assert info.get("Restarts") == "1", info
    assert "requeued attempt 1" in text
    first, second = text.split("restart=1 nodes=", 1)  # the launcher's header of the second attempt
    assert_all_took_part(first, 2, 1, restart=0)
    assert_all_took_part(second, 2, 1, restart=1)
    # The second attempt loads the latest complete checkpoint and goes on from the step after it.
    loaded = re.findall(r"Loading the checkpoint from \S*step-(\d+)", second)
    assert loaded and {int(x) for x in loaded} == {complete[-1]}, (loaded, complete, second[-3000:])
    first_step = int(re.search(r"step:\s+(\d+)\s+loss:", second).group(1))
    assert first_step == complete[-1] + 1, f"resumed at step {first_step}, latest complete checkpoint {complete}"
    print(f"resumed from step-{complete[-1]}, first step {first_step}; job took {took:.1f} s with the requeue")
    recs = read_metrics(dump)
    assert_mars_m_ran(recs)
    assert_close(losses(recs), two_by_one["losses"], RESUME_RTOL, "requeued+resumed vs uninterrupted")


def test_cluster_helper_stops_only_what_it_started(slurm_cluster, tmp):
    """A second private cluster starts beside the session one; stopping it ends its three daemons only."""
    from slurm_cluster import SlurmCluster

    other = SlurmCluster(tmp / "other_cluster")
    (tmp / "other_cluster").mkdir()
    try:
        other.start()
        pids = [p.pid for _, p in other.procs]
        assert len(pids) == 3
    finally:
        other.stop()
    assert other.procs == [], "daemons left running"
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert all(p.poll() is None for _, p in slurm_cluster.procs), "the session cluster was hit"
    r = slurm_cluster.run(["sinfo", "-h", "-N", "-o", "%N %t"])
    states = dict(ln.split() for ln in r.stdout.splitlines())
    assert sorted(states) == ["n1", "n2"] and not any(
        s.startswith(("down", "drain", "fail")) for s in states.values()
    ), r.stdout
