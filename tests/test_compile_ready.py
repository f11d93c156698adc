"""The step's element-wise math and Newton-Schulz trace as one graph each (torch.compile, fullgraph=True)
on CPU and give the eager result, so compiling the step or capturing it in a CUDA graph needs no rewrite.

Tolerances: float32 results may differ from eager by the reassociation of fused kernels (a few ulps,
1e-5 relative after five iterations); bfloat16 Newton-Schulz by a few bf16 ulps (the ulp is 2^-7 near 1),
because a fused kernel rounds its intermediates at other points than the eager ops, and the Gram form
carries those roundings through its products: 0.04 absolute on values of magnitude <= 1.2.
"""

from __future__ import annotations

import pytest
import torch

from dist_marsm import mars_math
from dist_marsm.newton_schulz import newton_schulz

pytestmark = pytest.mark.slow  # inductor compiles C++ (tens of seconds)


def elementwise_phase(
    grads, prev_grads, momenta, params, scales, gamma: float, beta: float, lr: float, wd: float, lr_scale: float
):
    """The step's element-wise work on a list of local blocks, in the order the step runs it: correction,
    unit clipping with (already reduced) scales, momentum, then the update applied with the Newton-Schulz
    stand-in ``momenta`` (Newton-Schulz is compiled on its own below)."""
    corrected = mars_math.mars_corrections(grads, prev_grads, gamma, beta)
    torch._foreach_mul_(corrected, scales)
    mars_math.momentum_updates(momenta, corrected, beta)
    mars_math.apply_updates(params, momenta, lr, wd, lr_scale)
    return corrected


def efficient_phase(momenta, grads, beta: float, gamma: float):
    return mars_math.efficient_momentum_updates(momenta, grads, beta, gamma)


def _lists(seed: int):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(16, 24), (8, 8), (3, 16, 12)]
    return [[torch.randn(s, generator=gen) for s in shapes] for _ in range(4)]


def test_elementwise_phase_compiles_to_one_graph_and_equals_eager():
    grads, prev, momenta, params = _lists(0)
    scales = [0.5, 1.0, 0.25]
    eager_m, eager_p = [t.clone() for t in momenta], [t.clone() for t in params]
    comp_m, comp_p = [t.clone() for t in momenta], [t.clone() for t in params]
    kw = dict(gamma=0.025, beta=0.95, lr=0.02, wd=0.1, lr_scale=0.2 * 24**0.5)
    eager_c = elementwise_phase(grads, prev, eager_m, eager_p, scales, **kw)
    compiled = torch.compile(elementwise_phase, fullgraph=True)
    comp_c = compiled(grads, prev, comp_m, comp_p, scales, **kw)
    for a, b in zip([*eager_c, *eager_m, *eager_p], [*comp_c, *comp_m, *comp_p]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    moved = max((p - q).abs().max().item() for p, q in zip(eager_p, params))
    assert moved > 1e-4  # the phase did change the parameters, so equality above means something

    grads, _, momenta, _ = _lists(1)
    eager_m, comp_m = [t.clone() for t in momenta], [t.clone() for t in momenta]
    eager_x = efficient_phase(eager_m, grads, 0.95, 0.025)
    comp_x = torch.compile(efficient_phase, fullgraph=True)(comp_m, grads, 0.95, 0.025)
    for a, b in zip([*eager_x, *eager_m], [*comp_x, *comp_m]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["standard", "gram"])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 4e-2)])
def test_newton_schulz_compiles_to_one_graph_and_equals_eager(method, dtype, atol):
    gen = torch.Generator().manual_seed(2)
    for shape in [(64, 160), (96, 32), (2, 24, 40)]:
        torch.compiler.reset()  # one compilation per shape here; the recompile limit is for real loops
        x = torch.randn(shape, generator=gen)
        eager = newton_schulz(x, 5, dtype, method=method)
        compiled = torch.compile(newton_schulz, fullgraph=True, dynamic=False)(x, 5, dtype, method=method)
        assert compiled.dtype == eager.dtype == dtype
        torch.testing.assert_close(compiled.float(), eager.float(), rtol=0, atol=atol)
