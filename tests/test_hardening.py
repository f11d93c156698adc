"""Settings checked wherever they can change and agreed by every rank (issue 14).

Each test here names a case that trained silently wrong, or failed deep inside torch or gloo, before
the single declaration of settings (dist_marsm/settings.py). Distributed cases run on 2 and 3 spawned
gloo ranks with a short process-group timeout, and pass only if every rank reports the expected error
(a hung rank reports nothing and fails the test).
"""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch
import torch.nn as nn
from _spawn import scenario, scenario_cases, scenario_check
from test_distributed import _mesh_1d, fsdp_wrap, lm_loss, make_model

from dist_marsm import MARSM, NonFiniteGradientError, build_param_groups


def _matrix(seed=0, shape=(4, 6)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def _grad(p, seed):
    p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + seed))


# ------------------------------------------------------------------ settings changed after construction
@pytest.mark.parametrize(
    "key,value",
    [
        ("variant", "bogus"),
        ("ns_steps", 0),
        ("gamma", 5.0),
        ("clip", "no"),
        ("lr", float("nan")),
        ("momentum", 1.0),
        ("ns_dtype", "float8"),
        ("weight_decay", -1.0),
        ("lr", torch.tensor(0.1)),
    ],
)
def test_a_bad_value_set_in_param_groups_fails_the_next_step(key, value):
    p = _matrix()
    opt = MARSM([p], lr=0.01)
    _grad(p, 0)
    opt.step()
    before = p.detach().clone()
    opt.param_groups[0][key] = value
    _grad(p, 1)
    with pytest.raises(ValueError, match=f"param group 0: {key}"):
        opt.step()
    assert torch.equal(p, before)


def test_a_bad_optimizer_option_set_later_fails_the_next_step():
    p = _matrix()
    opt = MARSM([p], lr=0.01)
    opt.options["bucket_mb"] = 0
    _grad(p, 0)
    with pytest.raises(ValueError, match="bucket_mb"):
        opt.step()


def test_ns_steps_changed_after_the_first_step_takes_effect():
    """A changed ns_steps must reach the owner plan: compare with an optimizer built with the new value
    and given the same state (an independent path to the expected result)."""
    p, q = _matrix(), _matrix()
    a = MARSM([p], lr=0.05, ns_dtype="float32")
    _grad(p, 0)
    a.step()
    b = MARSM([q], lr=0.05, ns_dtype="float32", ns_steps=1)
    q.data.copy_(p.data)
    saved = copy.deepcopy(a.state_dict())  # torch's load keeps same-dtype tensors: no aliasing of a's state
    saved["param_groups"][0]["ns_steps"] = 1
    b.load_state_dict(saved)
    a.param_groups[0]["ns_steps"] = 1
    _grad(p, 1)
    _grad(q, 1)
    a.step()
    b.step()
    assert torch.equal(p, q)
    assert a.plan_report()[0]["per_rank"][0]["ns_flops"] == b.plan_report()[0]["per_rank"][0]["ns_flops"]


def test_load_state_dict_validates_the_saved_values():
    p = _matrix()
    opt = MARSM([p], lr=0.01)
    sd = opt.state_dict()
    sd["param_groups"][0]["gamma"] = 7.0
    with pytest.raises(ValueError, match="load_state_dict: param group 0: gamma"):
        opt.load_state_dict(sd)


def test_another_optimizers_state_dict_is_refused_by_name():
    p = _matrix()
    adamw = torch.optim.AdamW([p])
    _grad(p, 0)
    adamw.step()
    opt = MARSM([p], lr=0.01)
    with pytest.raises(ValueError, match="not a MARSM state dict"):
        opt.load_state_dict(adamw.state_dict())


def test_reordered_state_dict_groups_are_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    groups = build_param_groups(model)
    opt = MARSM(groups, lr=0.01)
    sd = opt.state_dict()
    sd["param_groups"] = sd["param_groups"][::-1]
    with pytest.raises(ValueError, match="another order"):
        opt.load_state_dict(sd)


def test_add_param_group_without_use_mars_is_routed_by_ndim_and_steps():
    a, w, b = _matrix(), _matrix(1, (5, 3)), torch.zeros(5, requires_grad=True)
    opt = MARSM([a], lr=0.01)
    opt.add_param_group({"params": [w, b]})
    single = _matrix(2, (3, 3))
    opt.add_param_group({"params": single})  # one tensor, not a list, as torch.optim accepts
    assert [g["use_mars"] for g in opt.param_groups] == [True, True, False, True]
    for t in (a, w, b, single):
        t.grad = torch.ones_like(t)
    opt.step()
    assert "exp_avg" in opt.state[b] and "momentum" in opt.state[w]


def test_variant_switch_approx_to_exact_continues():
    p = _matrix()
    opt = MARSM([p], lr=0.01, ns_dtype="float32")
    _grad(p, 0)
    opt.step()
    opt.param_groups[0]["variant"] = "exact"
    target = torch.randn(4, 6)

    def closure():
        loss = ((p - target) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    opt.step(closure)
    assert torch.isfinite(p).all() and "prev_param" in opt.state[p]


def test_variant_switch_to_efficient_after_steps_is_refused():
    p = _matrix()
    opt = MARSM([p], lr=0.01)
    _grad(p, 0)
    opt.step()
    opt.param_groups[0]["variant"] = "efficient"
    with pytest.raises(ValueError, match="variant changed from 'approx' to 'efficient'"):
        opt.step()


# ------------------------------------------------------------------ bad input, named
def test_complex_parameter_is_refused():
    with pytest.raises(ValueError, match="complex"):
        MARSM([torch.zeros(3, 3, dtype=torch.complex64, requires_grad=True)])


def test_integer_parameter_is_refused():
    with pytest.raises(ValueError, match="floating-point"):
        MARSM([{"params": [torch.zeros(3, 3, dtype=torch.int64)], "use_mars": True}])


def test_sparse_gradient_is_refused_by_name():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = MARSM(build_param_groups(emb))
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="weight has a sparse gradient"):
        opt.step()


def test_bad_process_group_is_refused():
    with pytest.raises(ValueError, match="process_group"):
        MARSM([_matrix()], process_group="bogus")


def test_tensor_lr_is_refused():
    with pytest.raises(ValueError, match="lr must be .* not a tensor"):
        MARSM([_matrix()], lr=torch.tensor(0.01))


def test_string_adamw_patterns_are_refused():
    with pytest.raises(TypeError, match="adamw_patterns"):
        build_param_groups(nn.Linear(3, 3), adamw_patterns="output")


# ------------------------------------------------------------------ large gradients and non-finite names
def test_large_finite_gradient_is_clipped_not_called_nonfinite():
    """One entry of 2e19 in float32 (its square overflows float32): the clipped update must be the unit
    direction of the corrected gradient, as the float64 reference computes it."""
    p = torch.zeros(4, 6, requires_grad=True)
    opt = MARSM([p], lr=0.1, gamma=0.0, ns_dtype="float32", weight_decay=0.0, nonfinite="skip")
    g = torch.zeros(4, 6)
    g[1, 2] = 2e19
    p.grad = g
    opt.step()
    assert not opt.last_step_stats["skipped"]
    assert torch.isfinite(p).all() and p.abs().max() > 0
    # the momentum is (1 - beta) * clipped gradient: exactly one entry of magnitude (1 - 0.95) * 1
    m = opt.state[p]["momentum"].double()
    assert math.isclose(m[1, 2].item(), 0.05, rel_tol=1e-6)


def test_nonfinite_error_names_an_unnamed_parameter_by_position():
    a, b = _matrix(), _matrix(1)
    opt = MARSM([a, b], lr=0.01)
    a.grad = torch.zeros_like(a)
    b.grad = torch.full_like(b, float("nan"))
    with pytest.raises(NonFiniteGradientError, match=r"param_groups\[0\]\[1\]"):
        opt.step()


def test_exact_closure_that_does_not_zero_gradients_gives_the_same_result():
    """The optimizer clears gradients before each closure call, so a closure without zero_grad must
    give bitwise the same parameters as one with it."""
    target = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))

    def run(zero_inside):
        p = _matrix()
        opt = MARSM([p], lr=0.02, variant="exact", ns_dtype="float32")

        def closure():
            if zero_inside:
                opt.zero_grad()
            loss = ((p - target) ** 2).sum()
            loss.backward()
            return loss

        for _ in range(3):
            opt.step(closure)
        return p.detach()

    assert torch.equal(run(True), run(False))


# ------------------------------------------------------------------ ranks that disagree
def _fsdp_opt(world, **kw):
    model = fsdp_wrap(make_model(), _mesh_1d(world))
    return model, MARSM(build_param_groups(model), **kw)


@scenario(2, 3)
def lr_differs_between_ranks(rank, world):
    model, opt = _fsdp_opt(world, lr=0.01 * (1 + (rank == world - 1)))
    lm_loss(model, 0).backward()
    with pytest.raises(RuntimeError, match=r"settings differ.*param group 0 lr 0\.01 vs 0\.02"):
        opt.step()


@scenario(2, 3)
def lr_changed_on_one_rank_after_the_first_step(rank, world):
    model, opt = _fsdp_opt(world, lr=0.01)
    lm_loss(model, 0).backward()
    opt.step()
    opt.zero_grad()
    if rank == 1:
        opt.param_groups[1]["lr"] = 0.5
    lm_loss(model, 1).backward()
    with pytest.raises(RuntimeError, match=r"settings differ.*param group 1 lr 0\.01 vs 0\.5"):
        opt.step()


@scenario(2, 3)
def bad_value_on_one_rank_fails_every_rank(rank, world):
    """Rank 1 sets gamma=5 after the first step: it names the bad value, the others the difference,
    and nobody waits for the process group's timeout."""
    model, opt = _fsdp_opt(world, lr=0.01)
    lm_loss(model, 0).backward()
    opt.step()
    opt.zero_grad()
    if rank == 1:
        opt.param_groups[0]["gamma"] = 5.0
    lm_loss(model, 1).backward()
    start = time.monotonic()
    with pytest.raises((ValueError, RuntimeError), match=r"gamma"):
        opt.step()
    assert time.monotonic() - start < 10, "a rank waited for the timeout"


def _option_differs(rank, world, key, values):
    model, opt = _fsdp_opt(world, lr=0.01, **{key: values[rank == world - 1]})
    lm_loss(model, 0).backward()
    with pytest.raises(RuntimeError, match=f"settings differ.*{key}"):
        opt.step()


@scenario(2, 3)
def owner_policy_differs(rank, world):
    _option_differs(rank, world, "owner_policy", ("largest_first", "round_robin"))


@scenario(2, 3)
def wire_dtype_differs(rank, world):
    _option_differs(rank, world, "wire_dtype", ("bfloat16", "float32"))


@scenario(2, 3)
def bucket_mb_differs(rank, world):
    _option_differs(rank, world, "bucket_mb", (64.0, 0.001))


@scenario(2, 3)
def nonfinite_policy_differs(rank, world):
    _option_differs(rank, world, "nonfinite", ("raise", "skip"))


_check = scenario_check(__name__, timeout=300, pg_timeout_s=30)


@pytest.mark.slow
@pytest.mark.parametrize("world,scenario", scenario_cases(__name__))
def test_ranks_that_disagree_all_raise(scenario, world):
    _check(world, scenario)
