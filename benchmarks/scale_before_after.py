"""Plan-build and steady-step figures of the scale rehearsal for one source tree, to compare two commits.

    git worktree add /tmp/before d208c88 && cp benchmarks/scale_rehearsal.py /tmp/before/benchmarks/
    python benchmarks/scale_before_after.py --tree /tmp/before      # the dist_marsm of that commit
    python benchmarks/scale_before_after.py --tree .                # this one

Runs ``TREE/benchmarks/scale_rehearsal.py`` (which imports the dist_marsm next to it) on the last rank of FSDP
meshes: the first step's plan of torchtitan Llama 3 --plan-model (first --plan-layers layers) at each W, then
steps of --step-model (first --step-layers layers) on ranks 0 and W - 1: first step, steady step (minimum of
two) and the host calls of a third (cProfile), Newton-Schulz stood in as in the rehearsal.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", required=True, help="a checkout whose benchmarks/ holds scale_rehearsal.py")
    ap.add_argument("--plan-model", default="8B")
    ap.add_argument("--plan-layers", type=int, default=2)
    ap.add_argument("--step-model", default="70B")
    ap.add_argument("--step-layers", type=int, default=2)
    ap.add_argument("--worlds", type=int, nargs="+", default=[64, 256, 1024])
    args = ap.parse_args()
    sys.path.insert(0, str(Path(args.tree).resolve() / "benchmarks"))
    import scale_rehearsal as rehearsal

    import dist_marsm

    tree = Path(dist_marsm.__file__).resolve().parent.parent
    for world in args.worlds:
        model = rehearsal.build_model(args.plan_model, args.plan_layers, (1, world, 1), world - 1)
        opt = rehearsal.build_optimizer(model)
        with rehearsal.MirroredGroup().active():
            start = time.perf_counter()
            rehearsal.build_plan(opt)
            print(
                f"{tree} plan {args.plan_model} layers={args.plan_layers} W={world}: "
                f"{time.perf_counter() - start:.2f} s",
                flush=True,
            )
    for world in dict.fromkeys((args.worlds[0], args.worlds[-1])):
        for rank in (0, world - 1):
            model = rehearsal.build_model(args.step_model, args.step_layers, (1, world, 1), rank)
            rehearsal.init_parameters(model)
            opt = rehearsal.build_optimizer(model)
            times = []
            with rehearsal.MirroredGroup().active(), rehearsal.StandinNewtonSchulz().active():
                for step in range(3):
                    rehearsal.fill_gradients(model, step)
                    start = time.perf_counter()
                    opt.step()
                    times.append(time.perf_counter() - start)
                rehearsal.fill_gradients(model, 3)
                _, py_calls, c_calls = rehearsal.host_calls(opt.step)
            print(
                f"{tree} step {args.step_model} layers={args.step_layers} W={world} rank {rank}: first "
                f"{times[0]:.2f} s, steady {min(times[1:]):.3f} s, {py_calls} Python + {c_calls} C calls",
                flush=True,
            )


if __name__ == "__main__":
    main()
