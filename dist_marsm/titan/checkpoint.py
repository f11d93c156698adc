"""torchtitan's CheckpointManager with a checksum manifest per checkpoint (dist_marsm.checkpoint_manifest):
written once a save is complete (synchronous: right after DCP returns; async: when torchtitan waits for the
save), verified on every rank before a load. docs/checkpointing.md."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch.distributed as dist
from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.tools.logging import logger

from dist_marsm import checkpoint_manifest as manifest


class VerifiedCheckpointManager(CheckpointManager):
    @dataclass(kw_only=True, slots=True)
    class Config(CheckpointManager.Config):
        verify: bool = True
        """Write a CRC-32 manifest with every checkpoint and verify it before loading; a checkpoint that fails
        is skipped for the newest one that verifies."""

    def __init__(self, config: Config, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self.verify, self._unfinished = config.verify, None

    def _save(self, curr_step: int, last_step: bool = False) -> bool:
        begin = time.monotonic()
        saved = super()._save(curr_step, last_step)
        if saved:
            self._unfinished = (curr_step, begin)
            if self.save_future is None:   # synchronous: DCP has finished
                self._finish()
        return saved

    def _wait_for_saving(self) -> None:
        super()._wait_for_saving()
        self._finish()

    def _finish(self) -> None:
        step, begin = self._unfinished
        self._unfinished, step_dir = None, self._create_checkpoint_id(step)
        if not os.path.isfile(os.path.join(step_dir, manifest.METADATA_NAME)):
            return   # not a DCP folder (a Hugging Face export): nothing the manifest covers
        if self.verify:
            done = manifest.write_manifest(step_dir, step)
            logger.info(f"checkpoint step-{step}: saved with checksums, {time.monotonic() - begin:.3f} s after the "
                        f"save began (crc32 of {done['files']} file{'s' * (done['files'] != 1)}, "
                        f"{done['bytes'] / 2**20:.1f} MiB on this rank: {done['seconds']:.3f} s)")
            return
        stale = os.path.join(step_dir, manifest.MANIFEST_NAME)
        if os.path.exists(stale) and dist.get_rank() == 0:
            os.remove(stale)   # from an earlier save of this step; it no longer describes the files
        logger.info(f"checkpoint step-{step}: saved without checksums in {time.monotonic() - begin:.3f} s")

    def _find_load_step(self, folder: str = "") -> int:
        if not self.verify:
            return super()._find_load_step(folder)
        return manifest.newest_verified_step(folder or self.folder, lambda level, msg: getattr(logger, level)(msg))

    def _load(self, step: int = -1) -> bool:
        step_dir = self._create_checkpoint_id(step)
        if self.verify and step != -1 and os.path.isdir(step_dir) and (problems := manifest.verify(step_dir)):
            raise manifest.CheckpointIntegrityError(
                f"checkpoint step {step} ({step_dir}), named by [checkpoint] load_step, fails verification: "
                + "; ".join(problems))
        return super()._load(step)
