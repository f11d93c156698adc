"""The shared float64 references (tests/references.py) against sources that share none of their code:
an SVD, torch.optim.AdamW, and an identity between two MARS-M variants. A wrong reference would
otherwise pass wrong library code in every test that uses it."""

from __future__ import annotations

import references
import torch


def test_newton_schulz_with_the_cubic_converges_to_the_svd_polar_factor():
    """(a, b, c) = (1.5, -0.5, 0) is the classic cubic iteration, which converges to U V^T for singular values
    in (0, sqrt 3); after normalization they lie in (0, 1]. 40 iterations bring the smallest one here (about
    0.05 after normalization) within 1e-12 of 1 (the error squares once the value is near 1)."""
    g = torch.Generator().manual_seed(0)
    for shape in ((6, 10), (10, 6), (2, 5, 8)):
        m = torch.randn(*shape, generator=g, dtype=torch.float64)
        u, _, vh = torch.linalg.svd(m, full_matrices=False)
        got = references.newton_schulz(m, [(1.5, -0.5, 0.0)] * 40)
        torch.testing.assert_close(got, u @ vh, atol=1e-10, rtol=0)


def test_adamw_reference_equals_torch_adamw_in_float64():
    """Same formulas, both float64: only the order of a few operations differs, so 1e-12."""
    g = torch.Generator().manual_seed(1)
    start = [torch.randn(7, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)]
    params = [p.clone().requires_grad_() for p in start]
    torch_adamw = torch.optim.AdamW(params, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    ref = references.AdamWReference(start, lr=0.01, betas=(0.9, 0.95), eps=1e-8, wd=0.1)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        torch_adamw.step()
        ref.step(grads)
    for p, q in zip(params, ref.params):
        torch.testing.assert_close(p.detach(), q, atol=1e-12, rtol=0)


def test_marsm_efficient_equals_approx_without_clipping():
    """The one-buffer form's Newton-Schulz input gamma g_t + beta m_t obeys the approximate variant's momentum
    recursion when clipping is off, so the two give the same parameters (float64 rounding: 1e-12); with
    clipping on and large gradients they must not."""
    g = torch.Generator().manual_seed(2)
    start = [
        torch.randn(6, 10, generator=g, dtype=torch.float64),
        torch.randn(2, 4, 6, generator=g, dtype=torch.float64),
    ]
    grads = [[3 * torch.randn(p.shape, generator=g, dtype=torch.float64) for p in start] for _ in range(4)]
    efficient, _ = references.marsm_steps(start, grads, lr=0.02, variant="efficient")
    approx, _ = references.marsm_steps(start, grads, lr=0.02, clip=False)
    clipped, _ = references.marsm_steps(start, grads, lr=0.02)
    for e, a, c in zip(efficient, approx, clipped):
        torch.testing.assert_close(e, a, atol=1e-12, rtol=0)
        assert (e - c).abs().max() > 1e-4
