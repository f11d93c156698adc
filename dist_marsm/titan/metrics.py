"""MARS-M's metrics (optimizer and MARSM step time, Newton-Schulz matrices, bytes sent, QK-clip, output-layer
RMS->inf norm) through torchtitan's MetricsProcessor, plus a JSON-lines logger backend. docs/torchtitan.md.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torchtitan.components.metrics import BaseLogger, LoggerContainer, MetricsProcessor, _get_metrics_rank

from dist_marsm import MARSM


@torch.no_grad()
def rms_to_inf_norm(weight: torch.Tensor) -> float:
    """max_x ||W x||_inf / ||x||_rms = sqrt(d_in) * max_i ||W[i, :]||_2, for a tensor or a DTensor."""
    rows = torch.linalg.vector_norm(weight.float(), dim=-1)
    rows = rows.full_tensor() if hasattr(rows, "full_tensor") else rows  # d_out floats; uneven shards too
    return math.sqrt(weight.shape[-1]) * float(rows.max())


class JsonlLogger(BaseLogger):
    """A torchtitan logger backend: one JSON object per ``log`` call, appended to ``path``. A run's first call
    drops the lines of the steps it redoes after a resume, and unreadable lines (one cut by a crash)."""

    def __init__(self, path: str):
        self.path, self._fresh = Path(path), True
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self._fresh:
            self._fresh = False
            lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
            self.path.write_text("".join(line for line in lines if _step_of(line) < step))
        record = {"step": step, **metrics, "time": time.time()}
        for ours, theirs in (("loss", "loss_metrics/global_avg_loss"), ("validation_loss", "validation_metrics/loss")):
            if theirs in metrics:
                record[ours] = metrics[theirs]
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")


class MARSMMetricsProcessor(MetricsProcessor):
    """torchtitan's MetricsProcessor + optimizer time, Newton-Schulz counts, output-layer norm, JSONL."""

    @dataclass(kw_only=True, slots=True)
    class Config(MetricsProcessor.Config):
        jsonl_file: str = "metrics.jsonl"  # per-step JSON lines in dump_folder (metrics rank); empty: none
        output_norm: bool = True  # compute and log the output layer's RMS->inf operator norm

    def __init__(
        self, config: Config, *, parallel_dims, dump_folder: str = "./outputs", pp_schedule: str = "1F1B", **kwargs: Any
    ):
        super().__init__(
            config, parallel_dims=parallel_dims, dump_folder=dump_folder, pp_schedule=pp_schedule, **kwargs
        )
        rank = dist.get_rank() if dist.is_initialized() else 0
        if config.jsonl_file and rank == _get_metrics_rank(parallel_dims=parallel_dims, pp_schedule=pp_schedule):
            backends = LoggerContainer()
            backends.add_logger(self.logger)
            backends.add_logger(JsonlLogger(os.path.join(dump_folder, config.jsonl_file)))
            self.logger = backends

    def log(
        self,
        step: int,
        global_avg_loss: float,
        global_max_loss: float,
        grad_norm: float,
        extra_metrics: dict[str, Any] | None = None,
    ):
        extra, container = dict(extra_metrics or {}), self.optimizers
        for stats in (o.last_step_stats for o in getattr(container, "optimizers", []) if isinstance(o, MARSM)):
            for key, name in (
                ("step_time_s", "marsm_step_time_s"),
                ("ns_matrices", "ns_matrices"),
                ("bytes_sent", "bytes_sent"),
            ):
                extra[name] = extra.get(name, 0) + stats.get(key, 0)
        clip = getattr(container, "qk_clip", None)
        if clip is not None and clip.last_stats:
            extra.update(
                qk_clip_max_logit=clip.last_stats["max_logit"], qk_clip_heads_clipped=clip.last_stats["heads_clipped"]
            )
        if "ns_matrices" in extra and dist.is_initialized():  # the whole job's count: each matrix once
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            total = torch.tensor([extra["ns_matrices"]], dtype=torch.int64, device=device)
            dist.all_reduce(total)
            extra["ns_matrices_total"] = int(total.item())
        if getattr(container, "last_step_time_s", None) is not None:
            extra["optimizer_time_s"] = container.last_step_time_s
        heads = [p.lm_head for p in self.model_parts or [] if getattr(p, "lm_head", None) is not None]
        if self.config.output_norm and heads:  # the ranks whose pipeline stage holds the output layer
            extra["output_rms_inf_norm"] = rms_to_inf_norm(heads[-1].weight)
        super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=extra)


def _step_of(line: str) -> float:  # inf (dropped) for a line that holds no step, e.g. one cut by a crash
    with contextlib.suppress(ValueError, KeyError, TypeError):
        if isinstance(step := json.loads(line)["step"], (int, float)):
            return step
    return math.inf
