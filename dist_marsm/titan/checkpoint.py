"""torchtitan's CheckpointManager with a checksum manifest per checkpoint (dist_marsm.checkpoint_manifest):
each rank checksums its own files once a save is complete (synchronous: right after DCP returns; async: when
torchtitan waits for the save), in a background thread so training goes on; verified on every rank before a
load. docs/checkpointing.md."""

from __future__ import annotations

import os
import shutil
import threading
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
        self.verify, self._unfinished, self._checksums = config.verify, None, None

    def _save(self, curr_step: int, last_step: bool = False) -> bool:
        begin = time.monotonic()
        if self._should_save(curr_step, last_step):
            self._wait_for_checksums()
        saved = super()._save(curr_step, last_step)
        if saved:
            self._unfinished = (curr_step, begin)
            if self.save_future is None:  # synchronous: DCP has finished
                self._finish()
        return saved

    def _wait_for_saving(self) -> None:
        super()._wait_for_saving()
        self._finish()

    def _finish(self) -> None:
        step, begin = self._unfinished
        self._unfinished, step_dir = None, self._create_checkpoint_id(step)
        if not os.path.isfile(os.path.join(step_dir, manifest.METADATA_NAME)):
            return  # not a DCP folder (a Hugging Face export): nothing the manifest covers
        if self.verify:
            self._wait_for_checksums()  # at most one in flight (an async save's, then the final one's)
            self._checksums = threading.Thread(
                target=self._write_checksums, args=(step_dir, step), daemon=True, name="dist_marsm-checksums"
            )
            self._checksums.start()
        elif dist.get_rank() == 0:  # parts from an earlier save of this step no longer describe the files
            shutil.rmtree(os.path.join(step_dir, manifest.MANIFEST_NAME), ignore_errors=True)
        logger.info(
            f"checkpoint step-{step}: saved in {time.monotonic() - begin:.3f} s, "
            + ("checksums in the background" if self.verify else "without checksums")
        )

    def _write_checksums(self, step_dir: str, step: int) -> None:
        try:
            done = manifest.write_rank_manifest(step_dir, step, dist.get_rank(), dist.get_world_size())
            logger.info(
                f"checkpoint step-{step}: crc32 of {done['files']} file{'s' * (done['files'] != 1)} "
                f"({done['bytes'] / 2**20:.1f} MiB) written by this rank in {done['seconds']:.3f} s"
            )
        except OSError as e:  # the step then loads with this rank's files unverified, after a warning
            logger.error(f"checkpoint step-{step}: this rank's checksums were not written: {e}")

    def _wait_for_checksums(self) -> None:
        if self._checksums is not None:
            self._checksums.join()
            self._checksums = None

    def _close(self) -> None:
        self._wait_for_checksums()
        super()._close()

    def _find_load_step(self, folder: str = "") -> int:
        if not self.verify:
            return super()._find_load_step(folder)
        return manifest.newest_verified_step(folder or self.folder, lambda level, msg: getattr(logger, level)(msg))

    def _load(self, step: int = -1) -> bool:
        step_dir = self._create_checkpoint_id(step)
        if (
            self.verify
            and step != -1
            and os.path.isdir(step_dir)
            and (verdict := manifest.verify(step_dir))
            and verdict[0]
        ):
            raise manifest.CheckpointIntegrityError(
                f"checkpoint step {step} ({step_dir}), named by [checkpoint] load_step, fails verification: "
                + "; ".join(verdict[0])
            )
        return super()._load(step)
