"""One torchrun rank of ``python -m dist_marsm.train`` for the torchtitan checkpoint/PP/crash tests.

    torchrun --standalone --nproc-per-node N tests/titan_driver.py --recipe R [--section.key value ...]

On top of ``dist_marsm.train.main`` it (1) installs :mod:`tests.fault_injection` from the
environment, (2) with ``DIST_MARSM_TEST_PLAN_DIR`` set, writes after every MARSM step this rank's
owner plan and parameter names to ``<dir>/plan_rank<R>.json``, (3) with
``DIST_MARSM_TEST_EXCLUDE_FROM_LOADING`` / ``DIST_MARSM_TEST_VERIFY_LOAD`` set, skips states at load
and checks the loaded state against the checkpoint files.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _plan_dump(folder: str) -> None:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from dist_marsm import MARSM

    rank = int(os.environ.get("RANK", "0"))
    os.makedirs(folder, exist_ok=True)
    seen = {}

    def hook(opt, args, kwargs):
        if not isinstance(opt, MARSM) or opt.step_plan is None:
            return
        names = [n for g in opt.param_groups for n in (g.get("param_names") or [])]
        mars = [n for g in opt.param_groups if g["use_mars"] for n in (g.get("param_names") or [])]
        seen[id(opt)] = {
            "param_names": names,
            "mars_names": mars,
            "dtensor": [hasattr(p, "placements") for g in opt.param_groups for p in g["params"]],
            "plans": [{"ranks": list(r["ranks"]), "owners": r["owners"]} for r in opt.plan_report()],
            "ns_matrices": opt.last_step_stats.get("ns_matrices"),
            "world_rank": torch.distributed.get_rank(),
        }
        with open(os.path.join(folder, f"plan_rank{rank}.json"), "w") as f:
            json.dump(list(seen.values()), f)

    register_optimizer_step_post_hook(hook)


def _checkpoint_test_hooks(exclude: str, verify_path: str) -> None:
    """``exclude``: comma-separated states not loaded (``dataloader`` for a dp-degree change: torchtitan
    0.3.0's dataloader refuses another dp degree). ``verify_path``: after the checkpoint load, every model
    and optimizer tensor (gathered to full size) is compared with the full tensors in the checkpoint
    folder read back offline; rank 0 writes {"compared", "max_abs_diff", "missing"} there."""
    import torch
    from torchtitan.components.checkpointer.dcp import CheckpointManager

    original_init, original_load = CheckpointManager.__init__, CheckpointManager._load

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if exclude and getattr(self, "enable", False):
            self.exclude_from_loading = [s for s in exclude.split(",") if s]

    def _load(self, step=-1):
        loaded = original_load(self, step)
        if not (verify_path and loaded):
            return loaded
        from tests._titan_jobs import flat_full_state, read_checkpoint

        step_dir = os.path.join(self.folder, f"step-{self._find_load_step() if step == -1 else step}")
        live = {"model." + k: v for k, v in self.states["model"].state_dict().items()}
        live.update({"optimizer." + k: v for k, v in self.states["optimizer"].state_dict().items()})
        full = {}
        for key in sorted(live):
            v = live[key]
            if hasattr(v, "full_tensor"):
                v = v.full_tensor()
            if torch.is_tensor(v):
                full[key] = v.detach().clone()
        if torch.distributed.get_rank() == 0:
            saved = flat_full_state(read_checkpoint(step_dir))
            diffs, missing = [], []
            for key, v in full.items():
                name = key.removeprefix("model.")
                ref = saved.get(name, saved.get(key))
                if ref is None:
                    missing.append(key)
                    continue
                diffs.append(float((v.double() - ref.double()).abs().max()) if v.numel() else 0.0)
            with open(verify_path, "w") as f:
                json.dump(
                    {
                        "compared": len(diffs),
                        "max_abs_diff": max(diffs, default=float("nan")),
                        "missing": missing,
                        "step_dir": step_dir,
                    },
                    f,
                )
        return loaded

    CheckpointManager.__init__ = __init__
    CheckpointManager._load = _load


def main() -> int:
    from dist_marsm import train
    from tests import fault_injection

    train.fresh_store_per_restart()
    argv = sys.argv[1:]
    if os.environ.get("DIST_MARSM_TEST_PLAN_DIR"):
        _plan_dump(os.environ["DIST_MARSM_TEST_PLAN_DIR"])
    exclude = os.environ.get("DIST_MARSM_TEST_EXCLUDE_FROM_LOADING", "")
    verify = os.environ.get("DIST_MARSM_TEST_VERIFY_LOAD", "")
    if exclude or verify:
        _checkpoint_test_hooks(exclude, verify)
    fault_injection.install_from_env()

    return train.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
