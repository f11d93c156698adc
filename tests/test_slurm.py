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
The trainer is the real entry point (``python -m dist_marsm.train``) with the CPU debug recipe when present;
until it lands, tests/standin_train.py (same outside contract) stands in - the test output says which.
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
REAL_RECIPE = REPO / "recipes" / "debug_cpu.toml"
REAL = REAL_RECIPE.exists() and (REPO / "dist_marsm" / "train.py").exists()

STEPS = 6            # few steps: CI has 2 cores
CKPT_INTERVAL = 2    # checkpoints at steps 2, 4, 6
LOSS_RTOL = 1e-5     # 2 nodes x N ranks vs 1 node x 2N ranks: same math, same gloo reductions
RESUME_RTOL = 1e-6   # resumed vs uninterrupted: checkpoint restores the full state

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def trainer_env(extra=None):
    env = {"TORCHRUN": f"{sys.executable} -m torch.distributed.run", "OMP_NUM_THREADS": "1",
           "RDZV_PORT": str(_free_ports(1)[0])}
    if not REAL:
        env["TRAIN_SCRIPT"] = str(REPO / "tests" / "standin_train.py")
        env["STANDIN_STEP_SLEEP"] = "1.0"  # slow enough to requeue mid-run
    env.update(extra or {})
    return env


def recipe(tmp: Path) -> str:
    if REAL:
        cfg = tomllib.loads(REAL_RECIPE.read_text())
        assert cfg["optimizer"]["name"] == "MARS-M", "the CPU debug recipe must train with MARS-M"
        return str(REAL_RECIPE)
    p = tmp / "standin.toml"
    p.write_text('[job]\ndump_folder = "unset"\n[training]\nsteps = 100\n'
                 '[checkpoint]\nenable = false\nfolder = "checkpoint"\ninterval = 100\n')
    return str(p)


def overrides(dump: Path) -> list[str]:
    return ["--training.steps", str(STEPS), "--job.dump_folder", str(dump),
            "--checkpoint.enable", "true", "--checkpoint.interval", str(CKPT_INTERVAL)]


def read_metrics(dump: Path) -> list[dict]:
    f = dump / "metrics.jsonl"
    return [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()] if f.exists() else []


def losses(records: list[dict]) -> dict[int, float]:
    """step -> loss, the last record of each step winning (a resumed attempt rewrites steps it repeats)."""
    return {int(r["step"]): float(r["loss"]) for r in records if "loss" in r}


def assert_close(a: dict[int, float], b: dict[int, float], rtol: float, what: str):
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1)), (what, sorted(a), sorted(b))
    worst = max(abs(a[s] - b[s]) / max(abs(b[s]), 1e-12) for s in a)
    print(f"{what}: max relative loss difference {worst:.3e} (tolerance {rtol:g})")
    assert worst <= rtol, f"{what}: {a} vs {b}"


def assert_loss_falls(ls: dict[int, float]):
    first, last = ls[1], ls[max(ls)]
    assert all(math.isfinite(v) for v in ls.values()), ls
    assert last < 0.97 * first, f"loss did not fall: {ls}"


def submit(cluster, tmp: Path, name: str, nodes: int, per_node: int, extra_sbatch=(), env=None):
    dump = tmp / name
    log = tmp / f"{name}-%j.log"
    args = [f"--job-name={name}", f"--nodes={nodes}", f"--ntasks-per-node={per_node}", f"--output={log}",
            *extra_sbatch, SBATCH, recipe(tmp), *overrides(dump)]
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
        assert re.search(rf"\[launch\] node={n} node_id={i} host=\S+ job=\d+ restart={restart}: starting", text), \
            f"node {n} did not start (attempt {restart}):\n{text[-4000:]}"
    for r in range(world):
        assert re.search(rf"rank\W+{r}\b.*world\w*\W+{world}\b", text, re.IGNORECASE), \
            f"no start line for rank {r} of {world}:\n{text[-4000:]}"


def run_local(tmp: Path, name: str, nproc: int) -> tuple[dict[int, float], float]:
    dump = tmp / name
    env = dict(os.environ, **trainer_env())
    env.pop("DRY_RUN", None)
    t0 = time.time()
    r = subprocess.run(["bash", "launch/local.sh", str(nproc), recipe(tmp), *overrides(dump)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
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
    return dict(jobid=jobid, info=info, log=text, losses=losses(read_metrics(dump)), took=took)


def test_trainer_in_use():
    print("trainer:", "python -m dist_marsm.train + recipes/debug_cpu.toml" if REAL else
          "tests/standin_train.py (the real entry point has not landed)")


def test_dry_run_sees_slurm_variables(slurm_cluster, tmp):
    """Under real SLURM the script reads the allocation it got: nodes, tasks per node, first node's address."""
    logf = tmp / "dry-%j.log"
    env = trainer_env({"DRY_RUN": "1", "RDZV_PORT": "29999"})
    jobid = slurm_cluster.sbatch(["--nodes=2", "--ntasks-per-node=2", f"--output={logf}", SBATCH,
                                  "recipes/x.toml", "--a.b", "c d"], cwd=REPO, env=env)
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
    print("2x1 losses:", two_by_one["losses"])
    single, _ = run_local(tmp, "local2", 2)
    assert_close(two_by_one["losses"], single, LOSS_RTOL, "2 nodes x 1 rank vs 1 node x 2 ranks")


def test_two_nodes_two_ranks_each(slurm_cluster, tmp):
    jobid, dump, logf, t0 = submit(slurm_cluster, tmp, "two_by_two", 2, 2)
    info, text, _ = finish(slurm_cluster, jobid, logf, t0)
    assert info["NodeList"] == "n[1-2]"
    assert_all_took_part(text, 2, 2)
    dist = losses(read_metrics(dump))
    assert_loss_falls(dist)
    single, _ = run_local(tmp, "local4", 4)
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
    print(f"requeued at step {max(before)}: {info['JobState']} Reason={info.get('Reason')}")
    c.run(["scontrol", "update", f"jobid={jobid}", "starttime=now"])
    info, text, took = finish(c, jobid, logf, t0)
    assert info.get("Restarts") == "1", info
    assert_all_took_part(text, 2, 1, restart=0)
    assert_all_took_part(text, 2, 1, restart=1)
    assert "requeued attempt 1" in text
    # The second attempt starts right after a complete checkpoint, not from step 1.
    recs = read_metrics(dump)
    steps = [int(r["step"]) for r in recs]
    resets = [i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
    first_resumed = steps[resets[-1]] if resets else steps[0]
    assert first_resumed > 1 and (first_resumed - 1) % CKPT_INTERVAL == 0 and first_resumed - 1 <= max(before), \
        f"resumed at step {first_resumed} (metrics steps {steps}, first attempt reached {max(before)})"
    print(f"resumed at step {first_resumed}; job took {took:.1f} s with the requeue")
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
    assert sorted(states) == ["n1", "n2"] and not any(s.startswith(("down", "drain", "fail")) for s in
                                                      states.values()), r.stdout
