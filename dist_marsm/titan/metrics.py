"""Optimizer metrics through torchtitan's MetricsProcessor, plus a JSON-lines file and a loss-curve PNG.

:class:`MARSMMetricsProcessor` is torchtitan's ``MetricsProcessor`` with, at every logged step:

* ``optimizer/step_time_s``: wall time of the optimizer container's ``step()`` (all optimizers,
  measured with the container's step pre/post hooks, so AdamW and DistMuon get it too);
* ``optimizer/marsm_step_time_s``, ``optimizer/ns_matrices``, ``optimizer/bytes_sent``: summed over
  this rank's MARSM instances from ``MARSM.last_step_stats`` (one instance per pipeline stage);
* ``output_norm/rms_to_inf``: the output layer's RMS->inf operator norm (below).

They go to torchtitan's loggers (console, TensorBoard, W&B) with the usual metrics. The writer rank
also appends one JSON object per logged step to ``<dump_folder>/<jsonl_file>`` (keys ``step``,
``loss``, ``max_loss``, ``grad_norm``, ``optimizer_time_s``, ``marsm_step_time_s``, ``ns_matrices``
(this rank), ``ns_matrices_total`` (all ranks, all-reduced), ``bytes_sent``, ``output_rms_inf_norm``, ``tps``, ``elapsed_s``, the learning rates, ``time``),
validation losses to ``validation.jsonl``, and at the end draws ``<dump_folder>/<plot_file>``
(matplotlib, Agg). The writer is global rank 0; with pipeline parallelism (where only the last stage
sees the loss) it is torchtitan's metrics rank, the first rank of the last stage. On resume, lines
for steps the restored run will redo are dropped, so the file keeps one line per step.

RMS->inf operator norm. For the output (unembedding) matrix W (d_out x d_in) acting on hidden
states measured in the RMS norm ||x||_rms = ||x||_2 / sqrt(d_in) and producing logits measured in
the max norm,  ||W||_{RMS->inf} = max_x ||W x||_inf / ||x||_rms = sqrt(d_in) * max_i ||W[i, :]||_2
(the largest row l2 norm, scaled by sqrt(d_in)); this is the norm "Optimal Scaling Needs Optimal
Norm" (Filatov et al., 2025) tracks for the output layer, about 2^7 at the optimal (lr, batch size)
(see /work/shared/reference-hyperparameters.md). It is computed exactly on sharded (DTensor) weights:
row sums of squares are all-reduced over mesh dims that shard columns, the maximum over dims that
shard rows.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torchtitan.components.metrics import MetricsProcessor, _get_metrics_rank

logger = logging.getLogger(__name__)

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
            s = opt.last_step_stats
            out["marsm_step_time_s"] = out.get("marsm_step_time_s", 0.0) + float(s.get("step_time_s", 0.0))
            out["ns_matrices"] = out.get("ns_matrices", 0) + int(s.get("ns_matrices", 0))
            out["bytes_sent"] = out.get("bytes_sent", 0) + int(s.get("bytes_sent", 0))
    return out


class MARSMMetricsProcessor(MetricsProcessor):
    """torchtitan's MetricsProcessor + optimizer time, output-layer norm, metrics.jsonl and a loss PNG."""

    @dataclass(kw_only=True, slots=True)
    class Config(MetricsProcessor.Config):
        jsonl_file: str = "metrics.jsonl"
        """Per-step JSON lines in dump_folder (writer rank); empty string disables."""

        plot_file: str = "loss_curve.png"
        """Loss curve drawn at close (writer rank); empty string disables."""

        output_norm: bool = True
        """Compute and log the output layer's RMS->inf operator norm."""

    def __init__(self, config: Config, *, parallel_dims, dump_folder: str = "./outputs",
                 pp_schedule: str = "1F1B", **kwargs: Any):
        self._optimizers = None
        self._step_start: float | None = None
        self.last_optimizer_time_s: float | None = None
        super().__init__(config, parallel_dims=parallel_dims, dump_folder=dump_folder, pp_schedule=pp_schedule,
                         **kwargs)
        self.dump_folder = dump_folder
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.is_writer = rank == _get_metrics_rank(parallel_dims=parallel_dims, pp_schedule=pp_schedule)
        self._start = time.time()
        self._truncated = False
        self.records: list[dict] = []

    # The trainer assigns ``metrics_processor.optimizers`` after building the container; hook its step.
    @property
    def optimizers(self):
        return self._optimizers

    @optimizers.setter
    def optimizers(self, container):
        self._optimizers = container
        if container is not None and hasattr(container, "register_step_pre_hook"):
            container.register_step_pre_hook(self._before_step)
            container.register_step_post_hook(self._after_step)

    def _before_step(self, *args, **kwargs):
        self._step_start = time.perf_counter()

    def _after_step(self, *args, **kwargs):
        if self._step_start is not None:
            self.last_optimizer_time_s = time.perf_counter() - self._step_start

    def _path(self, name: str) -> str | None:
        return os.path.join(self.dump_folder, name) if name else None

    def _append(self, name: str, record: dict, first_step: int | None = None) -> None:
        path = self._path(name)
        if path is None:
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if first_step is not None and not self._truncated:
            self._truncated = True
            _drop_steps_from(path, first_step)
            _drop_steps_from(self._path("validation.jsonl"), first_step)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def log(self, step: int, global_avg_loss: float, global_max_loss: float, grad_norm: float,
            extra_metrics: dict[str, Any] | None = None):
        extra = dict(extra_metrics or {})
        stats = marsm_stats(self._optimizers)
        if self.last_optimizer_time_s is not None:
            extra["optimizer/step_time_s"] = self.last_optimizer_time_s
        if stats and dist.is_initialized():
            # Matrices orthogonalized by the whole job this step (each exactly once: equals the number
            # of MARS-M matrices when every rank runs MARSM).
            total = torch.tensor([stats["ns_matrices"]], dtype=torch.int64, device=_comm_device())
            dist.all_reduce(total)
            stats["ns_matrices_total"] = int(total.item())
        for key, value in stats.items():
            extra[f"optimizer/{key}"] = value
        norm = None
        if self.config.output_norm:
            weight = output_weight(self.model_parts)
            if weight is not None:
                norm = rms_to_inf_norm(weight)
                extra["output_norm/rms_to_inf"] = norm
        tokens = self.ntokens_since_last_log
        elapsed = time.perf_counter() - self.time_last_log
        super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=extra)
        record = {"step": step, "loss": global_avg_loss, "max_loss": global_max_loss, "grad_norm": grad_norm,
                  "optimizer_time_s": self.last_optimizer_time_s,
                  "marsm_step_time_s": stats.get("marsm_step_time_s"), "ns_matrices": stats.get("ns_matrices"),
                  "ns_matrices_total": stats.get("ns_matrices_total"),
                  "bytes_sent": stats.get("bytes_sent"), "output_rms_inf_norm": norm,
                  "tps": tokens / max(elapsed * self.parallel_dims.non_data_parallel_size, 1e-9),
                  "elapsed_s": time.time() - self._start, "time": time.time()}
        record.update({k: v for k, v in extra.items() if k.startswith("lr/") or k == "n_tokens_seen"})
        self.records.append(record)
        if self.is_writer:
            self._append(self.config.jsonl_file, record, first_step=step)
            opt = (f"optimizer {self.last_optimizer_time_s:.3f}s" if self.last_optimizer_time_s is not None else "")
            logger.info(f"step {step}: {opt}"
                        + (f"  marsm {stats['marsm_step_time_s']:.3f}s ns_matrices {stats['ns_matrices']}"
                           if stats else "")
                        + (f"  output RMS->inf norm {norm:.4g}" if norm is not None else ""))

    def log_validation(self, loss: float, step: int, extra_metrics: dict[str, Any] | None = None):
        super().log_validation(loss, step, extra_metrics=extra_metrics)
        if self.is_writer:
            self._append("validation.jsonl", {"step": step, "validation_loss": loss, "time": time.time()})

    def close(self):
        super().close()
        if self.is_writer and self.config.plot_file:
            try:
                write_loss_plot(self._path(self.config.jsonl_file), self._path("validation.jsonl"),
                                self._path(self.config.plot_file))
            except Exception as e:  # noqa: BLE001 - a missing plot must not fail a finished run
                logger.warning(f"loss curve not written: {e}")


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


def read_jsonl(path: str) -> list[dict]:
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_loss_plot(jsonl_path: str, validation_path: str | None, png_path: str) -> None:
    """Training loss (and validation loss, if any) against step, with optimizer time on a second panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(jsonl_path)
    if not rows:
        raise ValueError(f"no records in {jsonl_path}")
    val = read_jsonl(validation_path) if validation_path else []
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
