"""Ranks that stop agreeing after the first step, and replicas that were never synchronised.

* A param group added on one rank only, or a parameter replaced on one rank only, after the first step:
  every rank raises at the next step, naming the parameter, within seconds (the process group's timeout
  is 30 s, so a hang would fail the time bound). Control: the same change on every rank trains on.
* Plain (non-DTensor) parameters replicated over the world with gradients that differ between ranks (no
  DDP): every rank raises naming the parameter. Control: the same model under DDP trains 50 steps.
Run at 2 and 3 gloo ranks.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from _spawn import scenario, scenario_cases, scenario_check

from dist_marsm import MARSM, build_param_groups

pytestmark = pytest.mark.slow

TIME_BOUND_S = 10


def _fsdp_opt(world):
    from test_distributed import _mesh_1d, fsdp_wrap, make_model

    model = fsdp_wrap(make_model(), _mesh_1d(world))
    return model, MARSM(build_param_groups(model), lr=0.01)


def _first_step(model, opt):
    from test_distributed import lm_loss

    lm_loss(model, 0).backward()
    opt.step()
    opt.zero_grad()
    lm_loss(model, 1).backward()


def _extra_group(seed: int):
    extra = nn.Parameter(torch.randn(8, 8, generator=torch.Generator().manual_seed(seed)))
    extra.grad = torch.ones(8, 8)
    return {"params": [extra], "param_names": ["extra.weight"], "use_mars": True}


def _raises_quickly(opt, pattern: str) -> None:
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=pattern):
        opt.step()
    assert time.monotonic() - start < TIME_BOUND_S, "a rank waited for the timeout"


@scenario(2, 3)
def group_added_on_one_rank(rank, world):
    model, opt = _fsdp_opt(world)
    _first_step(model, opt)
    if rank == 1:
        opt.add_param_group(_extra_group(0))
    _raises_quickly(opt, r"rank \d has \d+ parameters, rank 0 has \d+.*extra\.weight")


@scenario(2, 3)
def group_added_on_every_rank_trains_on(rank, world):
    model, opt = _fsdp_opt(world)
    _first_step(model, opt)
    opt.add_param_group(_extra_group(0))
    extra = opt.param_groups[-1]["params"][0]
    before = extra.detach().clone()
    opt.step()
    assert not torch.equal(extra.detach(), before)
    assert any(e.name == "extra.weight" for fg in opt.step_plan.flat_groups for e in fg.owner_plan.entries)


@scenario(2, 3)
def parameter_replaced_on_one_rank(rank, world):
    model, opt = _fsdp_opt(world)
    _first_step(model, opt)
    group = opt.param_groups[0]
    name = group["param_names"][0]
    if rank == 1:
        old = group["params"][0]
        new = nn.Parameter(old.detach().clone())
        new.grad = old.grad
        group["params"][0] = new
    _raises_quickly(opt, rf"parameters changed on rank\(s\) \[1\] but not on rank\(s\) \[0.*first change: {name}")


class Replicated(nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.hidden = nn.Parameter(torch.randn(16, 8, generator=gen) / 4)
        self.bias = nn.Parameter(torch.zeros(16))

    def forward(self, x):
        return torch.tanh(x @ self.hidden.T + self.bias).square().mean()


def _batch(rank: int, step: int):
    return torch.randn(32, 8, generator=torch.Generator().manual_seed(1000 * step + rank))


@scenario(2, 3)
def unsynchronised_replicas_raise(rank, world):
    model = Replicated()
    opt = MARSM(
        [
            {"params": [model.hidden], "param_names": ["hidden"], "use_mars": True},
            {"params": [model.bias], "param_names": ["bias"], "use_mars": False},
        ],
        lr=0.01,
    )
    model(_batch(rank, 0)).backward()  # each rank its own data, and no gradient all-reduce
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"parameter hidden is a plain tensor replicated over \d ranks.*DDP"):
        opt.step()
    assert time.monotonic() - start < TIME_BOUND_S


@scenario(2, 3)
def ddp_synchronised_replicas_train_50_steps(rank, world):
    model = Replicated()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = MARSM(
        [
            {"params": [model.hidden], "param_names": ["hidden"], "use_mars": True},
            {"params": [model.bias], "param_names": ["bias"], "use_mars": False},
        ],
        lr=0.01,
    )
    for step in range(50):
        opt.zero_grad()
        ddp(_batch(rank, step)).backward()
        opt.step()
    # The replicas stayed equal: every rank holds rank 0's values.
    for p in (model.hidden, model.bias):
        reference = p.detach().clone()
        dist.broadcast(reference, 0)
        assert torch.equal(p.detach(), reference)


_check = scenario_check(__name__, timeout=300, pg_timeout_s=30)


@pytest.mark.parametrize("world,scenario", scenario_cases(__name__))
def test_scenario(scenario, world):
    _check(world, scenario)
