"""Checkpoint save time with and without the CRC-32 manifest, on the CPU recipe (recipes/debug_cpu.toml, 2 gloo
ranks, a real job through ``dist_marsm.train`` under torchrun).

    flock /tmp/dist_marsm_cpu.lock python benchmarks/bench_checkpoint_save.py [--jobs 2] [--steps 24]

Each job saves a full checkpoint (model + MARS-M state, about 72 MiB) at every step, with checksums at even
steps and without at odd ones (this script, as each rank, sets ``[checkpoint] verify`` per save): the two
modes alternate save by save, so a busy machine slows both alike. The time of one save is what rank 0 logs
from the start of torchtitan's save to the end of dist_marsm's (both modes log it the same way; with checksums
the save only starts a thread: each rank then checksums its own files and writes its part of the manifest while
training goes on; that thread's time is reported too, as rank 0 logs it). Step 1 (first save: allocations) is
left out. Sequence length and batch are cut to make the steps short; they do not change
what a checkpoint holds.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import markdown_table, median, save  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAVED = re.compile(r"checkpoint step-(\d+): saved in ([\d.]+) s, (checksums in the background|without checksums)")
HASHED = re.compile(r"checkpoint step-(\d+): crc32 of \d+ files? \(([\d.]+) MiB\) written by this rank in ([\d.]+) s")


def run_job(steps: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as dump:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nnodes",
            "1",
            "--nproc-per-node",
            "2",
            "--local-ranks-filter",
            "0",
            "--role",
            "rank",
            "--tee",
            "3",
            __file__,
            "--as-rank",
            "--recipe",
            "recipes/debug_cpu.toml",
            "--dump_folder",
            dump,
            "--training.steps",
            str(steps),
            "--checkpoint.interval",
            "1",
            "--checkpoint.keep_latest_k",
            "0",
            "--validator.enable",
            "false",
            "--training.seq_len",
            "64",
            "--training.local_batch_size",
            "2",
            "--lr_scheduler.warmup_steps",
            "1",
        ]
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"job failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    text = proc.stdout + proc.stderr
    hashed = {int(m[1]): (float(m[2]), float(m[3])) for m in HASHED.finditer(text)}
    saves = [
        {
            "step": int(m[1]),
            "verify": m[3] != "without checksums",
            "save_s": float(m[2]),
            "checksum_s": hashed.get(int(m[1]), (None, None))[1],
            "mib_rank0": hashed.get(int(m[1]), (None,))[0],
        }
        for m in SAVED.finditer(text)
    ]
    if [s["step"] for s in saves] != list(range(1, steps + 1)):
        raise SystemExit(f"expected one save line per step from rank 0, parsed steps {[s['step'] for s in saves]}")
    return saves


def as_rank(argv: list[str]) -> int:
    """One torchrun rank: dist_marsm.train with ``verify`` set per save (even steps on)."""
    sys.path.insert(0, str(ROOT))
    from dist_marsm import train
    from dist_marsm.titan.checkpoint import VerifiedCheckpointManager

    original = VerifiedCheckpointManager._save

    def _save(self, curr_step: int, last_step: bool = False) -> bool:
        self.verify = curr_step % 2 == 0
        return original(self, curr_step, last_step)

    VerifiedCheckpointManager._save = _save
    return train.main(argv)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="jobs (each alternates the two modes)")
    parser.add_argument("--steps", type=int, default=24, help="steps (= saves) per job")
    args = parser.parse_args()
    saves, pairs = [], []
    for job in range(args.jobs):
        got = run_job(args.steps)
        by_step = {s["step"]: s for s in got}
        pairs += [by_step[k]["save_s"] / by_step[k + 1]["save_s"] for k in range(2, args.steps, 2)]
        saves += [dict(s, job=job) for s in got if s["step"] > 1]
        print(
            f"job {job}: save s (even steps with checksums) " + " ".join(f"{s['save_s']:.3f}" for s in got), flush=True
        )
    on = [s["save_s"] for s in saves if s["verify"]]
    off = [s["save_s"] for s in saves if not s["verify"]]
    hashing = [s["checksum_s"] for s in saves if s["verify"]]
    result = {
        "saves_with": len(on),
        "saves_without": len(off),
        "median_save_s_with": median(on),
        "median_save_s_without": median(off),
        "overhead_of_medians": median(on) / median(off) - 1,
        "median_pair_ratio": median(pairs),
        "median_checksum_stage_s": median(hashing),
        "checksum_stage_share_of_save": median([s["checksum_s"] / s["save_s"] for s in saves if s["verify"]]),
        "mib_rank0": next(s["mib_rank0"] for s in saves if s["verify"]),
        "saves": saves,
    }
    rows = [
        ["with checksums", len(on), median(on), min(on), max(on)],
        ["without", len(off), median(off), min(off), max(off)],
    ]
    text = (
        markdown_table(["save", "saves", "median s", "min s", "max s"], rows)
        + f"\n\nOverhead: {100 * result['overhead_of_medians']:+.1f}% (ratio of medians - 1); median of the "
        f"ratios of adjacent saves (step 2k with / step 2k+1 without): {result['median_pair_ratio']:.3f}. "
        f"Checksums on rank 0, in a background thread after the save (its files, {result['mib_rank0']} MiB, "
        f"and its part of the manifest): median {result['median_checksum_stage_s']:.3f} s, "
        f"{100 * result['checksum_stage_share_of_save']:.1f}% of a save's time."
    )
    print(text)
    save("bench_checkpoint_save", result, text)


if __name__ == "__main__":
    if "--as-rank" in sys.argv:
        raise SystemExit(as_rank([a for a in sys.argv[1:] if a != "--as-rank"]))
    main()
