"""The distributed engine equals the single-process optimizer (issue 3).

Ranks are spawned once per world size (1 to 4, gloo, CPU); every scenario runs on every rank and
compares against a single-process MARSM run on the same data, which each rank computes itself.
Data is identical on all ranks, so FSDP2's averaged gradients equal the single-process gradients.

Tolerances: with float32 Newton-Schulz and a float32 wire the only difference is the summation
order of the gradient reduce-scatter (about 1e-7 per step), so 1e-6 after 10 steps. With the
bfloat16 defaults, the momentum is rounded to bf16 before Newton-Schulz in both paths (the
single-process path casts it too), so the paths differ only by that reduce-scatter order pushed
through bf16 rounding: bounded by 2e-3 of the parameters' total movement.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from _spawn import scenario, scenario_cases, scenario_check

STEPS = 10


class TinyLM(nn.Module):
    """Transformer-like shapes chosen to be awkward: 3 rows (< 4 ranks), 13 rows, 3 experts."""

    def __init__(self, experts: bool = True, vocab: int = 11, dim: int = 6):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, 3, bias=False)
        self.wv = nn.Linear(dim, 3, bias=False)
        self.wo = nn.Linear(3, dim, bias=False)
        self.ff = nn.Sequential(nn.Linear(dim, 13, bias=False), nn.GELU(), nn.Linear(13, dim, bias=True))
        self.experts = nn.Parameter(torch.randn(3, dim, dim) * 0.3) if experts else None
        self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        h = self.norm(self.tok_embeddings(tokens))
        k, v = self.wk(h), self.wv(h)
        att = torch.softmax(k @ v.transpose(-1, -2) / math.sqrt(3), dim=-1)
        h = h + self.wo(att @ v) + self.wq(h)
        h = h + self.ff(h)
        if self.experts is not None:
            h = h + torch.einsum("btd,eod->bto", h, self.experts) / 3
        return self.output(h)


def lm_loss(model, step):
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, 11, (2, 5), generator=g)
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), tokens[:, 1:].reshape(-1))


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return TinyLM(**kw)


def fsdp_wrap(model, mesh):
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.ff, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full(p):
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def train_pair(dist_model, ref_model, steps=STEPS, **opt_kw):
    """Train both models the same way; returns (max abs param difference, total movement, opt)."""
    from dist_marsm import MARSM, build_param_groups

    start = [full(p).detach().clone() for p in ref_model.parameters()]
    opt = MARSM(build_param_groups(dist_model), **opt_kw)
    ref = MARSM(build_param_groups(ref_model), process_group=None, **opt_kw)
    for step in range(steps):
        for model, o in ((dist_model, opt), (ref_model, ref)):
            if opt_kw.get("variant") == "exact":

                def closure(model=model, o=o):
                    o.zero_grad()
                    loss = lm_loss(model, step)
                    loss.backward()
                    return loss

                o.step(closure)
            else:
                o.zero_grad()
                lm_loss(model, step).backward()
                o.step()
    diff = max((full(p) - q).abs().max().item() for p, q in zip(dist_model.parameters(), ref_model.parameters()))
    moved = max((q - s).abs().max().item() for q, s in zip(ref_model.parameters(), start))
    return diff, moved, opt


def _mesh_1d(world):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))


FP32 = dict(lr=0.05, ns_dtype="float32", wire_dtype="float32")


# ---------------------------------------------------------------------------------- scenarios
@scenario(1, 2, 3, 4)
def fsdp_approx_fp32(rank, world):
    diff, moved, _ = train_pair(fsdp_wrap(make_model(), _mesh_1d(world)), make_model(), **FP32)
    assert moved > 1e-2, moved
    assert diff <= 1e-6, f"max |distributed - single| = {diff}"


@scenario(2, 3, 4)
def fsdp_efficient_fp32(rank, world):
    diff, moved, _ = train_pair(fsdp_wrap(make_model(), _mesh_1d(world)), make_model(), variant="efficient", **FP32)
    assert moved > 1e-2 and diff <= 1e-6, (diff, moved)


@scenario(2, 3, 4)
def fsdp_exact_fp32(rank, world):
    diff, moved, _ = train_pair(fsdp_wrap(make_model(), _mesh_1d(world)), make_model(), variant="exact", **FP32)
    assert moved > 1e-2 and diff <= 1e-6, (diff, moved)


@scenario(2, 4)
def fsdp_bf16_defaults(rank, world):
    diff, moved, _ = train_pair(fsdp_wrap(make_model(), _mesh_1d(world)), make_model(), lr=0.05)
    assert moved > 1e-2 and diff <= 2e-3 * moved, (diff, moved)


@scenario(2, 3, 4)
def fsdp_ns_once_and_bytes(rank, world):
    """Every matrix is orthogonalized exactly once per step in the whole job, and the bytes each
    rank sends equal an independent count from the local shard sizes and the owners."""
    from torch.distributed.tensor import DTensor

    model = fsdp_wrap(make_model(), _mesh_1d(world))
    diff, _, opt = train_pair(model, make_model(), steps=2, **FP32)
    stats = opt.last_step_stats
    count = torch.tensor([float(stats["ns_matrices"])])
    dist.all_reduce(count)
    single_count = 6 + 3  # wq wk wv wo ff0 ff2, plus 3 expert matrices
    assert int(count) == single_count, (int(count), single_count)
    # independent byte count: my shard goes to the owner (if not me); as owner I send every other rank its shard
    owners = opt.plan_report()[0]["owners"]
    names = dict(zip(opt.param_groups[0]["param_names"], opt.param_groups[0]["params"]))
    expected = 0
    # Experts: FSDP2 shards dim 0, so each rank holds whole experts; each expert's owner must be the rank
    # holding it (DTensor's own local sizes say which) and nothing is sent for them.
    expert_rows = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(expert_rows, torch.tensor([float(names["experts"].to_local().shape[0])]))
    holder_of = [r for r, n in enumerate(expert_rows) for _ in range(int(n))]
    for name, owner in owners.items():
        if name.startswith("experts["):
            first = int(name[len("experts[") :].split("]")[0].split("..")[0])
            assert owner == holder_of[first], (name, owner, holder_of)
            continue
        p = names[name]
        assert isinstance(p, DTensor)
        sizes = [torch.zeros(1) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([float(p.to_local().numel())]))
        if owner == rank:
            expected += sum(int(s) for r, s in enumerate(sizes) if r != rank)
        else:
            expected += p.to_local().numel()
    assert stats["bytes_sent"] == expected * 4, (stats["bytes_sent"], expected * 4)


@scenario(4)
def hsdp_2x2(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model = make_model()
    fully_shard(model.ff, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert tuple(model.wq.weight.placements) == (Replicate(), Shard(0))
    diff, moved, opt = train_pair(model, make_model(), **FP32)
    assert moved > 1e-2 and diff <= 1e-6, (diff, moved)
    count = torch.tensor([float(opt.last_step_stats["ns_matrices"])])
    dist.all_reduce(count)
    assert int(count) == 9, f"HSDP orthogonalized {int(count)} matrices, expected each of 9 once per job"


class TPMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Linear(6, 14, bias=False)  # colwise: 7 rows per tp rank, then 4+3 over dp (uneven)
        self.w2 = nn.Linear(14, 10, bias=False)  # rowwise: Shard(1) over tp
        self.head = nn.Linear(10, 5, bias=False)

    def forward(self, x):
        return self.head(F.gelu(self.w2(F.gelu(self.w1(x)))))


@scenario(4)
def fsdp_tp_2x2(rank, world):
    """FSDP over dp plus TP over tp: DTensors on a 2-D mesh, with strided shards for colwise rows."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from dist_marsm import MARSM

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model, ref = TPMLP(), TPMLP()
    ref.load_state_dict(model.state_dict())
    parallelize_module(model, mesh["tp"], {"w1": ColwiseParallel(), "w2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    from torch.distributed.tensor.placement_types import _StridedShard

    placements = {n: tuple(p.placements) for n, p in model.named_parameters()}
    assert model.w1.weight.device_mesh.ndim == 2, placements
    assert isinstance(placements["w1.weight"][0], _StridedShard), placements  # FSDP over TP rows
    # TP's own forward (partial-sum all-reduces) reorders float sums, so the single-process reference
    # steps on the distributed gradients themselves: this isolates the optimizer's result.
    start = [p.detach().clone() for p in ref.parameters()]
    opt = MARSM(model.parameters(), **FP32)
    ref_opt = MARSM(ref.parameters(), process_group=None, **FP32)
    for step in range(STEPS):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        model(x).square().mean().backward()
        for p, q in zip(model.parameters(), ref.parameters()):
            q.grad = full(p.grad).clone()
        opt.step()
        ref_opt.step()
    diff = max((full(p) - q).abs().max().item() for p, q in zip(model.parameters(), ref.parameters()))
    moved = max((q - s).abs().max().item() for q, s in zip(ref.parameters(), start))
    assert moved > 1e-2 and diff <= 1e-6, (diff, moved, placements)


@scenario(1, 2, 3)
def ddp_replicated(rank, world):
    """Plain tensors replicated on every rank: each matrix orthogonalized once, shared by collective."""
    model, ref = make_model(), make_model()
    diff, moved, opt = train_pair(model, ref, **FP32)  # same data on every rank = DDP-averaged grads
    assert moved > 1e-2 and diff <= 1e-6, (diff, moved)
    count = torch.tensor([float(opt.last_step_stats["ns_matrices"])])
    dist.all_reduce(count)
    assert int(count) == 9, int(count)


@scenario(2)
def unused_param_skipped(rank, world):
    """A parameter with no gradient on any rank is skipped on all, consistently."""
    from dist_marsm import MARSM

    model = fsdp_wrap(make_model(), _mesh_1d(world))
    opt = MARSM(model.parameters(), **FP32)
    before = full(model.wq.weight).clone()
    for step in range(2):
        opt.zero_grad()
        lm_loss(model, step).backward()
        model.wq.weight.grad = None
        opt.step()
    assert torch.equal(full(model.wq.weight), before)
    assert "momentum" not in opt.state[model.wq.weight]


@scenario(2)
def participation_mismatch_raises(rank, world):
    from dist_marsm import MARSM

    model = fsdp_wrap(make_model(), _mesh_1d(world))
    opt = MARSM(build_groups_named(model), **FP32)
    opt.zero_grad()
    lm_loss(model, 0).backward()
    if rank == world - 1:
        model.wk.weight.grad = None
    try:
        opt.step()
    except RuntimeError as e:
        assert "wk.weight" in str(e) and "gradient on" in str(e), str(e)
    else:
        raise AssertionError("no error although ranks disagree about wk.weight")


@scenario(2)
def shape_mismatch_raises(rank, world):
    """Ranks building different models fail at the first step with the parameter's name."""
    from dist_marsm import MARSM

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5 if rank == 0 else 6, bias=False))
    opt = MARSM([{"params": list(model.parameters()), "param_names": ["0.weight"], "use_mars": True}])
    model(torch.randn(2, 4)).sum().backward()
    try:
        opt.step()
    except RuntimeError as e:
        assert "0.weight" in str(e), str(e)
    else:
        raise AssertionError("no error for different shapes on different ranks")


@scenario(2)
def bf16_params_fp32_state(rank, world):
    """bf16 parameters (as FSDP2 leaves them with param_dtype storage) get float32 optimizer state."""
    from dist_marsm import MARSM

    model = fsdp_wrap(make_model(experts=False).to(torch.bfloat16), _mesh_1d(world))
    ref = make_model(experts=False).to(torch.bfloat16)
    opt = MARSM(model.parameters(), lr=0.05)
    ref_opt = MARSM(ref.parameters(), lr=0.05, process_group=None)
    for step in range(3):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            lm_loss(m, step).backward()
            o.step()
    state = opt.state[model.wq.weight]
    assert state["momentum"].dtype == torch.float32 and model.wq.weight.dtype == torch.bfloat16
    diff = max((full(p).float() - q.float()).abs().max().item() for p, q in zip(model.parameters(), ref.parameters()))
    assert diff <= 2e-2, diff  # a few bf16 ulps of O(1) weights, from reduce-scatter order


def build_groups_named(model):
    from dist_marsm import build_param_groups

    return build_param_groups(model)


_check = scenario_check(__name__)


@pytest.mark.slow
@pytest.mark.parametrize("world,scenario", scenario_cases(__name__))
def test_scenario(world, scenario):
    _check(world, scenario)
