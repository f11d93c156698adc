"""The built wheel on its own: installed into a fresh venv, run from a directory with no repository around it.

The venv is made with --system-site-packages so it reuses this machine's torch and torchtitan instead of
downloading them again; dist_marsm itself comes only from the wheel (checked: the imported module lives in the
venv, not in the checkout, whose editable install the system site-packages may also hold).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("torchtitan")

REPO = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, env, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} -> {proc.returncode}\n{(proc.stdout + proc.stderr)[-6000:]}"
    )
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the checkout (the build writes build/ and *.egg-info beside the sources)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".git", "outputs", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".venv"
        ),
    )
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp / "dist"),
            str(src),
        ],
        cwd=tmp,
        env=dict(os.environ),
    )
    (whl,) = (tmp / "dist").glob("dist_marsm-*.whl")
    return whl


def test_wheel_holds_every_module_recipe_and_launcher(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"dist_marsm/{p.relative_to(REPO / 'dist_marsm').as_posix()}" for p in (REPO / "dist_marsm").rglob("*.py")
    }
    expected |= {f"dist_marsm/recipes/{p.name}" for p in (REPO / "recipes").glob("*.toml")}
    expected |= {f"dist_marsm/launch/{p.name}" for p in (REPO / "launch").iterdir() if p.is_file()}
    assert expected - names == set(), "missing from the wheel (pyproject.toml [tool.setuptools] packages?)"
    assert {"dist_marsm/recipes/debug_cpu.toml", "dist_marsm/launch/slurm.sbatch"} <= names
    # the launchers keep their executable bit
    info = {i.filename: i for i in zipfile.ZipFile(wheel).infolist()}
    assert (info["dist_marsm/launch/slurm.sbatch"].external_attr >> 16) & 0o111


@pytest.mark.slow
def test_installed_wheel_trains_a_shipped_recipe_by_name_outside_the_repository(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], cwd=tmp_path, env=dict(os.environ))
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "VIRTUAL_ENV")}
    env.update(
        PATH=f"{venv / 'bin'}:{env['PATH']}",
        DIST_MARSM_CACHE=str(tmp_path / "cache"),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        LOG_RANK="0,1",  # a failure shows every rank's output (and its faulthandler stack), not rank 0's only
    )
    _run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=tmp_path, env=env)
    away = tmp_path / "away"  # no recipes/, no launch/, no dist_marsm/ here or above
    away.mkdir()

    code = "import dist_marsm, dist_marsm.shipped as s; print(dist_marsm.__file__); print(s.shipped_dir('recipes'))"
    where = _run([py, "-c", code], cwd=away, env=env).split()
    assert all(Path(p).is_relative_to(venv) for p in where), where

    sbatch = Path(_run([py, "-m", "dist_marsm.shipped", "slurm.sbatch"], cwd=away, env=env).strip())
    assert sbatch.is_relative_to(venv) and sbatch.is_file()
    dry = _run(["bash", str(sbatch), "llama3_8b", "--training.steps", "5"], cwd=away, env=dict(env, DRY_RUN="1"))
    assert "-m dist_marsm.train --recipe llama3_8b --training.steps 5" in dry, dry

    log = _run(
        [
            py,
            "-m",
            "dist_marsm.train",
            "--recipe",
            "debug_cpu",
            "--training.steps",
            "3",
            "--lr_scheduler.warmup_steps",
            "1",
            "--checkpoint.enable",
            "false",
        ],
        cwd=away,
        env=env,
    )
    assert str(venv) in log  # "recipe <path>" names the shipped file it resolved to
    rows = [
        r for r in map(json.loads, (away / "outputs/debug_cpu/metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows), rows
    # ln(2048) = 7.62 is a uniform guess over the debug model's vocabulary: the first step starts near it
    assert 7.0 < rows[0]["loss"] < 8.5, rows
