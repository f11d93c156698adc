"""MARS-M metrics through torchtitan's MetricsProcessor and its logger backends, plus a JSON-lines backend.

Added at every logged step: optimizer time, MARSM step time, Newton-Schulz matrices (this rank and all
ranks), bytes sent, and the output layer's RMS->inf operator norm
max_x ||W x||_inf / ||x||_rms = sqrt(d_in) * max_i ||W[i, :]||_2 (docs/hyperparameters.md).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torchtitan.components.metrics import BaseLogger, LoggerContainer, MetricsProcessor, _get_metrics_rank

OUTPUT_NAMES = ("lm_head.weight", "output.weight")


def output_weight(model_parts) -> torch.Tensor | None:
    """The output layer's weight, if this rank's model parts hold it (canonical name lm_head/output)."""
    from torchtitan.components.checkpointer.utils import canonical_fqn

    for part in reversed(list(model_parts or [])):
        for name, p in part.named_parameters():
            if canonical_fqn(name) in OUTPUT_NAMES:
                return p
    return None


@torch.no_grad()
def rms_to_inf_norm(weight: torch.Tensor) -> float:
    """sqrt(d_in) * max_i ||W[i, :]||_2 for a plain tensor or a DTensor (collective over its mesh)."""
    d_in = weight.shape[-1]
    if not (hasattr(weight, "placements") and hasattr(weight, "device_mesh")):
        return math.sqrt(d_in) * float(torch.linalg.vector_norm(weight.float(), dim=-1).max())
    local = weight.to_local().float()
    row_sq = (local * local).sum(dim=-1)
    mesh = weight.device_mesh
    for dim, placement in enumerate(weight.placements):       # columns split -> complete the row sums
        if placement.is_shard() and placement.dim == weight.ndim - 1:
            dist.all_reduce(row_sq, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))
    best = row_sq.max() if row_sq.numel() else torch.zeros((), dtype=row_sq.dtype, device=row_sq.device)
    best = best.reshape(1).clone()
    for dim, placement in enumerate(weight.placements):       # rows split -> max over the shards
        if placement.is_shard() and placement.dim != weight.ndim - 1:
            dist.all_reduce(best, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
    return math.sqrt(d_in) * math.sqrt(float(best))


def _comm_device() -> torch.device:
    """Where the default process group communicates (cuda:<current> for nccl, cpu for gloo)."""
    if dist.get_backend() == "gloo" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def marsm_stats(optimizers) -> dict[str, float]:
    """Sum of ``last_step_stats`` over the MARSM instances in a container (empty if none)."""
    from dist_marsm import MARSM

    out: dict[str, float] = {}
    for opt in getattr(optimizers, "optimizers", []) or []:
        if isinstance(opt, MARSM) and opt.last_step_stats:
            for key, name in (("step_time_s", "marsm_step_time_s"), ("ns_matrices", "ns_matrices"),
                              ("bytes_sent", "bytes_sent")):
                out[name] = out.get(name, 0) + opt.last_step_stats.get(key, 0)
    qk_clip = getattr(optimizers, "qk_clip", None)
    if qk_clip is not None and qk_clip.clip.last_stats:
        out["qk_clip_max_logit"] = qk_clip.clip.last_stats["max_logit"]
        out["qk_clip_heads_clipped"] = qk_clip.clip.last_stats["heads_clipped"]
    return out


class JsonlLogger(BaseLogger):
    """A torchtitan logger backend: one JSON object per ``log`` call, appended to ``path``."""

    def __init__(self, path: str):
        self.path, self._fresh = path, True
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self._fresh:      # the first step this run logs: drop what a resumed run redoes
            self._fresh = False
            _drop_steps_from(self.path, step)
        record = {"step": step, **metrics, "time": time.time()}
        if "loss_metrics/global_avg_loss" in metrics:
            record["loss"] = metrics["loss_metrics/global_avg_loss"]
        if "validation_metrics/loss" in metrics:
            record["validation_loss"] = metrics["validation_metrics/loss"]
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")


class MARSMMetricsProcessor(MetricsProcessor):
    """torchtitan's MetricsProcessor + optimizer time, Newton-Schulz counts, output-layer norm, JSONL."""

    @dataclass(kw_only=True, slots=True)
    class Config(MetricsProcessor.Config):
        jsonl_file: str = "metrics.jsonl"
        """per-step JSON lines in dump_folder (metrics rank); empty string disables"""

        output_norm: bool = True
        """compute and log the output layer's RMS->inf operator norm"""

    def __init__(self, config: Config, *, parallel_dims, dump_folder: str = "./outputs",
                 pp_schedule: str = "1F1B", **kwargs: Any):
        self._optimizers, self._step_start, self.last_optimizer_time_s = None, None, None
        super().__init__(config, parallel_dims=parallel_dims, dump_folder=dump_folder, pp_schedule=pp_schedule,
                         **kwargs)
        rank = dist.get_rank() if dist.is_initialized() else 0
        if config.jsonl_file and rank == _get_metrics_rank(parallel_dims=parallel_dims, pp_schedule=pp_schedule):
            backends = LoggerContainer()
            backends.add_logger(self.logger)
            backends.add_logger(JsonlLogger(os.path.join(dump_folder, config.jsonl_file)))
            self.logger = backends

    # The trainer assigns ``metrics_processor.optimizers`` after building the container; hook its step.
    @property
    def optimizers(self):
        return self._optimizers

    @optimizers.setter
    def optimizers(self, container):
        self._optimizers = container
        if container is not None and hasattr(container, "register_step_pre_hook"):
            container.register_step_pre_hook(lambda *a, **k: setattr(self, "_step_start", time.perf_counter()))
            container.register_step_post_hook(lambda *a, **k: setattr(
                self, "last_optimizer_time_s", time.perf_counter() - self._step_start))

    def log(self, step: int, global_avg_loss: float, global_max_loss: float, grad_norm: float,
            extra_metrics: dict[str, Any] | None = None):
        extra = dict(extra_metrics or {})
        stats = marsm_stats(self._optimizers)
        if "ns_matrices" in stats and dist.is_initialized():
            # Matrices orthogonalized by the whole job this step (each exactly once).
            total = torch.tensor([stats["ns_matrices"]], dtype=torch.int64, device=_comm_device())
            dist.all_reduce(total)
            stats["ns_matrices_total"] = int(total.item())
        extra.update(stats)
        if self.last_optimizer_time_s is not None:
            extra["optimizer_time_s"] = self.last_optimizer_time_s
        weight = output_weight(self.model_parts) if self.config.output_norm else None
        if weight is not None:
            extra["output_rms_inf_norm"] = rms_to_inf_norm(weight)
        super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=extra)


def _drop_steps_from(path: str | None, first_step: int) -> None:
    """Remove lines with step >= first_step (a resumed run redoes them)."""
    if not path or not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] < first_step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue
    with open(path, "w") as f:
        f.writelines(keep)
