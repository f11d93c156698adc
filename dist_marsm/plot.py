"""``python -m dist_marsm.plot DUMP_FOLDER [--out PNG]``: the loss curve of a run from its metrics.jsonl.

Training loss (and validation loss, where the run validated) against step, optimizer step time on a
second panel; written to ``<DUMP_FOLDER>/loss_curve.png`` unless ``--out`` says otherwise. Reads the
file the JSONL metrics backend writes (dist_marsm.titan.metrics); matplotlib is imported here only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_loss_plot(jsonl_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(jsonl_path)
    rows = [r for r in records if "loss" in r]
    val = [r for r in records if "validation_loss" in r]
    if not rows:
        raise ValueError(f"no training records in {jsonl_path}")
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="training loss")
    if val:
        ax.plot([r["step"] for r in val], [r["validation_loss"] for r in val], "o-", label="validation loss")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(png_path))) or "loss")
    timed = [r for r in rows if r.get("optimizer_time_s") is not None]
    if timed:
        ax2.plot([r["step"] for r in timed], [r["optimizer_time_s"] for r in timed], label="optimizer step (s)")
    ax2.set_xlabel("step")
    ax2.set_ylabel("optimizer s")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_marsm.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("dump_folder", help="a run's dump_folder (holding metrics.jsonl)")
    parser.add_argument("--metrics", default="metrics.jsonl", help="file name inside dump_folder")
    parser.add_argument("--out", help="PNG path (default <dump_folder>/loss_curve.png)")
    args = parser.parse_args(argv)
    src = os.path.join(args.dump_folder, args.metrics)
    out = args.out or os.path.join(args.dump_folder, "loss_curve.png")
    try:
        write_loss_plot(src, out)
    except (OSError, ValueError) as e:
        print(f"dist_marsm.plot: error: {e}", file=sys.stderr)
        return 2
    print(f"dist_marsm.plot: wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
