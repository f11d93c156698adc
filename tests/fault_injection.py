"""Fault injection for crash-and-restart tests of a torchtitan job (off unless the environment asks).

Set in the environment of every rank (torchrun passes it on):

* ``DIST_MARSM_FAULT``: ``crash_at_step`` (the victim rank exits at the start of training step
  ``STEP``, i.e. after step STEP-1 and its checkpoint, if any, finished) or ``crash_in_save`` (the
  victim rank exits while DCP writes the checkpoint of step ``STEP``: after its own data file was
  written and then truncated to half, before the coordinator writes ``.metadata``).
* ``DIST_MARSM_FAULT_RANK`` (global rank, default 1), ``DIST_MARSM_FAULT_STEP`` (required),
  ``DIST_MARSM_FAULT_EXIT_CODE`` (default 13).
* Once only: with ``DIST_MARSM_FAULT_MARKER=<path>`` the fault fires only while that file does not
  exist and creates it when firing (works across torchrun restarts and job requeues alike);
  without a marker it fires only on torchrun's first attempt (``TORCHELASTIC_RESTART_COUNT`` 0).

The exit is ``os._exit`` (no clean-up, no flush, no destroy_process_group), which is how a killed
or OOM-ed rank looks to its peers. :func:`install_from_env` patches torchtitan's ``Trainer.train_step``
and DCP's ``FileSystemWriter.write_data`` (class attributes, this process only) and does nothing when
``DIST_MARSM_FAULT`` is unset. tests/titan_driver.py installs it; the production entry point never does.
"""

from __future__ import annotations

import os
import sys

MODES = ("crash_at_step", "crash_in_save")
_state = {"save_step": None, "installed": False}


def _config():
    mode = os.environ.get("DIST_MARSM_FAULT", "")
    if not mode:
        return None
    if mode not in MODES:
        raise ValueError(f"DIST_MARSM_FAULT must be one of {MODES}, got {mode!r}")
    if "DIST_MARSM_FAULT_STEP" not in os.environ:
        raise ValueError("DIST_MARSM_FAULT needs DIST_MARSM_FAULT_STEP")
    return {
        "mode": mode,
        "rank": int(os.environ.get("DIST_MARSM_FAULT_RANK", "1")),
        "step": int(os.environ["DIST_MARSM_FAULT_STEP"]),
        "exit_code": int(os.environ.get("DIST_MARSM_FAULT_EXIT_CODE", "13")),
        "marker": os.environ.get("DIST_MARSM_FAULT_MARKER", ""),
    }


def _armed(cfg) -> bool:
    if int(os.environ.get("RANK", "0")) != cfg["rank"]:
        return False
    if cfg["marker"]:
        return not os.path.exists(cfg["marker"])
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"


def _die(cfg, what: str) -> None:
    if cfg["marker"]:
        with open(cfg["marker"], "w") as f:
            f.write(f"{what}\n")
    print(
        f"dist_marsm.fault_injection: rank {os.environ.get('RANK')} exits with code {cfg['exit_code']} ({what})",
        file=sys.stderr,
        flush=True,
    )
    os._exit(cfg["exit_code"])


def install_from_env() -> bool:
    """Install the configured fault (idempotent); returns True when one is armed in this process."""
    cfg = _config()
    if cfg is None or _state["installed"]:
        return bool(cfg) and _state["installed"]
    _state["installed"] = True
    if not _armed(cfg):
        return False

    if cfg["mode"] == "crash_at_step":
        from torchtitan.trainer import Trainer

        original_train_step = Trainer.train_step

        def train_step(self, *args, **kwargs):
            if self.step == cfg["step"] and _armed(cfg):
                _die(cfg, f"crash_at_step: start of step {self.step}")
            return original_train_step(self, *args, **kwargs)

        Trainer.train_step = train_step
        return True

    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torchtitan.components.checkpointer.dcp import CheckpointManager

    original_save = CheckpointManager._save
    original_write = FileSystemWriter.write_data

    def _save(self, curr_step, *args, **kwargs):
        _state["save_step"] = curr_step
        try:
            return original_save(self, curr_step, *args, **kwargs)
        finally:
            _state["save_step"] = None

    def write_data(self, plan, planner):
        future = original_write(self, plan, planner)
        if _state["save_step"] == cfg["step"] and _armed(cfg):
            results = future.wait() if hasattr(future, "wait") else future.result()
            for result in results:
                path = os.path.join(str(self.path), result.storage_data.relative_path)
                if os.path.exists(path):
                    size = os.path.getsize(path)
                    with open(path, "r+b") as f:
                        f.truncate(size // 2)
            _die(cfg, f"crash_in_save: checkpoint of step {cfg['step']}, own data file truncated")
        return future

    CheckpointManager._save = _save
    FileSystemWriter.write_data = write_data
    return True
