"""Every command in the README's ```bash blocks, run as written where a CPU can run it, else checked as far as a
CPU allows, with the reason here. A command added to the README without an entry below fails the test, and so
does an entry whose command left the README.

The CPU commands run in a fresh directory with the checkout on PYTHONPATH: their ``recipes/X.toml`` is then not a
file there and resolves to the shipped recipe (dist_marsm.shipped), so they exercise the form a wheel user types
and no run resumes from an earlier run's checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("torchtitan")

REPO = Path(__file__).resolve().parents[1]

# command -> how it is checked. "run": as written, on CPU, and the metrics it leaves (dump folder, steps).
RUN, LAUNCH, GPU_CHECK, ELSEWHERE = "run", "launch", "gpu_check", "elsewhere"
COMMANDS = {
    "make run": (
        ELSEWHERE,
        (
            "80 steps plus `pip install -e .` (which would re-point this machine's editable "
            "install); test_make_run_is_the_documented_commands checks what it runs"
        ),
    ),
    "make test": (ELSEWHERE, "the test suite itself; .ci/run runs it"),
    "pip wheel --no-deps -w dist .": (ELSEWHERE, "tests/test_wheel.py builds the wheel the same way"),
    'pip install "$(ls dist/dist_marsm-*.whl)[titan]"': (
        ELSEWHERE,
        (
            "would replace this machine's editable install; tests/test_wheel.py installs the wheel into a "
            "fresh venv and .ci/other_torch.sh with its [titan,test] extras on torch 2.15.0"
        ),
    ),
    "python -m dist_marsm.shipped": (RUN, None),
    "python -m dist_marsm.train --recipe debug_cpu --training.steps 10": (RUN, ("outputs/debug_cpu", 10)),
    "python -m dist_marsm.train --recipe recipes/debug_cpu.toml --training.steps 10 --optimizer.gamma 0": (
        RUN,
        ("outputs/debug_cpu", 10),
    ),
    "torchrun --nproc_per_node 8 -m dist_marsm.train --recipe recipes/llama3_8b.toml": (
        GPU_CHECK,
        ("8 GPUs and Llama 3 8B; the recipe is validated for 8 ranks (--check under torchrun's RANK and WORLD_SIZE)"),
    ),
    "torchrun --nproc_per_node 2 -m torchtitan.train --module dist_marsm.titan --config debug_cpu --training.steps 10": (
        RUN,
        ("outputs/debug_cpu", 10),
    ),
    "python -m dist_marsm.train --recipe recipes/moe_debug_cpu.toml --training.steps 10": (
        RUN,
        ("outputs/moe_debug_cpu", 10),
    ),
    "python -m dist_marsm.train --recipe recipes/debug_cpu.toml --training.steps 10 --optimizer.ns_head_dim 16 "
    "--optimizer.qk_clip_tau 100": (RUN, ("outputs/debug_cpu", 10)),
    "sbatch --nodes 4 --gpus-per-node 8 launch/slurm.sbatch recipes/llama3_8b.toml": (LAUNCH, "GPU nodes"),
    "sbatch --nodes=4 --gpus-per-node=8 launch/slurm.sbatch recipes/llama3_8b.toml --training.steps 1000": (
        LAUNCH,
        "GPU nodes",
    ),
    "sbatch --requeue --nodes=4 --gpus-per-node=8 launch/slurm.sbatch recipes/llama3_8b.toml": (LAUNCH, "GPU nodes"),
    "launch/local.sh 8 recipes/llama3_8b.toml": (LAUNCH, "8 GPUs"),
    'sbatch --nodes=4 --gpus-per-node=8 "$(python -m dist_marsm.shipped slurm.sbatch)" llama3_8b': (
        LAUNCH,
        "GPU nodes",
    ),
}


def readme_commands() -> list[str]:
    """Each line of each ```bash block, its trailing comment dropped."""
    blocks = re.findall(r"^```bash\n(.*?)^```", (REPO / "README.md").read_text(), flags=re.DOTALL | re.MULTILINE)
    return [
        re.sub(r"\s+#.*$", "", line).strip()
        for block in blocks
        for line in block.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_every_readme_command_has_a_check():
    found = readme_commands()
    assert len(found) == len(set(found)), "a README command appears twice; give the entry one check"
    assert set(found) - set(COMMANDS) == set(), "README commands without an entry in COMMANDS"
    assert set(COMMANDS) - set(found) == set(), "entries whose command is no longer in the README"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizer_cache")


def _env(cache: Path, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DRY_RUN")}
    env.update(PYTHONPATH=str(REPO), DIST_MARSM_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _bash(command: str, cwd: Path, env: dict[str, str], timeout: int = 600) -> str:
    proc = subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, f"{command}\n-> {proc.returncode}\n{(proc.stdout + proc.stderr)[-6000:]}"
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c, (how, _) in COMMANDS.items() if how == RUN])
def test_cpu_command_runs_as_written(command, tmp_path, cache):
    log = _bash(command, tmp_path, _env(cache))
    expect = COMMANDS[command][1]
    if expect is None:  # python -m dist_marsm.shipped: lists every shipped recipe and launcher
        names = {p.stem for p in (REPO / "recipes").glob("*.toml")} | {p.name for p in (REPO / "launch").iterdir()}
        assert all(re.search(rf"^\s+{re.escape(n)}\s+/", log, re.MULTILINE) for n in names), log
        return
    dump, steps = expect
    rows = [r for r in map(json.loads, (tmp_path / dump / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), (rows, log[-3000:])
    assert all(math.isfinite(r["loss"]) for r in rows), rows
    # ln(vocab) is a uniform guess (7.62 for the debug models' 2048 tokens): the run starts there and learns
    assert rows[0]["loss"] > 7.0 and rows[-1]["loss"] < rows[0]["loss"] - 0.3, [r["loss"] for r in rows]


@pytest.mark.parametrize("command", [c for c, (how, _) in COMMANDS.items() if how == LAUNCH])
def test_launcher_command_builds_the_documented_job(command, cache):
    """The launcher as the command calls it, in its dry-run mode, on the sizes the sbatch options ask for."""
    words = shlex.split(command)
    if words[0] == "sbatch":
        opts = dict(re.findall(r"--(nodes|gpus-per-node)[= ](\d+)", command))
        script_and_args = re.sub(r"^sbatch( --?[a-z-]+(?:[= ]\d+)?)*\s+", "", command)
        env = _env(
            cache,
            DRY_RUN="1",
            SLURM_JOB_NUM_NODES=opts["nodes"],
            SLURM_GPUS_ON_NODE=opts["gpus-per-node"],
            SLURM_JOB_ID="123",
            SLURM_JOB_NODELIST="gpu[1-4]",
        )
        out = _bash(f"bash {script_and_args}", REPO, env)
        nodes, per_node = opts["nodes"], opts["gpus-per-node"]
        rest = shlex.split(script_and_args.replace('"$(python -m dist_marsm.shipped slurm.sbatch)"', "S"))[1:]
    else:  # launch/local.sh NPROC RECIPE ...
        out = _bash(command, REPO, _env(cache, DRY_RUN="1"))
        nodes, per_node, rest = "1", words[1], words[2:]
    cmd = next(line for line in out.splitlines() if line.startswith("CMD: "))
    assert f"--nnodes={nodes} --nproc_per_node={per_node}" in cmd, out
    assert cmd.split("-m dist_marsm.train ", 1)[1].split() == ["--recipe", *rest], out


def test_gpu_commands_recipe_validates_for_its_ranks(cache, tmp_path):
    command = next(c for c, (how, _) in COMMANDS.items() if how == GPU_CHECK)
    words = shlex.split(command)
    ranks = words[words.index("--nproc_per_node") + 1]
    train_args = words[words.index("dist_marsm.train") + 1 :]
    out = _bash(
        f"python -m dist_marsm.train {shlex.join(train_args)} --check",
        tmp_path,
        _env(cache, RANK="0", WORLD_SIZE=ranks, LOCAL_RANK="0"),
    )
    config, _ = json.JSONDecoder().raw_decode(out[out.index("{") :])
    assert config["model"]["name"] == "llama3" and config["model"]["flavor"] == "8B", config["model"]


def test_make_run_is_the_documented_commands(tmp_path):
    """`make run` = install, the CPU debug recipe in full (the 10-step README lines run the same code), the plot."""
    out = subprocess.run(
        ["make", "-n", "--no-print-directory", "run"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    lines = [line.strip() for line in out.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert lines[-2:] == [
        "python3 -m dist_marsm.train --recipe recipes/debug_cpu.toml",
        "python3 -m dist_marsm.plot outputs/debug_cpu",
    ], lines
