"""Launchers in launch/: the exact commands they would run (dry run), checked against the facts the test sets.

The SLURM batch script is run as a plain bash script with the environment SLURM gives a batch job (node list,
node count, GPUs or tasks per node, job id, restart count) and a stub ``scontrol`` that answers the two
questions the script asks (hostnames of the allocation, NodeAddr of a node).  The per-node torchrun command it
prints must carry the rendezvous endpoint on the *first* node's address, the node and rank counts, the recipe
and every override unchanged.  tests/test_slurm.py runs the same script for real under SLURM.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "launch" / "slurm.sbatch"
LOCAL = REPO / "launch" / "local.sh"

# Overrides with awkward values: spaces, quotes, a shell metacharacter, an equals sign.
OVERRIDES = ["--training.steps", "7", "--job.dump_folder", "/tmp/a dir/x;y", "--optimizer.variant", "it's=exact"]

STUB_SCONTROL = r"""#!/bin/bash
echo "$*" >> "$(dirname "$0")/scontrol.calls"
if [ "$1 $2" = "show hostnames" ]; then
    case "$3" in "gpu[07-09]") printf 'gpu07\ngpu08\ngpu09\n';; *) exit 1;; esac
elif [ "$1 $2 $3" = "show node -o" ]; then
    echo "NodeName=$4 Arch=x86_64 CoresPerSocket=8 NodeAddr=10.1.0.$((10#${4#gpu})) NodeHostName=$4 Version=22.05"
else exit 1; fi
"""


def slurm_env(tmp_path, stub="answers", **extra):
    """The environment of a batch job, SLURM-side variables from ``extra``, scontrol replaced by a stub."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    stub_path = bindir / "scontrol"
    stub_path.write_text(STUB_SCONTROL if stub == "answers" else "#!/bin/bash\nexit 1\n")
    stub_path.chmod(0o755)
    nvsmi = bindir / "nvidia-smi"  # GPUs come from SLURM's variables here, whatever this machine has
    nvsmi.write_text("#!/bin/bash\nexit 9\n")
    nvsmi.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "NPROC", "RDZV", "TRAIN_", "TORCHRUN"))}
    env.update(PATH=f"{bindir}:{env['PATH']}", DRY_RUN="1", SLURM_SUBMIT_DIR=str(REPO))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def dry_run(script, args, env):
    r = subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = {
        ln.split(": ", 1)[0]: ln.split(": ", 1)[1] for ln in r.stdout.splitlines() if ln.startswith(("CMD: ", "SRUN: "))
    }
    return r.stdout, shlex.split(lines["CMD"]), shlex.split(lines.get("SRUN", ""))


def flag(cmd, name):
    vals = [a.split("=", 1)[1] for a in cmd if a.startswith(name + "=")]
    assert len(vals) == 1, (name, cmd)
    return vals[0]


def test_scripts_parse():
    for s in (SBATCH, LOCAL):
        r = subprocess.run(["bash", "-n", str(s)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert os.access(s, os.X_OK), f"{s} is not executable"


def test_sbatch_header_is_requeue_friendly():
    directives = [ln.split(None, 1)[1] for ln in SBATCH.read_text().splitlines() if ln.startswith("#SBATCH")]
    assert "--open-mode=append" in directives  # a requeued attempt appends to the one job log
    assert any(d.startswith("--output=") and "%j" in d for d in directives)  # one log per job


def test_gpu_cluster_command(tmp_path):
    env = slurm_env(
        tmp_path,
        SLURM_JOB_ID=4242,
        SLURM_JOB_NUM_NODES=3,
        SLURM_JOB_NODELIST="gpu[07-09]",
        SLURM_GPUS_ON_NODE=8,
        SLURM_NTASKS_PER_NODE=1,
    )
    out, cmd, srun = dry_run(SBATCH, ["recipes/llama3_8b.toml", *OVERRIDES], env)
    # Rendezvous: first node of the allocation, at the address SLURM has for it; port from the job id.
    assert flag(cmd, "--rdzv_endpoint") == f"10.1.0.7:{29500 + 4242 % 1000}"
    assert flag(cmd, "--rdzv_backend") == "c10d"
    assert flag(cmd, "--rdzv_id") == "4242-0"
    assert flag(cmd, "--nnodes") == "3"
    assert flag(cmd, "--nproc_per_node") == "8"  # GPUs per node, not tasks per node
    assert cmd[0] == "torchrun"
    i = cmd.index("-m")
    assert cmd[i + 1 :] == ["dist_marsm.train", "--recipe", "recipes/llama3_8b.toml", *OVERRIDES]
    # One srun task per node; torchrun starts the node's ranks.
    assert srun[0] == "srun" and "--ntasks=3" in srun and "--ntasks-per-node=1" in srun and "--nodes=3" in srun
    assert not any(a.startswith("--cpus-per-task") for a in srun)  # SLURM_CPUS_ON_NODE not set here
    assert "backend=nccl" in out and "world=24" in out
    calls = (tmp_path / "bin" / "scontrol.calls").read_text().splitlines()
    assert "show hostnames gpu[07-09]" in calls and "show node -o gpu07" in calls


def test_cpu_cluster_uses_tasks_per_node_and_gloo(tmp_path):
    env = slurm_env(
        tmp_path,
        SLURM_JOB_ID=17,
        SLURM_JOB_NUM_NODES=2,
        SLURM_JOB_NODELIST="cpu[3,5]",
        SLURM_NTASKS_PER_NODE=2,
        SLURM_TASKS_PER_NODE="2(x2)",
        SLURM_CPUS_ON_NODE=6,
        stub="fails",
    )
    out, cmd, srun = dry_run(SBATCH, ["--recipe", "recipes/debug_cpu.toml", "--training.steps", "3"], env)
    # Without a working scontrol the script falls back to the first entry of the node list.
    assert flag(cmd, "--rdzv_endpoint") == "cpu3:29517"
    assert flag(cmd, "--nnodes") == "2" and flag(cmd, "--nproc_per_node") == "2"
    assert cmd[cmd.index("-m") + 1 :] == [
        "dist_marsm.train",
        "--recipe",
        "recipes/debug_cpu.toml",
        "--training.steps",
        "3",
    ]
    assert "backend=gloo" in out and "world=4" in out
    assert "--cpus-per-task=6" in srun  # the node's one task holds all CPUs the job has there


def test_gpus_without_gres_counted_by_nvidia_smi(tmp_path):
    env = slurm_env(tmp_path, SLURM_JOB_ID=8, SLURM_JOB_NUM_NODES=2, SLURM_JOB_NODELIST="gpu[07-09]")
    (tmp_path / "bin" / "nvidia-smi").write_text(
        '#!/bin/bash\n[ "$1" = -L ] && for i in 0 1 2 3; do echo "GPU $i: NVIDIA H100 (UUID: GPU-$i)"; done\n'
    )
    out, cmd, _ = dry_run(SBATCH, ["r.toml"], env)
    assert flag(cmd, "--nproc_per_node") == "4" and "backend=nccl" in out


def test_overrides_of_sizes_and_endpoint(tmp_path):
    env = slurm_env(
        tmp_path,
        SLURM_JOB_ID=5,
        SLURM_JOB_NUM_NODES=2,
        SLURM_JOB_NODELIST="gpu[07-09]",
        SLURM_GPUS_ON_NODE=4,
        NPROC_PER_NODE=2,
        RDZV_HOST="head-ib0",
        RDZV_PORT=31337,
        TORCHRUN=f"{sys.executable} -m torch.distributed.run",
    )
    _, cmd, _ = dry_run(SBATCH, ["r.toml"], env)
    assert flag(cmd, "--rdzv_endpoint") == "head-ib0:31337"
    assert flag(cmd, "--nproc_per_node") == "2"
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]


def test_requeued_attempt_gets_fresh_rendezvous(tmp_path):
    env = slurm_env(
        tmp_path, SLURM_JOB_ID=99, SLURM_JOB_NUM_NODES=2, SLURM_JOB_NODELIST="gpu[07-09]", SLURM_RESTART_COUNT=1
    )
    out, cmd, _ = dry_run(SBATCH, ["r.toml"], env)
    assert flag(cmd, "--rdzv_id") == "99-1"
    assert "requeued attempt 1" in out and "resumes from the latest complete checkpoint" in out


def test_sbatch_without_recipe_fails_with_usage(tmp_path):
    env = slurm_env(tmp_path, SLURM_JOB_ID=1, SLURM_JOB_NUM_NODES=1, SLURM_JOB_NODELIST="gpu[07-09]")
    env.pop("DRY_RUN")
    r = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "usage" in r.stderr
    r = subprocess.run(["bash", str(SBATCH), "no/such.toml"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "recipe not found: no/such.toml" in r.stderr


def test_local_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC", "TORCHRUN", "TRAIN_SCRIPT", "TRAIN_MODULE")}
    env["DRY_RUN"] = "1"
    _, cmd, _ = dry_run(LOCAL, ["3", "recipes/debug_cpu.toml", *OVERRIDES], env)
    assert cmd[:2] == ["torchrun", "--standalone"]
    assert flag(cmd, "--nproc_per_node") == "3" and flag(cmd, "--nnodes") == "1"
    assert cmd[cmd.index("-m") + 1 :] == ["dist_marsm.train", "--recipe", "recipes/debug_cpu.toml", *OVERRIDES]
    _, cmd, _ = dry_run(LOCAL, ["--recipe", "r.toml"], dict(env, NPROC="5"))
    assert flag(cmd, "--nproc_per_node") == "5"
    r = subprocess.run(["bash", str(LOCAL), "r.toml"], env=dict(env, NPROC="0"), capture_output=True, text=True)
    assert r.returncode == 2 and "NPROC must be a positive integer" in r.stderr


@pytest.mark.slow
def test_local_launcher_runs_ranks(tmp_path):
    """launch/local.sh for real with a stand-in trainer: 2 ranks, the override reaches every rank."""
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[job]\ndump_folder = "{tmp_path}/wrong"\n[training]\nsteps = 10\n')
    env = dict(
        os.environ,
        TRAIN_SCRIPT=str(REPO / "tests" / "standin_train.py"),
        TORCHRUN=f"{sys.executable} -m torch.distributed.run",
    )
    env.pop("DRY_RUN", None)
    r = subprocess.run(
        ["bash", str(LOCAL), "2", str(recipe), "--training.steps", "3", "--job.dump_folder", str(tmp_path / "out")],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rank=0 world_size=2" in r.stdout and "rank=1 world_size=2" in r.stdout
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3] and not (tmp_path / "wrong").exists()
