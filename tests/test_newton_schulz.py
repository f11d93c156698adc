"""Newton-Schulz: the Gram form against an independent float64 reference of the standard iteration,
coefficient sets and their validation, the fallback rule and FLOP model, the stacking policy, and the
distributed engine with ns_method="gram" against one process.

The reference (tests/references.py) is written from the formula (X <- a X + b (X X^T) X + c (X X^T)^2 X
on the wide orientation), not taken from dist_marsm.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from _spawn import scenario, scenario_cases, scenario_check
from references import newton_schulz as reference

ns = importlib.import_module("dist_marsm.newton_schulz")  # dist_marsm.newton_schulz is also a function name

MUON = (3.4445, -4.7750, 2.0315)
# Amsel, Persson, Musco, Gower (2025), arXiv:2505.16932, the coefficient list of the paper's code, typed
# in here from the paper; the code divides all but the last by (1.01, 1.01^3, 1.01^5).
PAPER_POLAR_EXPRESS = [
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
]


def rank_deficient(rows, cols, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, rank, generator=g, dtype=torch.float64) @ torch.randn(
        rank, cols, generator=g, dtype=torch.float64
    )


def spectrum_1_over_i(rows, cols, seed):
    """Singular values 1, 1/2, ..., 1/k: many small ones, the hard case for the Gram form."""
    g = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64))
    return (u / torch.arange(1, k + 1, dtype=torch.float64)) @ v.T


INPUTS = {
    "wide": lambda: torch.randn(16, 56, generator=torch.Generator().manual_seed(1), dtype=torch.float64),
    "tall": lambda: torch.randn(56, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64),
    "square": lambda: torch.randn(24, 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64),
    "batched": lambda: torch.randn(3, 12, 40, generator=torch.Generator().manual_seed(4), dtype=torch.float64),
    "batched tall": lambda: torch.randn(2, 2, 40, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64),
    "one row": lambda: torch.randn(1, 30, generator=torch.Generator().manual_seed(6), dtype=torch.float64),
    "one column": lambda: torch.randn(30, 1, generator=torch.Generator().manual_seed(7), dtype=torch.float64),
    "empty rows": lambda: torch.zeros(0, 5, dtype=torch.float64),
    "empty batch": lambda: torch.zeros(0, 4, 9, dtype=torch.float64),
    "rank deficient": lambda: rank_deficient(20, 60, 5),
    "zero": lambda: torch.zeros(6, 20, dtype=torch.float64),
}


# ------------------------------------------------------------------------------ float64: gram == standard
@pytest.mark.parametrize("coefficients", ["muon", "polar_express"])
@pytest.mark.parametrize("name", INPUTS)
@pytest.mark.parametrize("restarts", [None, (), (2, 4)])
def test_gram_equals_reference_in_float64(name, coefficients, restarts):
    """Both forms compute the same polynomial of X0 X0^T; in float64 they differ by rounding only.
    Tolerance 1e-9: unit roundoff 1e-16 amplified by the iteration's slope (prod a^2 < 1e6 over 5
    steps of either coefficient set). ``restarts`` given forces the Gram form even on square matrices."""
    m = INPUTS[name]()
    coeffs = ns.resolve_coefficients(coefficients, 5)
    want = reference(m, coeffs)
    got = ns.newton_schulz(m, 5, torch.float64, method="gram", coefficients=coefficients, restarts=restarts)
    assert got.shape == m.shape and got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=1e-9, rtol=0)
    std = ns.newton_schulz(m, 5, torch.float64, method="standard", coefficients=coefficients)
    torch.testing.assert_close(std, want, atol=1e-9, rtol=0)


def test_polar_express_table_is_the_papers_with_its_safety_factor():
    got = ns.resolve_coefficients("polar_express", 10)
    want = [(a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in PAPER_POLAR_EXPRESS[:-1]] + [
        PAPER_POLAR_EXPRESS[-1]
    ] * 3
    assert len(got) == 10
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-15)
    assert ns.resolve_coefficients("muon", 3) == (MUON,) * 3


# ------------------------------------------------------------------------------ low precision: spread
@pytest.mark.parametrize("dtype, margin", [(torch.bfloat16, 0.05), (torch.float32, 1e-3)])
@pytest.mark.parametrize("coefficients", ["muon", "polar_express"])
@pytest.mark.parametrize("shape", [(128, 512), (512, 128), (64, 256)])
def test_gram_spread_no_worse_than_standard(shape, coefficients, dtype, margin):
    """Singular values of the result and its distance to the exact polar factor (float64 SVD): the
    Gram form with its default restarts is within ``margin`` of the standard form. bf16 margin 0.05:
    both forms round every product to 8 bits (2^-8 = 0.004 relative) over 5 steps, and the measured
    gap is below 0.03 (docs/benchmarks.md); float32 1e-3. Input: singular values 1/i (many small ones)."""
    m = spectrum_1_over_i(*shape, seed=sum(shape))
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    polar = u @ vh

    def stats(**kw):
        y = ns.newton_schulz(m, 5, dtype, coefficients=coefficients, **kw).double()
        s = torch.linalg.svdvals(y)
        return s.min().item(), s.max().item(), ((y - polar).norm() / polar.norm()).item()

    std_min, std_max, std_err = stats()
    gram_min, gram_max, gram_err = stats(method="gram")
    assert gram_max <= std_max + margin and gram_min >= std_min - margin, (std_min, std_max, gram_min, gram_max)
    assert gram_err <= std_err + margin, (std_err, gram_err)


@pytest.mark.parametrize("coefficients", ["muon", "polar_express"])
def test_gram_without_restarts_blows_up_in_bfloat16(coefficients):
    """Why the restarts exist (and that the spread test above can fail): without them, R's rounding
    errors with negative eigenvalues grow by about a^2 per step, and bf16 results leave [0, 1.5]
    by far (measured: max singular value 189 / 1.2e6 here)."""
    m = spectrum_1_over_i(128, 512, seed=0)
    y = ns.newton_schulz(m, 5, torch.bfloat16, method="gram", coefficients=coefficients, restarts=())
    assert torch.linalg.svdvals(y.double()).max() > 10


# ------------------------------------------------------------------------------ fallback and FLOPs
def test_fallback_rule_break_even_aspect_1_5():
    """Gram runs only where its FLOPs are strictly fewer: aspect max/min > 1.5 (derived in
    gram_pays_off's docstring; 100 x 150 ties exactly)."""
    for dtype in (torch.bfloat16, torch.float32):
        for coefficients in ("muon", "polar_express"):
            kw = dict(dtype=dtype, coefficients=coefficients)
            assert ns.method_used((100, 150), 5, "gram", **kw) == "standard"
            assert ns.method_used((150, 100), 5, "gram", **kw) == "standard"
            assert ns.method_used((100, 151), 5, "gram", **kw) == "gram"
            assert ns.method_used((4, 151, 100), 5, "gram", **kw) == "gram"
            assert ns.method_used((64, 64), 5, "gram", **kw) == "standard"
            assert ns.method_used((1, 30), 5, "gram", **kw) == "gram"
            assert ns.method_used((100, 1000), 5, "standard", **kw) == "standard"
    # one step is one Gram product, one R^2 and one final product either way: nothing to save
    assert ns.method_used((10, 1000), 1, "gram") == "standard"
    assert ns.method_used((10, 1000), 2, "gram") == "gram"


def test_restart_schedule():
    """The schedule measured in docs/benchmarks.md: bf16 every 3 iterations with muon, every 2 with
    polar_express or explicit triples; float32 every 5."""
    assert ns.gram_restarts(5, torch.bfloat16, "muon") == (3,)
    assert ns.gram_restarts(7, torch.bfloat16, "muon") == (3, 6)
    assert ns.gram_restarts(5, torch.bfloat16, "polar_express") == (2, 4)
    assert ns.gram_restarts(5, torch.bfloat16, [MUON]) == (2, 4)
    assert ns.gram_restarts(5, torch.float32, "polar_express") == ()
    assert ns.gram_restarts(10, torch.float32, "muon") == (5,)


def test_square_gram_request_runs_standard_bitwise():
    m = torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(ns.newton_schulz(m, 5, dtype, method="gram"), ns.newton_schulz(m, 5, dtype))


@pytest.mark.parametrize("shape", [(8, 40), (40, 8), (3, 6, 30), (12, 12), (12, 17), (1, 9)])
@pytest.mark.parametrize(
    "steps, dtype, coefficients",
    [
        (5, torch.bfloat16, "muon"),
        (5, torch.bfloat16, "polar_express"),
        (5, torch.float32, "muon"),
        (7, torch.float32, "muon"),
        (3, torch.bfloat16, "muon"),
        (8, torch.bfloat16, "muon"),
    ],
)
@pytest.mark.parametrize("method", ["standard", "gram"])
def test_flops_equal_the_products_really_run(monkeypatch, shape, steps, dtype, coefficients, method):
    """newton_schulz_flops against a count of 2 m k n per matrix product actually executed."""
    counted = []

    def bmm(p, q):
        counted.append(2 * p.size(0) * p.size(1) * p.size(2) * q.size(2))
        return torch.bmm(p, q)

    def baddbmm(inp, p, q, beta, alpha):
        counted.append(2 * p.size(0) * p.size(1) * p.size(2) * q.size(2))
        return torch.baddbmm(inp, p, q, beta=beta, alpha=alpha)

    monkeypatch.setattr(ns._Native, "mm", staticmethod(bmm))
    monkeypatch.setattr(ns._Native, "addmm", staticmethod(baddbmm))
    monkeypatch.setattr(ns, "_emulate_bf16_matmul", lambda x: False)
    ns.newton_schulz(torch.randn(*shape), steps, dtype, method=method, coefficients=coefficients)
    assert sum(counted) == ns.newton_schulz_flops(shape, steps, method, dtype=dtype, coefficients=coefficients)


def test_flops_gram_saves_on_llama_mlp_shape():
    """1024 x 3584 (aspect 3.5): standard 5 (4 m^2 n + 2 m^3) = 80 m^3; gram with float32's no restarts
    4 m^2 n + 34 m^3 = 48 m^3; with bf16 muon's restart at 3, 8 m^2 n + 28 m^3 = 56 m^3."""
    m3 = 1024**3
    assert ns.newton_schulz_flops((1024, 3584), 5) == 80 * m3
    assert ns.newton_schulz_flops((3584, 1024), 5, "gram", dtype=torch.float32) == 48 * m3
    assert ns.newton_schulz_flops((1024, 3584), 5, "gram", dtype="bfloat16") == 56 * m3
    assert ns.newton_schulz_flops((2, 1024, 3584), 5, "gram", dtype="bfloat16") == 112 * m3


def test_owner_plan_costs_use_the_method_run():
    from dist_marsm.layouts import replicated_layout
    from dist_marsm.owner_plan import MatrixEntry, build_group_plan

    shapes = [(64, 64), (64, 224), (224, 64), (2, 32, 96)]
    entries = [
        MatrixEntry(i, f"m{i}", s, replicated_layout(s, (0,)), 5, "bfloat16", "gram", "polar_express")
        for i, s in enumerate(shapes)
    ]
    plan = build_group_plan(entries, (0,), 0, "largest_first", 1 << 20, 2)
    for e, s in zip(plan.entries, shapes):
        assert e.flops == ns.newton_schulz_flops(s, 5, "gram", dtype=torch.bfloat16, coefficients="polar_express")
    assert plan.entries[0].flops == ns.newton_schulz_flops((64, 64), 5, "standard")
    assert plan.entries[1].flops < ns.newton_schulz_flops((64, 224), 5, "standard")


# ------------------------------------------------------------------------------ coefficients
@pytest.mark.parametrize(
    "spec, steps, match",
    [
        ("fast", 5, "unknown Newton-Schulz coefficient set 'fast'"),
        ([], 5, "non-empty list"),
        ("muon", 0, "steps must be a positive int"),
        ([(1.0, 2.0)], 5, "entry 0 must be an \\(a, b, c\\) triple"),
        ([MUON, (1.0, float("nan"), 2.0)], 2, "entry 1 has b = nan"),
        ([MUON, (1.0, True, 2.0)], 2, "entry 1 has b = True"),
        ([MUON, "abc"], 2, "entry 1 must be an"),
        ([MUON] * 3, 5, "3 triples given for 5 steps"),
        (torch.tensor([MUON]), 1, "set name or a non-empty list"),
        (3.4, 5, "set name or a non-empty list"),
    ],
)
def test_coefficient_validation_names_the_problem(spec, steps, match):
    with pytest.raises(ValueError, match=match):
        ns.resolve_coefficients(spec, steps)


def test_explicit_coefficients():
    assert ns.resolve_coefficients([MUON], 3) == (MUON,) * 3
    assert ns.resolve_coefficients([[1, 2, 3], (4.0, 5, 6)], 2) == ((1.0, 2.0, 3.0), (4.0, 5.0, 6.0))
    m = torch.randn(8, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    triples = [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5), (1.875, -1.25, 0.375)]
    torch.testing.assert_close(
        ns.newton_schulz(m, 3, torch.float64, coefficients=triples), reference(m, triples), atol=1e-12, rtol=0
    )


def test_bad_method_and_restarts_are_rejected():
    with pytest.raises(ValueError, match="unknown Newton-Schulz method 'fast'"):
        ns.newton_schulz(torch.randn(4, 8), method="fast")
    with pytest.raises(ValueError, match="unknown Newton-Schulz method"):
        ns.newton_schulz_flops((4, 8), 5, "fast")
    with pytest.raises(ValueError, match="restarts must lie in"):
        ns.newton_schulz(torch.randn(4, 8), 5, method="gram", restarts=(5,))


# ------------------------------------------------------------------------------ many matrices
def test_orthogonalize_many_equals_one_by_one_and_stacks_small_shapes(monkeypatch):
    g = torch.Generator().manual_seed(0)
    mats = (
        [torch.randn(4, 40, generator=g) for _ in range(3)]
        + [torch.randn(40, 4, generator=g)]
        + [torch.randn(200, 300, generator=g) for _ in range(2)]
    )
    want = [ns.newton_schulz(m, 5, torch.float32, method="gram") for m in mats]
    calls = []
    real = ns.newton_schulz
    monkeypatch.setattr(ns, "newton_schulz", lambda x, *a, **k: calls.append(tuple(x.shape)) or real(x, *a, **k))
    got = ns.orthogonalize_many(mats, 5, torch.float32, method="gram")
    assert sorted(calls) == sorted([(3, 4, 40), (40, 4), (200, 300), (200, 300)]), calls
    for g_, w in zip(got, want):
        torch.testing.assert_close(g_, w, atol=1e-6, rtol=0)  # batched vs single matmul summation order
    assert ns.stack_pays_off((128, 4096), "cpu") and not ns.stack_pays_off((129, 4096), "cpu")
    assert ns.stack_pays_off((4096, 4096), "meta")


# ------------------------------------------------------------------------------ distributed
@scenario(2)
def gram_fsdp_fp32(rank, world):
    """FSDP2 TinyLM (uneven shards, 3 expert matrices) with ns_method='gram' and polar_express, float32
    Newton-Schulz and wire, against one process: only the reduce-scatter's summation order differs, so
    the tolerance of tests/test_distributed.py (1e-6 after 10 steps) applies."""
    from test_distributed import FP32, _mesh_1d, fsdp_wrap, make_model, train_pair

    kw = dict(FP32, ns_method="gram", ns_coefficients="polar_express")
    model = fsdp_wrap(make_model(), _mesh_1d(world))
    diff, moved, opt = train_pair(model, make_model(), **kw)
    assert moved > 1e-2 and diff <= 1e-6, (diff, moved)
    methods = {
        e.name: ns.method_used(e.shape, 5, e.ns_method, dtype=torch.float32)
        for fg in opt.step_plan.flat_groups
        for e in fg.owner_plan.entries
    }
    assert "gram" in methods.values() and "standard" in methods.values(), methods


@scenario(2)
def ns_method_differs_between_ranks(rank, world):
    """Ranks must agree on the method (their owner plans are built from its FLOPs): every rank raises."""
    from test_distributed import _mesh_1d, fsdp_wrap, lm_loss, make_model

    from dist_marsm import MARSM, build_param_groups

    model = fsdp_wrap(make_model(), _mesh_1d(world))
    opt = MARSM(build_param_groups(model), lr=0.01, ns_method="gram" if rank == world - 1 else "standard")
    lm_loss(model, 0).backward()
    with pytest.raises(RuntimeError, match="settings differ.*ns_method"):
        opt.step()


_check = scenario_check(__name__)


@pytest.mark.parametrize("world,scenario", scenario_cases(__name__))
def test_distributed_gram_equals_single_process(world, scenario):
    _check(world, scenario)
