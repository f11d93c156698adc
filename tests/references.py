"""Independent float64 references for the optimizer's math, one matrix at a time, in plain Python loops.

Every test and benchmarks/gpu_check.py compares the library against these. They are written from the
formulas below (MARS-M: Liu et al. 2025 and the MARS-M reference code; Muon's quintic Newton-Schulz;
NorMuon's row normalization; AdamW: Loshchilov & Hutter), never from dist_marsm's code, and import nothing
from dist_marsm, so a mistake in the library cannot reappear here. They favour plainness over speed:
float64, no batching, no foreach, no fused kernels.

Newton-Schulz (the convention dist_marsm.newton_schulz states): per matrix M (A x B), transpose when A > B
so that X X^T is the smaller Gram matrix, X = M / (||M||_F + eps) with eps = 1e-7 added to the Frobenius
norm (not a max), then per iteration k with its own (a_k, b_k, c_k): S = X X^T, X = a X + (b S + c S^2) X.

MARS-M, per matrix parameter W (A x B), step t with gradient g_t (c_t and the clip act on each matrix of a
batch [..., A, B] separately):
    approx / exact:  c = g_t + gamma beta / (1 - beta) (g_t - g_prev);  c /= max(1, ||c||_F) (when clip)
                     m = beta m + (1 - beta) c;  X = m
        approx: g_prev is the previous step's gradient (zero at the first step); exact: the caller passes
        g_prev, the gradient at the previous iterate on the current batch.
    efficient:       m = beta m + (1 - gamma)(1 - beta) / beta g_t;  X = gamma g_t + beta m  (no clip)
    O = NewtonSchulz(X) per matrix
    NorMuon (normalize="neuron"): v = beta2 v + (1 - beta2) mean over columns of O^2 (one per row),
        O' = O / (sqrt(v) + eps), O' *= ||O||_F / ||O'||_F per matrix
    W = W (1 - lr wd) - lr s O, with s = 0.2 sqrt(max(A, B)) ("moonlight"), sqrt(max(1, A / B))
        ("original") or 1 ("none"); the decay uses the unscaled lr.

AdamW: m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2, W = W (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps)
with m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t).
"""

from __future__ import annotations

import math

import torch

MUON_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic, every iteration
NS_EPS = 1e-7


def newton_schulz(m: torch.Tensor, coefficients=None, steps: int = 5, eps: float = NS_EPS) -> torch.Tensor:
    """Newton-Schulz of every matrix of ``m`` ([A, B] or [..., A, B]) in float64.

    ``coefficients``: one (a, b, c) triple per iteration; None means Muon's triple for ``steps`` iterations.
    """
    coefficients = [MUON_COEFFICIENTS] * steps if coefficients is None else list(coefficients)
    m = m.detach().double().cpu()
    if m.ndim > 2:
        flat = m.reshape(-1, *m.shape[-2:])
        out = [newton_schulz(x, coefficients, eps=eps) for x in flat]
        return torch.stack(out).reshape(m.shape) if out else m.clone()
    tall = m.size(0) > m.size(1)
    x = m.T if tall else m
    x = x / (torch.linalg.matrix_norm(x) + eps)
    for a, b, c in coefficients:
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if tall else x


def lr_scale(rows: int, cols: int, mode: str = "moonlight") -> float:
    return {"moonlight": 0.2 * math.sqrt(max(rows, cols)), "original": math.sqrt(max(1.0, rows / cols)), "none": 1.0}[
        mode
    ]


def _matrices(t: torch.Tensor) -> torch.Tensor:
    """The matrices of [..., A, B] as a view [n, A, B]: writes through it change ``t``."""
    return t.view(-1, *t.shape[-2:])


class MarsmReference:
    """MARS-M on float64 copies of ``params``; ``step(grads)`` applies one step, ``params`` and ``momenta``
    hold the state. ``round_params`` (e.g. to bf16 and back) is applied to W after every step."""

    def __init__(
        self,
        params,
        lr,
        beta=0.95,
        gamma=0.025,
        wd=0.1,
        variant="approx",
        clip=True,
        lr_adjust="moonlight",
        normalize=None,
        beta2=0.95,
        eps=1e-8,
        coefficients=None,
        round_params=None,
    ):
        if variant not in ("approx", "exact", "efficient"):
            raise ValueError(f"variant must be approx, exact or efficient, got {variant!r}")
        self.params = [p.detach().double().cpu().clone() for p in params]
        self.momenta = [torch.zeros_like(p) for p in self.params]
        self.prev_grads = [torch.zeros_like(p) for p in self.params]
        self.row_second_moments = [torch.zeros(*p.shape[:-1], 1, dtype=torch.float64) for p in self.params]
        self.lr, self.beta, self.gamma, self.wd = lr, beta, gamma, wd
        self.variant, self.clip, self.lr_adjust, self.normalize = variant, clip, lr_adjust, normalize
        self.beta2, self.eps, self.coefficients, self.round_params = beta2, eps, coefficients, round_params

    def step(self, grads, prev_grads=None) -> None:
        """``prev_grads`` (exact variant): the gradients at the previous iterate on this step's batch."""
        beta, gamma = self.beta, self.gamma
        for i, g in enumerate(grads):
            g = g.detach().double().cpu()
            if self.variant == "efficient":
                self.momenta[i] = beta * self.momenta[i] + (1 - gamma) * (1 - beta) / beta * g
                x = gamma * g + beta * self.momenta[i]
            else:
                g_prev = self.prev_grads[i] if prev_grads is None else prev_grads[i].detach().double().cpu()
                c = g + gamma * beta / (1 - beta) * (g - g_prev)
                if self.clip:
                    for mat in _matrices(c):
                        norm = mat.norm()
                        if norm > 1:
                            mat /= norm
                self.momenta[i] = beta * self.momenta[i] + (1 - beta) * c
                x = self.momenta[i]
            o = newton_schulz(x, self.coefficients)
            if self.normalize == "neuron":
                v = self.row_second_moments[i] = self.beta2 * self.row_second_moments[i] + (1 - self.beta2) * (
                    o * o
                ).mean(dim=-1, keepdim=True)
                normalized = o / (v.sqrt() + self.eps)
                for before, after in zip(_matrices(o), _matrices(normalized)):
                    after *= before.norm() / after.norm()
                o = normalized
            rows, cols = o.shape[-2:]
            new = self.params[i] * (1 - self.lr * self.wd) - self.lr * lr_scale(rows, cols, self.lr_adjust) * o
            self.params[i] = self.round_params(new) if self.round_params else new
            self.prev_grads[i] = g


def marsm_steps(params, grads_per_step, lr, **kwargs):
    """MARS-M over a list of steps' gradients; returns (params, momenta), float64 on the CPU."""
    ref = MarsmReference(params, lr, **kwargs)
    for grads in grads_per_step:
        ref.step(grads)
    return ref.params, ref.momenta


class AdamWReference:
    """AdamW with bias correction and decoupled decay, on float64 copies of ``params``."""

    def __init__(self, params, lr, betas=(0.9, 0.95), eps=1e-8, wd=0.1):
        self.params = [p.detach().double().cpu().clone() for p in params]
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, wd
        self.t = 0

    def step(self, grads) -> None:
        b1, b2 = self.betas
        self.t += 1
        for i, g in enumerate(grads):
            g = g.detach().double().cpu()
            self.exp_avg[i] = b1 * self.exp_avg[i] + (1 - b1) * g
            self.exp_avg_sq[i] = b2 * self.exp_avg_sq[i] + (1 - b2) * g * g
            m_hat = self.exp_avg[i] / (1 - b1**self.t)
            v_hat = self.exp_avg_sq[i] / (1 - b2**self.t)
            self.params[i] = self.params[i] * (1 - self.lr * self.wd) - self.lr * m_hat / (v_hat.sqrt() + self.eps)
