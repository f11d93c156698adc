"""MARS-M on one process, checked formula by formula against independent computations (issue 2).

The reference (tests/references.py) is written from the algorithm's text, one matrix at a time, in float64,
with a plain 2-D Newton-Schulz written like the MARS-M reference code; the library batches matrices,
works in float32 and routes through its owner plan. Tolerances: float32 Newton-Schulz against the
float64 reference agrees to ~1e-6 relative per step (5 quintic iterations amplify input rounding by
at most ~10x), so parameters agree to 1e-5 after a few steps of lr 0.02.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from references import MarsmReference
from references import newton_schulz as ref_newton_schulz

from dist_marsm import MARSM, build_param_groups, mars_math, newton_schulz

SHAPES = {"wide": (6, 10), "tall": (10, 6), "square": (8, 8), "batched": (3, 4, 6)}


def make_params(seed=0):
    torch.manual_seed(seed)
    return [torch.randn(*s, requires_grad=True) for s in SHAPES.values()]


def grads_for(params, step, big=False):
    g = torch.Generator().manual_seed(step)
    scale = 3.0 if big else 0.01  # big: ||c|| > 1, clipping acts; small: it does not
    return [torch.randn(p.shape, generator=g) * scale for p in params]


# ------------------------------------------------------------------------------ Newton-Schulz
@pytest.mark.parametrize("name", SHAPES)
def test_newton_schulz_matches_reference_fp32(name):
    m = torch.randn(*SHAPES[name], generator=torch.Generator().manual_seed(1))
    got = newton_schulz(m, dtype=torch.float32).double()
    want = ref_newton_schulz(m)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


@pytest.mark.parametrize("name", SHAPES)
def test_newton_schulz_bf16_close_to_fp64(name):
    # bf16 has 8 mantissa bits; after 5 iterations entries of O(1) agree to a few 1e-2.
    m = torch.randn(*SHAPES[name], generator=torch.Generator().manual_seed(2))
    got = newton_schulz(m).double()
    assert newton_schulz(m).dtype == torch.bfloat16
    assert (got - ref_newton_schulz(m)).abs().max() < 6e-2


def test_newton_schulz_orthogonalizes():
    # singular values land in roughly [0.5, 1.5] (Keller Jordan's quintic is not exact by design)
    m = torch.randn(32, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    s = torch.linalg.svdvals(newton_schulz(m, dtype=torch.float32).double())
    assert s.min() > 0.5 and s.max() < 1.5, s


def test_flops_formula():
    from dist_marsm.newton_schulz import newton_schulz_flops

    m, n = 4, 10  # per iteration: 2 m^2 n + 2 m^3 + 2 m^2 n
    assert newton_schulz_flops((10, 4), steps=1) == 2 * 16 * 10 + 2 * 64 + 2 * 16 * 10
    assert newton_schulz_flops((3, m, n), steps=5) == 3 * 5 * (4 * m * m * n + 2 * m**3)


# ------------------------------------------------------------------------------ approx variant
@pytest.mark.parametrize("big", [False, True], ids=["no-clip-needed", "clipping-acts"])
@pytest.mark.parametrize("lr_adjust", ["moonlight", "original", "none"])
def test_approx_matches_reference(big, lr_adjust):
    params = make_params()
    opt = MARSM([{"params": params, "use_mars": True}], lr=0.02, ns_dtype="float32", lr_adjust=lr_adjust)
    ref = MarsmReference(make_params(), lr=0.02, lr_adjust=lr_adjust)
    for step in range(4):
        grads = grads_for(params, step, big)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref.step(grads)
    for p, q in zip(params, ref.params):
        assert torch.allclose(p.double(), q, atol=1e-5), (p.double() - q).abs().max()


def test_clipping_acts_only_on_the_matrices_over_the_unit_norm():
    """In one step, some matrices (and one matrix of a batch) need clipping and the others must be left
    alone: the step clips per slot. Same reference and tolerance as above."""
    params = make_params()
    opt = MARSM([{"params": params, "use_mars": True}], lr=0.02, ns_dtype="float32")
    ref = MarsmReference(make_params(), lr=0.02)
    big = {0: True, 1: False, 2: True}  # wide, tall, square; the batch: only its middle matrix
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        grads = [torch.randn(p.shape, generator=g) * (3.0 if big.get(i) else 0.01) for i, p in enumerate(params)]
        grads[3][1] *= 300.0
        if step == 0:  # the premise: norms on both sides of 1, within the batch too
            norms = [grads[0].norm(), grads[1].norm(), *grads[3].flatten(1).norm(dim=1)]
            assert norms[0] > 1 and norms[1] < 1 and norms[3] > 1 and norms[2] < 1 and norms[4] < 1, norms
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        opt.step()
        ref.step(grads)
    for p, q in zip(params, ref.params):
        assert torch.allclose(p.double(), q, atol=1e-5), (p.double() - q).abs().max()


def test_foreach_scalar_gives_the_scalars_result_bitwise():
    """On CPU the step passes foreach ops a 0-dim tensor instead of a Python scalar (faster); the results
    must be bitwise those of the scalar for every dtype, mixed lists included (a float32 operand would
    round a float64 parameter's decay factor)."""
    factor = 1.0 - 3e-4 * 0.1 - 1.234e-9
    for dtypes in ([torch.bfloat16], [torch.float16], [torch.float32], [torch.float64], [torch.float32, torch.float64]):
        g = torch.Generator().manual_seed(0)
        tensors = [torch.randn(5, 7, generator=g).to(d) for d in dtypes]
        want = [t.clone() for t in tensors]
        torch._foreach_mul_(tensors, mars_math.foreach_scalar(tensors, factor))
        torch._foreach_mul_(want, factor)
        for got, w in zip(tensors, want):
            assert got.dtype == w.dtype and torch.equal(got, w), dtypes


def test_gradient_norms_stay_finite_for_finite_gradients_beyond_float32_range():
    """Norms are taken in float32 on CPU; a finite float32 gradient whose norm exceeds float32's range
    (3.4e38) must still get its true float64 norm (else the guard calls it non-finite), and a NaN stays
    NaN. Others agree with the float64 norm to float32 rounding (1e-6 relative)."""
    from dist_marsm.functional import frobenius_norms

    g = torch.Generator().manual_seed(0)
    small = torch.randn(16, 16, generator=g)
    huge = torch.full((4, 4), 2e38)  # norm 8e38
    nan = torch.tensor([[1.0, float("nan")]])
    norms = frobenius_norms([small, huge, nan])
    assert norms.dtype == torch.float64
    assert norms[0].item() == pytest.approx(small.double().norm().item(), rel=1e-6)
    assert norms[1].item() == pytest.approx(8e38, rel=1e-6)
    assert math.isnan(norms[2].item())


def test_clip_switch_off_matches_reference():
    params = make_params()
    opt = MARSM([{"params": params, "use_mars": True}], lr=0.02, ns_dtype="float32", clip=False)
    ref = MarsmReference(make_params(), lr=0.02, clip=False)
    for step in range(3):
        grads = grads_for(params, step, big=True)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref.step(grads)
    for p, q in zip(params, ref.params):
        assert torch.allclose(p.double(), q, atol=1e-5)


def test_first_step_uses_zero_previous_gradient():
    # step 1: c = g + coef * (g - 0); with clipping off m = (1 - beta) * c
    p = torch.randn(4, 6, requires_grad=True)
    opt = MARSM([p], lr=0.0, clip=False, ns_dtype="float32")
    g = torch.randn(4, 6)
    p.grad = g
    opt.step()
    coef = 0.025 * 0.95 / 0.05
    assert torch.allclose(opt.state[p]["momentum"], 0.05 * (g + coef * g), atol=1e-6)
    assert torch.equal(opt.state[p]["prev_grad"], g)


# ------------------------------------------------------------------------------ efficient variant
def test_efficient_gives_same_direction_as_approx_without_clipping():
    """n_t = gamma g_t + beta u_t follows the approx momentum's recursion exactly (see mars_math)."""
    a, b = make_params(), make_params()
    opt_a = MARSM([{"params": a, "use_mars": True}], lr=0.02, ns_dtype="float32", clip=False)
    opt_b = MARSM([{"params": b, "use_mars": True}], lr=0.02, ns_dtype="float32", variant="efficient")
    for step in range(5):
        grads = grads_for(a, step, big=True)
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
        g0 = grads[0]
        n = opt_b.state[b[0]]["momentum"] * 0.95 + 0.025 * g0
        assert torch.allclose(n, opt_a.state[a[0]]["momentum"], atol=1e-6)
    for p, q in zip(a, b):
        assert torch.allclose(p, q, atol=1e-5)
    assert set(opt_b.state[b[0]]) == {"step", "momentum"}  # one buffer, like Muon


# ------------------------------------------------------------------------------ exact variant
def test_exact_variant_on_least_squares_with_closed_form_gradients():
    """Loss_t(W) = 0.5 ||W X_t - Y_t||^2 has gradient (W X_t - Y_t) X_t^T, so g(x_{t-1}; batch_t) is
    computed in closed form by the reference, while the optimizer re-evaluates it through the closure."""
    torch.manual_seed(0)
    w = torch.randn(5, 7, requires_grad=True)
    opt = MARSM([w], lr=0.02, ns_dtype="float32", variant="exact")
    ref = MarsmReference([w], lr=0.02, variant="exact")
    w_ref = w_prev_ref = ref.params[0]
    calls = []
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(7, 9, generator=g), torch.randn(5, 9, generator=g)

        def closure():
            calls.append(step)
            opt.zero_grad()
            loss = 0.5 * (w @ x - y).square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        grad = lambda W: (W @ x.double() - y.double()) @ x.double().T  # noqa: E731
        g_now, g_prev = grad(w_ref), grad(w_prev_ref) if step > 0 else torch.zeros_like(w_ref)
        w_prev_ref = w_ref
        ref.step([g_now], prev_grads=[g_prev])
        w_ref = ref.params[0]
        assert torch.allclose(w.double(), w_ref, atol=1e-5), (step, (w.double() - w_ref).abs().max())
    assert calls == [0, 1, 1, 2, 2, 3, 3]  # one evaluation at step 1, then two per step


def test_exact_without_closure_is_an_error():
    p = torch.randn(3, 4, requires_grad=True)
    p.grad = torch.randn(3, 4)
    with pytest.raises(ValueError, match="closure"):
        MARSM([p], variant="exact").step()


# ------------------------------------------------------------------------------ Muon equivalence
def test_gamma_zero_no_clip_is_torch_muon():
    """gamma=0, clip=False, moonlight scaling == torch.optim.Muon(nesterov=False, adjust_lr_fn='match_rms_adamw').
    Mapping: momentum buffer lerp (same), NS in bf16 with (a,b,c) (same), decoupled decay lr*wd (same),
    0.2*sqrt(max(A,B)) (same). Differences: Muon divides by max(||X||, eps), we by ||X|| + 1e-7, and Muon
    fuses addmm in bf16 - so agreement is to bf16 rounding of the update (lr*scale*O), not bitwise."""
    a = [torch.randn(6, 10, generator=torch.Generator().manual_seed(i), requires_grad=True) for i in range(2)]
    b = [p.detach().clone().requires_grad_() for p in a]
    ours = MARSM([{"params": a, "use_mars": True}], lr=0.02, gamma=0.0, clip=False, weight_decay=0.1)
    muon = torch.optim.Muon(b, lr=0.02, momentum=0.95, nesterov=False, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    start = [p.detach().clone() for p in a]
    for step in range(3):
        for p, q, g in zip(a, b, grads_for(a, step, big=True)):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        muon.step()
    moved = max((p - s).abs().max().item() for p, s in zip(a, start))
    diff = max((p - q).abs().max().item() for p, q in zip(a, b))
    # bf16 unit roundoff is 2^-8 = 0.4%; five iterations with differently fused products compound it
    # to a few percent of the update, so 5% of the movement. The same run with Muon's "original"
    # scaling (a 37% smaller step for these 6x10 matrices) must fail this bound.
    assert diff <= 0.05 * moved, (diff, moved)
    c = [p.detach().clone().requires_grad_() for p in start]
    other = torch.optim.Muon(c, lr=0.02, momentum=0.95, nesterov=False, weight_decay=0.1, adjust_lr_fn="original")
    for step in range(3):
        for q, g in zip(c, grads_for(c, step, big=True)):
            q.grad = g.clone()
        other.step()
    assert max((p - q).abs().max().item() for p, q in zip(a, c)) > 0.05 * moved


# ------------------------------------------------------------------------------ AdamW route
def test_adamw_route_matches_torch_adamw():
    torch.manual_seed(0)
    a = [torch.randn(7, requires_grad=True), torch.randn(3, 5, requires_grad=True)]
    b = [p.detach().clone().requires_grad_() for p in a]
    ours = MARSM([{"params": a, "use_mars": False}], lr=0.01, weight_decay=0.1)
    ref = torch.optim.AdamW(b, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    for step in range(5):
        for p, q, g in zip(a, b, grads_for(a, step, big=True)):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for p, q in zip(a, b):
        assert torch.allclose(p, q, atol=1e-6, rtol=0), (p - q).abs().max()


def test_build_param_groups_routes_embeddings_head_and_vectors_to_adamw():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok_embeddings = nn.Embedding(10, 4)
            self.layer = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.output = nn.Linear(4, 10, bias=False)

    groups = build_param_groups(M())
    by_flag = {g["use_mars"]: set(g["param_names"]) for g in groups}
    assert by_flag[True] == {"layer.weight"}
    assert by_flag[False] == {"tok_embeddings.weight", "layer.bias", "norm.weight", "norm.bias", "output.weight"}
    opt = MARSM(groups)
    assert [g["use_mars"] for g in opt.param_groups] == [True, False]


def test_ungrouped_params_are_split_by_ndim():
    m = nn.Linear(3, 4)
    opt = MARSM(m.parameters())
    flags = {g["use_mars"]: [tuple(p.shape) for p in g["params"]] for g in opt.param_groups}
    assert flags == {True: [(4, 3)], False: [(4,)]}


def test_vector_in_mars_group_is_rejected_with_its_name():
    with pytest.raises(ValueError, match="bias"):
        MARSM([{"params": [torch.zeros(3)], "param_names": ["bias"], "use_mars": True}])


# ------------------------------------------------------------------------------ batching & views
def test_same_shape_matrices_are_stacked(monkeypatch):
    import importlib

    ns_module = importlib.import_module("dist_marsm.newton_schulz")
    calls = []
    real = ns_module.newton_schulz
    monkeypatch.setattr(ns_module, "newton_schulz", lambda x, *a, **k: calls.append(tuple(x.shape)) or real(x, *a, **k))
    params = [torch.randn(4, 6, requires_grad=True) for _ in range(4)] + [torch.randn(5, 3, requires_grad=True)] * 1
    opt = MARSM([{"params": params, "use_mars": True}], lr=0.01)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert sorted(calls) == sorted([(4, 4, 6), (5, 3)]), calls


def test_flatten_view_for_conv_kernels():
    w = torch.randn(4, 3, 2, 2, requires_grad=True)
    opt = MARSM([w], lr=0.02, ns_dtype="float32", matrix_view="flatten")
    ref = MarsmReference([w.detach().reshape(4, 12)], lr=0.02)
    for step in range(3):
        g = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(step))
        w.grad = g.clone()
        opt.step()
        ref.step([g.reshape(4, 12)])
    assert torch.allclose(w.double().reshape(4, 12), ref.params[0], atol=1e-5)


# ------------------------------------------------------------------------------ bookkeeping
def test_state_dict_round_trip_gives_bit_identical_steps():
    def run(opt, params, steps):
        for step in steps:
            for p, g in zip(params, grads_for(params, step, big=True)):
                p.grad = g
            opt.step()

    a = make_params()
    extra = torch.randn(5, requires_grad=True)
    opt_a = MARSM([{"params": a, "use_mars": True}, {"params": [extra], "use_mars": False}], lr=0.02)
    run(opt_a, a + [extra], range(3))
    saved = {k: v for k, v in opt_a.state_dict().items()}
    import copy

    saved = copy.deepcopy(saved)
    b = [p.detach().clone().requires_grad_() for p in a]
    extra_b = extra.detach().clone().requires_grad_()
    opt_b = MARSM([{"params": b, "use_mars": True}, {"params": [extra_b], "use_mars": False}], lr=0.02)
    opt_b.load_state_dict(saved)
    run(opt_a, a + [extra], range(3, 6))
    run(opt_b, b + [extra_b], range(3, 6))
    for p, q in zip(a + [extra], b + [extra_b]):
        assert torch.equal(p, q)


def test_bf16_params_keep_fp32_state_across_load():
    p = torch.randn(4, 6, dtype=torch.bfloat16, requires_grad=True)
    opt = MARSM([p], lr=0.01)
    p.grad = torch.randn(4, 6, dtype=torch.bfloat16)
    opt.step()
    assert opt.state[p]["momentum"].dtype == torch.float32
    q = p.detach().clone().requires_grad_()
    opt2 = MARSM([q], lr=0.01)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[q]["momentum"].dtype == torch.float32
    assert torch.equal(opt2.state[q]["momentum"], opt.state[p]["momentum"])


def test_none_gradient_is_skipped():
    a, b = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    before = b.detach().clone()
    opt = MARSM([a, b], lr=0.1)
    a.grad = torch.randn(3, 4)
    opt.step()
    assert torch.equal(b, before) and len(opt.state[b]) == 0 and len(opt.state[a]) > 0


def test_lr_scheduler_drives_group_lr():
    p = torch.randn(3, 4, requires_grad=True)
    opt = MARSM([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0)
    assert opt.param_groups[0]["lr"] == 0.0
    before = p.detach().clone()
    p.grad = torch.randn(3, 4)
    opt.step()
    sched.step()
    assert torch.allclose(p, before * (1 - 0.0))  # lr 0: neither decay nor update


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(lr=-1.0), "lr"),
        (dict(momentum=1.0), "momentum"),
        (dict(momentum=-0.1), "momentum"),
        (dict(gamma=-0.5), "gamma"),
        (dict(weight_decay=-1), "weight_decay"),
        (dict(variant="fast"), "variant"),
        (dict(ns_steps=0), "ns_steps"),
        (dict(ns_dtype="float8"), "ns_dtype"),
        (dict(lr_adjust="x"), "lr_adjust"),
        (dict(adamw_betas=(0.9, 1.5)), "adamw_betas"),
        (dict(adamw_eps=-1), "adamw_eps"),
        (dict(clip="yes"), "clip"),
        (dict(normalize="column"), "normalize"),
        (dict(wire_dtype="int8"), "wire_dtype"),
        (dict(owner_policy="random"), "owner_policy"),
        (dict(nonfinite="ignore"), "nonfinite"),
        (dict(bucket_mb=0), "bucket_mb"),
        (dict(variant="efficient", momentum=0.0), "momentum"),
        (dict(matrix_view="tube"), "matrix_view"),
    ],
)
def test_bad_hyperparameters_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MARSM([torch.zeros(2, 2, requires_grad=True)], **kwargs)


def test_mars_math_units():
    g, gp = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.0])
    assert torch.allclose(mars_math.mars_correction(g, gp, 0.1, 0.9), g + 0.1 * 0.9 / 0.1 * (g - gp))
    assert torch.allclose(mars_math.unit_clip_scale(torch.tensor([4.0, 0.25])), torch.tensor([0.5, 1.0]))
    assert mars_math.lr_scale((3, 12), "moonlight") == pytest.approx(0.2 * math.sqrt(12))
    assert mars_math.lr_scale((12, 3), "original") == pytest.approx(2.0)
    assert mars_math.lr_scale((3, 12), "original") == 1.0


def test_bf16_matmul_emulation_matches_torch_bf16_matmul(monkeypatch):
    """On CPUs without bf16 matrix units, Newton-Schulz multiplies bf16 values in float32 and rounds
    the product to bf16 (fast); torch's own bf16 matmul (slow there) must give the same matrices.
    Tolerance: one bf16 ulp of values below 2 (2^-7), from a different float32 summation order."""
    import importlib

    ns_module = importlib.import_module("dist_marsm.newton_schulz")
    torch.manual_seed(0)
    x = torch.randn(3, 40, 24)
    monkeypatch.setattr(ns_module, "_emulate_bf16_matmul", lambda t: True)
    emulated = ns_module.newton_schulz(x, 5, torch.bfloat16)
    monkeypatch.setattr(ns_module, "_emulate_bf16_matmul", lambda t: False)
    native = ns_module.newton_schulz(x, 5, torch.bfloat16)
    assert emulated.dtype == native.dtype == torch.bfloat16
    torch.testing.assert_close(emulated.float(), native.float(), atol=2**-7, rtol=0)


def test_gamma_zero_keeps_one_buffer_and_matches_gamma_tiny():
    """gamma = 0 is Muon: no previous gradient is stored (Muon's memory), and the update is the limit
    of a tiny gamma (checked against gamma = 1e-12, whose correction is below float32 resolution)."""
    params, tiny = make_params(), make_params()
    opt, ref = MARSM(params, lr=0.02, gamma=0.0), MARSM(tiny, lr=0.02, gamma=1e-12)
    for step in range(3):
        for ps, o in ((params, opt), (tiny, ref)):
            for p, g in zip(ps, grads_for(ps, step)):
                p.grad = g
            o.step()
    for p, q in zip(params, tiny):
        assert "prev_grad" not in opt.state[p] and "prev_grad" in ref.state[q]
        torch.testing.assert_close(p, q, atol=0, rtol=0)


def test_exact_rewinds_the_whole_model_including_adamw_params():
    """The exact variant's first closure call must see the whole previous iterate x_{t-1}: the MARS-M
    matrix and the AdamW-routed vector both at their values before the previous step, and the second
    call the current x_t. Checked by recording what the closure sees against snapshots taken here."""
    torch.manual_seed(0)
    w = torch.randn(3, 4, requires_grad=True)
    s = torch.randn(3, requires_grad=True)
    x, y = torch.randn(4, 5), torch.randn(3, 5)
    opt = MARSM(
        [{"params": [w], "use_mars": True}, {"params": [s], "use_mars": False}],
        lr=0.05,
        variant="exact",
        ns_dtype="float32",
    )
    seen = []

    def closure():
        opt.zero_grad()
        seen.append((w.detach().clone(), s.detach().clone()))
        loss = ((w @ x) * s[:, None] - y).square().mean()
        loss.backward()
        return loss

    history = [(w.detach().clone(), s.detach().clone())]
    for _ in range(3):
        seen.clear()
        opt.step(closure)
        calls = list(seen)
        history.append((w.detach().clone(), s.detach().clone()))
        if len(history) == 2:
            assert len(calls) == 1  # first step: no previous iterate yet
            continue
        assert len(calls) == 2
        prev, cur = history[-3], history[-2]
        for seen_t, want in zip(calls[0], prev):
            assert torch.equal(seen_t, want), "first closure call is not at x_{t-1}"
        for seen_t, want in zip(calls[1], cur):
            assert torch.equal(seen_t, want), "second closure call is not at x_t"
    assert not torch.equal(history[-1][1], history[-2][1])  # s really moves, so the check has teeth
