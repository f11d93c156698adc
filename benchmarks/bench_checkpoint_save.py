"""Checkpoint save time with and without the CRC-32 manifest, on the CPU recipe (recipes/debug_cpu.toml, 2 gloo
ranks, a real job through ``python -m dist_marsm.train``).

    flock /tmp/dist_marsm_cpu.lock python benchmarks/bench_checkpoint_save.py [--repeats 2] [--steps 12]

Each job saves a full checkpoint (model + MARS-M state, about 72 MiB) at every step; jobs with
``--checkpoint.verify true`` and ``false`` alternate, ``--repeats`` of each. The time of one save is what rank 0
logs from the start of torchtitan's save to the end of dist_marsm's (both modes log it the same way; with
checksums it includes hashing this rank's files, gathering the digests and writing the manifest on rank 0).
The first save of each job is left out (allocations on first use). Sequence length and batch are cut to make
the steps short; they do not change what a checkpoint holds.
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
LINE = re.compile(r"checkpoint step-(\d+): saved (with|without) checksums(?:, | in )([\d.]+) s"
                  r"(?: after the save began \(crc32 of (\d+) files?, ([\d.]+) MiB on this rank: ([\d.]+) s\))?")


def run_job(verify: bool, steps: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as dump:
        cmd = [sys.executable, "-m", "dist_marsm.train", "--recipe", "recipes/debug_cpu.toml", "--dump_folder", dump,
               "--training.steps", str(steps), "--checkpoint.interval", "1", "--checkpoint.keep_latest_k", "0",
               "--validator.enable", "false", "--training.seq_len", "64", "--training.local_batch_size", "2",
               "--checkpoint.verify", str(verify).lower()]
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise SystemExit(f"job failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    saves = []
    for m in LINE.finditer(proc.stdout + proc.stderr):
        saves.append({"step": int(m[1]), "verify": m[2] == "with", "save_s": float(m[3]),
                      "checksum_s": float(m[6]) if m[6] else None, "mib_rank0": float(m[5]) if m[5] else None})
    if len(saves) != steps:
        raise SystemExit(f"expected {steps} save lines from rank 0, parsed {len(saves)}")
    return saves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="jobs per mode (alternating)")
    parser.add_argument("--steps", type=int, default=12, help="steps (= saves) per job")
    args = parser.parse_args()
    saves = []
    for repeat in range(args.repeats):
        for verify in (True, False):
            job = run_job(verify, args.steps)
            saves += [dict(s, job=repeat) for s in job if s["step"] > 1]
            print(f"job {repeat} verify={verify}: save s " + " ".join(f"{s['save_s']:.3f}" for s in job), flush=True)
    on = [s["save_s"] for s in saves if s["verify"]]
    off = [s["save_s"] for s in saves if not s["verify"]]
    hashing = [s["checksum_s"] for s in saves if s["verify"]]
    result = {"saves_per_mode": len(on), "median_save_s_with": median(on), "median_save_s_without": median(off),
              "overhead": median(on) / median(off) - 1, "median_checksum_stage_s": median(hashing),
              "checksum_stage_share_of_save": median([s["checksum_s"] / s["save_s"] for s in saves if s["verify"]]),
              "mib_rank0": saves[0]["mib_rank0"] if saves[0]["verify"] else None, "saves": saves}
    rows = [["with checksums", len(on), median(on), min(on), max(on)],
            ["without", len(off), median(off), min(off), max(off)]]
    text = (markdown_table(["save", "saves", "median s", "min s", "max s"], rows)
            + f"\n\nOverhead (ratio of medians - 1): {100 * result['overhead']:+.1f}%. Checksum stage on rank 0 "
            f"(hash its files, {result['mib_rank0']} MiB, gather, write the manifest): median "
            f"{result['median_checksum_stage_s']:.3f} s, {100 * result['checksum_stage_share_of_save']:.1f}% of "
            "its save.")
    print(text)
    save("bench_checkpoint_save", result, text)


if __name__ == "__main__":
    main()
