"""Plan units (issue 18's expert locality, issue 19's per-head view): a parameter is orthogonalized in the
parts the ranks hold it in, and per head where ``ns_head_dim`` is set.

References are independent: a float64 Newton-Schulz written here from the quintic formula, applied to
each head's rows (or each expert) separately. Tolerances: float32 Newton-Schulz against float64 differs
by about 1e-6 relative on these sizes, so 1e-5 of the update.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from _spawn import scenario, scenario_cases, scenario_check
from references import newton_schulz as ns64
from test_distributed import _mesh_1d, full

from dist_marsm import MARSM
from dist_marsm.layouts import Layout, split_units


def first_step_update(grad: torch.Tensor, head_dim: int | None, beta=0.95) -> torch.Tensor:
    """W_1 - W_0 / (-lr * scale) of MARSM's first step with gamma 0, clipping off, no weight decay."""
    m = (1 - beta) * grad.double()
    if head_dim is None:
        return ns64(m)
    return torch.cat([ns64(h) for h in m.split(head_dim, dim=0)])


OPT = dict(gamma=0.0, clip=False, weight_decay=0.0, ns_dtype="float32", lr_adjust="none")


@pytest.mark.parametrize("shape,head_dim", [((12, 8), 4), ((6, 10), 3), ((8, 8), 8)])
def test_per_head_view_orthogonalizes_each_heads_rows(shape, head_dim):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).requires_grad_()
    before = w.detach().double().clone()
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    opt = MARSM([w], lr=0.1, ns_head_dim=head_dim, **OPT)
    w.grad = grad.clone()
    opt.step()
    expected = before - 0.1 * first_step_update(grad, head_dim)
    assert torch.allclose(w.double(), expected, atol=1e-5 * expected.abs().max())
    whole = before - 0.1 * first_step_update(grad, None)
    if head_dim != shape[0]:  # negative control: per head is not the whole-matrix result
        assert not torch.allclose(w.double(), whole, atol=1e-3)


def test_head_dim_that_does_not_divide_the_rows_is_named():
    w = torch.randn(10, 4, requires_grad=True)
    opt = MARSM([{"params": [w], "param_names": ["attn.wq.weight"], "use_mars": True}], ns_head_dim=4)
    w.grad = torch.ones_like(w)
    with pytest.raises(ValueError, match="attn.wq.weight: 10 rows do not split into heads of 4 rows"):
        opt.step()


def test_units_of_row_sharded_heads():
    """8 rows in heads of 2 on ranks holding rows [0, 5) and [5, 8): heads 0-1 whole on rank 0 (one unit
    it owns), head 2 split (a unit with no holder), head 3 whole on rank 1."""
    layout = Layout((0, 1), ((slice(0, 5), slice(0, 6)), (slice(5, 8), slice(0, 6))), ((), ()))
    units = split_units((8, 6), layout, 0, head_rows=2)
    assert [(u.shape, u.holder) for u in units] == [((2, 2, 6), 0), ((1, 2, 6), None), ((1, 2, 6), 1)]
    split = units[1]
    assert split.layout.blocks[0][1] == slice(0, 1) and split.layout.blocks[1][1] == slice(1, 2)


def test_units_of_experts_held_whole():
    layout = Layout(
        (0, 1, 2),
        (
            (slice(0, 2), slice(0, 4), slice(0, 5)),
            (slice(2, 3), slice(0, 4), slice(0, 5)),
            (slice(3, 3), slice(0, 4), slice(0, 5)),
        ),
        ((), (), ()),
    )
    units = split_units((3, 4, 5), layout, 1)
    assert [(u.shape, u.holder) for u in units] == [((2, 4, 5), 0), ((1, 4, 5), 1)]
    assert units[1].lead_pos is None  # rank 1's unit is its whole local block: no gather, no copy


# ---------------------------------------------------------------- distributed
class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.wq = nn.Linear(6, 10, bias=False)  # 5 heads of 2 rows: uneven shards split some heads
        self.experts = nn.Parameter(torch.randn(5, 4, 6) * 0.3)

    def forward(self, x):
        return (self.wq(x) ** 2).sum() + torch.einsum("bd,eod->beo", x, self.experts).pow(2).sum()


def _data(step):
    return torch.randn(3, 6, generator=torch.Generator().manual_seed(step))


@scenario(2, 3)
def per_head_fsdp_equals_single_process(rank, world):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model, ref = Attn(), Attn()
    ref.load_state_dict(model.state_dict())
    fully_shard(model, mesh=_mesh_1d(world))
    groups = lambda m: [
        {"params": [m.wq.weight], "use_mars": True, "ns_head_dim": 2},  # noqa: E731
        {"params": [m.experts], "use_mars": True},
    ]
    opt = MARSM(groups(model), lr=0.05, ns_dtype="float32", wire_dtype="float32")
    ref_opt = MARSM(groups(ref), lr=0.05, ns_dtype="float32", process_group=None)
    for step in range(5):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(_data(step)).backward()
            o.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(full(p), q, atol=1e-6), (full(p) - q).abs().max()
    # NS work summed over ranks equals one process's: 5 heads + 5 experts per step
    count = torch.tensor([float(opt.last_step_stats["ns_matrices"])])
    dist.all_reduce(count)
    assert int(count) == 10, int(count)


_check = scenario_check(__name__, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("world,scenario", scenario_cases(__name__))
def test_per_head_and_experts_under_fsdp(world, scenario):
    _check(world, scenario)


@pytest.mark.slow
def test_per_head_on_the_cpu_recipe_at_two_ranks(tmp_path):
    """The debug recipe with ``--optimizer.ns_head_dim 16`` trains at 2 ranks, and each step orthogonalizes
    one matrix per head of every fused wqkv (torchtitan's llama3 debugmodel: 6 layers, 16 query and 16
    key/value heads of 16 rows, so 48 heads per layer) plus wo, w1, w2, w3 whole."""
    import json

    from _titan_jobs import losses, run_job

    rc, log = run_job(str(tmp_path), 2, ["--training.steps", "4", "--optimizer.ns_head_dim", "16"])
    assert rc == 0, log[-3000:]
    loss = losses(str(tmp_path))
    assert loss[4] < loss[1], loss
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert rows[-1]["ns_matrices_total"] == 6 * (16 + 2 * 16 + 4), rows[-1]
