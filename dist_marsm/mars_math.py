"""MARS-M element-wise math (layer 1: tensors in, tensors out; no torch.distributed).

Everything here acts on local tensors: a full matrix on one process, or a rank's shard under FSDP.
Norms are therefore passed in rather than computed, because under sharding they are global sums.
"""

from __future__ import annotations

import math

import torch

LR_ADJUST_MODES = ("moonlight", "original", "none")


def foreach_scalar(tensors: list[torch.Tensor], value: float) -> float | torch.Tensor:
    """``value`` as a foreach op over ``tensors`` takes it fastest, with the same result as the scalar.

    On CPU, foreach runs one kernel per tensor and wraps a Python scalar into a tensor for each; a 0-dim
    tensor made once is passed instead (as torch.optim's AdamW does for its step counters). Its dtype is
    the tensors' own where they share float32 or float64 (the kernels' fast path), else float32, or float64
    if any tensor is float64: CPU kernels read a 0-dim operand at their compute precision and it does not
    change the result's dtype, so results are bitwise those of the scalar. Elsewhere, the scalar itself.
    """
    if not tensors or tensors[0].device.type != "cpu":
        return value
    dtype = tensors[0].dtype
    if dtype not in (torch.float32, torch.float64) or any(t.dtype != dtype for t in tensors):
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return torch.tensor(value, dtype=dtype)


def mars_corrections(
    grads: list[torch.Tensor], prev_grads: list[torch.Tensor] | None, gamma: float, beta: float
) -> list[torch.Tensor]:
    """c_t = g_t + gamma * beta / (1 - beta) * (g_t - g_{t-1}) for a list of tensors (foreach).

    ``prev_grads=None`` means g_{t-1} = 0 (the first step). Returns new tensors; the inputs are untouched.
    """
    k = gamma * beta / (1.0 - beta)
    if prev_grads is None:
        return list(torch._foreach_mul(grads, 1.0 + k))
    # lerp(g_prev, g, 1 + k) = g_prev + (1 + k)(g - g_prev) = g + k (g - g_prev): one pass instead of three.
    return list(torch._foreach_lerp(prev_grads, grads, 1.0 + k))


def mars_correction(grad: torch.Tensor, prev_grad: torch.Tensor, gamma: float, beta: float) -> torch.Tensor:
    """One tensor of :func:`mars_corrections`."""
    return mars_corrections([grad], [prev_grad], gamma, beta)[0]


def unit_clip_scale(sq_norm: torch.Tensor) -> torch.Tensor:
    """Scale that clips a tensor with squared Frobenius norm ``sq_norm`` to norm <= 1.

    1/||c|| where ||c|| > 1, else 1; element-wise over a vector of squared norms.
    """
    norm = sq_norm.sqrt()
    return torch.where(norm > 1.0, 1.0 / norm, torch.ones_like(norm))


def unit_clip_factor(sq_norm: float) -> float:
    """:func:`unit_clip_scale` of one squared norm held on the host."""
    norm = math.sqrt(sq_norm)
    return 1.0 / norm if norm > 1.0 else 1.0


def momentum_updates(momenta: list[torch.Tensor], updates: list[torch.Tensor], beta: float) -> None:
    """m = beta * m + (1 - beta) * update, in place (no Nesterov)."""
    torch._foreach_lerp_(momenta, updates, 1.0 - beta)


def efficient_momentum_updates(
    momenta: list[torch.Tensor], grads: list[torch.Tensor], beta: float, gamma: float
) -> list[torch.Tensor]:
    """One-buffer MARS-M: m = beta * m + ((1 - gamma)(1 - beta) / beta) * g_t in place; returns the
    Newton-Schulz inputs gamma * g_t + beta * m (new tensors).

    The inputs follow the same recursion as the approximate variant's momentum with clipping off
    (n_t = beta n_{t-1} + (1 - beta) g_t + gamma beta (g_t - g_{t-1})), so both give one direction.
    """
    torch._foreach_mul_(momenta, beta)
    torch._foreach_add_(momenta, grads, alpha=(1.0 - gamma) * (1.0 - beta) / beta)
    inputs = torch._foreach_mul(momenta, beta)
    torch._foreach_add_(inputs, grads, alpha=gamma)
    return inputs


def lr_scale(shape: tuple[int, ...], mode: str) -> float:
    """Per-matrix learning-rate multiplier from the last two dims (A, B).

    moonlight: 0.2 * sqrt(max(A, B)) (matches AdamW's update RMS, Moonlight / MARS-M reference);
    original: sqrt(max(1, A / B)) (Keller Jordan's Muon); none: 1.
    """
    rows, cols = shape[-2], shape[-1]
    if mode == "moonlight":
        return 0.2 * math.sqrt(max(rows, cols))
    if mode == "original":
        return math.sqrt(max(1.0, rows / cols))
    if mode == "none":
        return 1.0
    raise ValueError(f"lr_adjust must be one of {LR_ADJUST_MODES}, got {mode!r}")


def apply_updates(
    params: list[torch.Tensor], updates: list[torch.Tensor], lr: float, weight_decay: float, scale: float
) -> None:
    """W = W * (1 - lr * wd); W = W - lr * scale * update (decay uses the unscaled lr), in place."""
    if weight_decay != 0:
        torch._foreach_mul_(params, foreach_scalar(params, 1.0 - lr * weight_decay))
    torch._foreach_add_(params, updates, alpha=-lr * scale)


def neuron_normalize(update: torch.Tensor, row_second_moment: torch.Tensor, beta2: float, eps: float) -> torch.Tensor:
    """NorMuon row normalization of an orthogonalized update (local rows), updating the row state.

    v = beta2 * v + (1 - beta2) * mean over columns of O*O (one value per row, i.e. per output neuron);
    returns O / (sqrt(v) + eps). The RMS-restoring rescale needs global norms and is applied by the caller.
    ``update`` is [..., rows, cols] and ``row_second_moment`` [..., rows, 1].
    """
    row_mean_sq = update.float().square().mean(dim=-1, keepdim=True)
    row_second_moment.lerp_(row_mean_sq, 1.0 - beta2)
    return update.float() / (row_second_moment.sqrt() + eps)
