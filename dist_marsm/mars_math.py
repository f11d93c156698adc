"""MARS-M element-wise math (layer 1: tensors in, tensors out; no torch.distributed).

Everything here acts on local tensors: a full matrix on one process, or a rank's shard under FSDP.
Norms are therefore passed in rather than computed, because under sharding they are global sums.
"""

from __future__ import annotations

import math

import torch

LR_ADJUST_MODES = ("moonlight", "original", "none")


def mars_correction(grad: torch.Tensor, prev_grad: torch.Tensor, gamma: float, beta: float) -> torch.Tensor:
    """c_t = g_t + gamma * beta / (1 - beta) * (g_t - g_{t-1})."""
    if gamma == 0:
        return grad.clone()
    return torch.sub(grad, prev_grad).mul_(gamma * beta / (1.0 - beta)).add_(grad)


def unit_clip_scale(sq_norm: torch.Tensor) -> torch.Tensor:
    """Scale that clips a tensor with squared Frobenius norm ``sq_norm`` to norm <= 1.

    1/||c|| where ||c|| > 1, else 1; element-wise over a vector of squared norms.
    """
    norm = sq_norm.sqrt()
    return torch.where(norm > 1.0, 1.0 / norm, torch.ones_like(norm))


def momentum_update(momentum: torch.Tensor, update: torch.Tensor, beta: float) -> torch.Tensor:
    """m = beta * m + (1 - beta) * update, in place (no Nesterov)."""
    return momentum.lerp_(update.to(momentum.dtype), 1.0 - beta)


def efficient_momentum_update(momentum: torch.Tensor, grad: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """One-buffer MARS-M: m = beta * m + ((1 - gamma)(1 - beta) / beta) * g_t, in place."""
    return momentum.mul_(beta).add_(grad.to(momentum.dtype), alpha=(1.0 - gamma) * (1.0 - beta) / beta)


def efficient_ns_input(momentum: torch.Tensor, grad: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Newton-Schulz input of the one-buffer form: gamma * g_t + beta * m.

    It follows the same recursion as the approximate variant's momentum with clipping off
    (n_t = beta n_{t-1} + (1 - beta) g_t + gamma beta (g_t - g_{t-1})), so both give one direction.
    """
    return torch.mul(momentum, beta).add_(grad.to(momentum.dtype), alpha=gamma)


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


def apply_update(param: torch.Tensor, update: torch.Tensor, lr: float, weight_decay: float, scale: float) -> None:
    """W = W * (1 - lr * wd); W = W - lr * scale * update (decay uses the unscaled lr)."""
    if weight_decay != 0:
        param.mul_(1.0 - lr * weight_decay)
    param.add_(update.to(param.dtype), alpha=-lr * scale)


def neuron_normalize(
    update: torch.Tensor, row_second_moment: torch.Tensor, beta2: float, eps: float
) -> torch.Tensor:
    """NorMuon row normalization of an orthogonalized update (local rows), updating the row state.

    v = beta2 * v + (1 - beta2) * mean over columns of O*O (one value per row, i.e. per output neuron);
    returns O / (sqrt(v) + eps). The RMS-restoring rescale needs global norms and is applied by the caller.
    ``update`` is [..., rows, cols] and ``row_second_moment`` [..., rows, 1].
    """
    row_mean_sq = update.float().square().mean(dim=-1, keepdim=True)
    row_second_moment.lerp_(row_mean_sq, 1.0 - beta2)
    return update.float() / (row_second_moment.sqrt() + eps)


def adamw_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """Decoupled-weight-decay Adam with bias correction, as torch.optim.AdamW computes it.

    All tensors share one step count (they are updated together); foreach kernels keep it cheap.
    """
    if not params:
        return
    beta1, beta2 = betas
    if weight_decay != 0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    bias_correction1 = 1.0 - beta1**step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, -lr / bias_correction1)
