"""dtensor_layout against the local shards DTensor and FSDP2 really hold, and its cost in the world size.

One process plays each rank of a mesh in turn through torch's fake process group ("fake" backend): no
collective runs, but DTensor and fully_shard cut the local shards exactly as on a real job, so every
rank's block from the layout arithmetic can be compared with the tensor that rank stores.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.distributed.tensor.placement_types import _StridedShard
from torch.testing._internal.distributed.fake_pg import FakeStore

from dist_marsm.layouts import dtensor_layout, take_block


def _as_rank(rank: int, world_size: int):
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())


@pytest.fixture(autouse=True)
def _no_group_left():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


# (mesh shape, placements, tensor shape): uneven chunks, empty shards, two mesh dims on one tensor dim,
# replicas, batched (3-D) tensors.
DISTRIBUTE_CASES = [
    ((4,), (Shard(0),), (10, 3)),
    ((8,), (Shard(0),), (5, 4)),  # three ranks hold nothing
    ((8,), (Shard(1),), (3, 13)),
    ((2, 4), (Shard(0), Shard(0)), (11, 3)),
    ((2, 4), (Replicate(), Shard(0)), (9, 5)),  # HSDP: two replicas of four shards
    ((4, 2), (Shard(0), Shard(1)), (3, 7)),
    ((2, 2, 2), (Shard(0), Replicate(), Shard(2)), (3, 5, 6)),
]


@pytest.mark.parametrize("mesh_shape,placements,shape", DISTRIBUTE_CASES)
def test_layout_matches_distribute_tensor(mesh_shape, placements, shape):
    world = math.prod(mesh_shape)
    full = torch.arange(math.prod(shape), dtype=torch.float32).view(shape)
    for rank in range(world):
        _as_rank(rank, world)
        mesh = init_device_mesh("cpu", mesh_shape)
        # src_data_rank=None: each rank cuts its own shard from ``full`` (no scatter), with DTensor's own rule.
        local = distribute_tensor(full, mesh, placements, src_data_rank=None).to_local()
        layout = dtensor_layout(distribute_tensor(full, mesh, placements, src_data_rank=None))
        mine = take_block(full, layout.blocks[layout.ranks.index(rank)])
        assert mine.shape == local.shape and torch.equal(mine, local), (mesh_shape, placements, shape, rank)


@pytest.mark.parametrize("dims,tp", [((24, 20), 4), ((13, 9), 4), ((10, 6), 2)])
def test_layout_matches_fsdp_over_tensor_parallel(dims, tp):
    """FSDP2 over tensor parallelism: the FSDP dim shards what TP left (_StridedShard), as torchtitan builds it."""
    world = 8
    d_in, d_hidden = dims
    saw_strided = False
    for rank in range(world):
        _as_rank(rank, world)
        mesh = init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("dp", "tp"))
        model = torch.nn.Sequential(
            torch.nn.Linear(d_in, d_hidden, bias=False), torch.nn.Linear(d_hidden, d_in, bias=False)
        )
        fulls = {}
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(torch.arange(p.numel(), dtype=torch.float32).view(p.shape) + 1000 * len(fulls))
                fulls[name] = p.detach().clone()
        # src_data_rank=None: each rank cuts its own TP shard (the fake group scatters nothing).
        parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "1": RowwiseParallel()}, src_data_rank=None)
        fully_shard(model, mesh=mesh["dp"])
        for name, p in model.named_parameters():
            assert isinstance(p, DTensor)
            saw_strided |= any(isinstance(pl, _StridedShard) for pl in p.placements)
            layout = dtensor_layout(p)
            mine = take_block(fulls[name], layout.blocks[layout.ranks.index(rank)])
            local = p.to_local()
            if local.numel() == 0:  # FSDP2 stores an empty shard as [0, ...] whatever the TP shard's shape
                assert mine.numel() == 0, (name, p.placements, rank)
                continue
            assert mine.shape == local.shape and torch.equal(mine, local), (name, p.placements, rank)
            # The ranks of one replica hold every element exactly once.
            ids = torch.arange(p.numel()).view(p.shape)
            held = torch.cat(
                [
                    take_block(ids, b).reshape(-1)
                    for q, b in enumerate(layout.blocks)
                    if layout.replica_keys[q] == layout.replica_keys[0]
                ]
            )
            assert torch.equal(torch.bincount(held, minlength=p.numel()), torch.ones(p.numel(), dtype=torch.long))
    assert saw_strided, "FSDP over TP no longer uses _StridedShard: this test lost its point"


def _meta_dtensor(mesh_shape, placements, shape):
    mesh = init_device_mesh("cpu", mesh_shape)
    return DTensor.from_local(
        torch.empty(0, device="meta"),
        mesh,
        placements,
        shape=shape,
        stride=torch.empty(shape, device="meta").stride(),
        run_check=False,
    )


def test_layout_cost_is_linear_in_world_size(monkeypatch):
    """One Llama-3-70B-sized MLP matrix at 4,096 ranks (FSDP, and FSDP x TP 8): no per-rank split of the
    tensor, and well under a second (a split per rank, each into W pieces, takes minutes at this size)."""
    world = 4096

    def per_rank_split(*args, **kwargs):
        raise AssertionError("the layout must be arithmetic, not one DTensor split per rank")

    monkeypatch.setattr(Shard, "_split_tensor", per_rank_split)
    monkeypatch.setattr(_StridedShard, "_split_tensor", per_rank_split)
    _as_rank(world - 1, world)
    cases = [
        ((world,), (Shard(0),), (28672, 8192)),
        ((world // 8, 8), (_StridedShard(0, split_factor=8), Shard(0)), (28672, 8192 + 1)),
    ]
    for mesh_shape, placements, shape in cases:
        dtensor = _meta_dtensor(mesh_shape, placements, shape)
        start = time.perf_counter()
        layout = dtensor_layout(dtensor)
        elapsed = time.perf_counter() - start
        assert len(layout.blocks) == world
        assert sum(
            math.prod(i.stop - i.start if isinstance(i, slice) else i.numel() for i in b) for b in layout.blocks
        ) == math.prod(shape)
        assert elapsed < 1.0, f"layout of {shape} on mesh {mesh_shape} took {elapsed:.2f} s"
