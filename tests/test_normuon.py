"""NorMuon-style neuron-wise normalization (issue 7), against an independent computation.

Reference (tests/references.py, from the NorMuon paper's algorithm, float64, one matrix at a time): after
O = NewtonSchulz(m), v = beta2 * v + (1 - beta2) * mean_cols(O * O) per row, O' = O / (sqrt(v) + eps),
then O' *= ||O||_F / ||O'||_F so the update keeps the unnormalized RMS; then the usual lr scaling and
weight decay. Rows are output neurons (dim -2), the dimension FSDP2 shards.

Tolerance: the library runs Newton-Schulz in float32 here (ns_dtype="float32") against the float64
reference; as in test_optimizer, that agrees to ~1e-6 relative per step, so 1e-5 after 5 steps.
The distributed checks use a float32 wire, where the only difference from one process is the order
of the gradient reduce-scatter sums (~1e-7 per step): 1e-6 after 10 steps, as in test_distributed.
"""

from __future__ import annotations

import math

import pytest
import torch
from _spawn import scenario, scenario_cases, scenario_check
from references import marsm_steps
from test_optimizer import SHAPES, grads_for, make_params

from dist_marsm import MARSM


@pytest.mark.parametrize("variant", ["approx", "efficient"])
def test_neuron_normalize_matches_reference(variant):
    params = make_params()
    start = [p.detach().clone() for p in params]
    grads_per_step = [grads_for(params, s, big=(s % 2 == 0)) for s in range(5)]
    opt = MARSM(params, lr=0.02, ns_dtype="float32", normalize="neuron", variant=variant)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    expected, _ = marsm_steps(start, grads_per_step, lr=0.02, normalize="neuron", variant=variant)
    for name, p, e, s in zip(SHAPES, params, expected, start):
        assert (p.detach().double() - s.double()).abs().max() > 1e-2, f"{name} did not move"
        torch.testing.assert_close(p.detach().double(), e, atol=1e-5, rtol=0, msg=f"{name}")


def test_neuron_normalize_changes_the_update():
    """Negative control: without normalization the reference with normalization is not matched."""
    params = make_params()
    start = [p.detach().clone() for p in params]
    grads_per_step = [grads_for(params, s) for s in range(3)]
    opt = MARSM(params, lr=0.02, ns_dtype="float32")
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    expected, _ = marsm_steps(start, grads_per_step, lr=0.02, normalize="neuron")
    assert max((p.detach().double() - e).abs().max().item() for p, e in zip(params, expected)) > 1e-4


def test_row_state_is_one_value_per_row_and_round_trips():
    params = make_params()
    opt = MARSM(params, lr=0.02, normalize="neuron")
    for p, g in zip(params, grads_for(params, 0)):
        p.grad = g
    opt.step()
    for p in params:
        assert opt.state[p]["row_second_moment"].shape == (*p.shape[:-1], 1)
    clone = MARSM(make_params(), lr=0.02, normalize="neuron")
    clone.load_state_dict(opt.state_dict())
    for p, q in zip(params, clone.param_groups[0]["params"]):
        torch.testing.assert_close(
            clone.state[q]["row_second_moment"], opt.state[p]["row_second_moment"], atol=0, rtol=0
        )


# ------------------------------------------------------------------------------ distributed
@scenario(2, 3)
def fsdp_neuron_fp32_equals_single(rank, world):
    from test_distributed import FP32, _mesh_1d, fsdp_wrap, make_model, train_pair

    diff, moved, _ = train_pair(fsdp_wrap(make_model(), _mesh_1d(world)), make_model(), normalize="neuron", **FP32)
    assert moved > 1e-2 and diff <= 1e-6, (diff, moved)


@scenario(2, 3)
def fsdp_neuron_extra_traffic_is_two_norms_per_matrix(rank, world):
    """Normalization adds no owner traffic, and exactly one all-reduce of 2 float32 per matrix."""
    from test_distributed import _mesh_1d, fsdp_wrap, lm_loss, make_model

    from dist_marsm import build_param_groups

    stats = {}
    for normalize in (None, "neuron"):
        model = fsdp_wrap(make_model(), _mesh_1d(world))
        opt = MARSM(build_param_groups(model), lr=0.05, normalize=normalize)
        for step in range(2):
            opt.zero_grad()
            lm_loss(model, step).backward()
            opt.step()
        stats[normalize] = dict(opt.last_step_stats)
        # Independent count of matrices: each 2-D MARS-M parameter is one, a 3-D one is a batch.
        n_matrices = sum(math.prod(p.shape[:-2]) for g in opt.param_groups if g["use_mars"] for p in g["params"])
    assert stats["neuron"]["bytes_sent"] == stats[None]["bytes_sent"], stats
    extra = stats["neuron"]["allreduce_bytes"] - stats[None]["allreduce_bytes"]
    expected = 2 * 4 * n_matrices if world > 1 else 0
    assert extra == expected, (extra, expected, stats)


@scenario(2)
def fsdp_tp_rowwise_neuron_is_a_clear_error(rank, world):
    """Rows split across ranks (a rowwise-parallel weight, Shard(1)) cannot be row-normalized locally."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    w = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)]))
    w.grad = distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)])
    opt = MARSM([{"params": [w], "use_mars": True, "param_names": ["layers.0.wo.weight"]}], normalize="neuron")
    with pytest.raises(ValueError, match=r"whole rows.*layers\.0\.wo\.weight"):
        opt.step()


_check = scenario_check(__name__)


@pytest.mark.slow
@pytest.mark.parametrize("world,scenario", scenario_cases(__name__))
def test_scenario(world, scenario):
    _check(world, scenario)
