"""Who holds which part of a tensor (layer 2): layouts derived from DTensor placements, and plan units.

Everything is derived from the parameters themselves: a DTensor's mesh and placements say which rank holds
which rows/columns; a plain tensor under torch.distributed is a full replica on every rank of its process
group (DDP). Per tensor we record, for every rank of its flat group, the block it holds as one index set per
tensor dim (a slice where contiguous), and a *replica key* (its coordinates on the mesh's Replicate dims).
Ranks with equal replica keys hold disjoint blocks that tile the whole tensor.
"""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass

import torch

Index = slice | torch.Tensor  # per tensor dim: a slice, or a LongTensor of global indices


def _as_index(idx: torch.Tensor) -> Index:
    """Compress a sorted run of consecutive indices to a slice (cheap views instead of gathers)."""
    n = idx.numel()
    if n == 0:
        return slice(0, 0)
    start = int(idx[0])
    if int(idx[-1]) - start + 1 == n and bool((idx.diff() == 1).all()):
        return slice(start, start + n)
    return idx


def index_len(index: Index) -> int:
    return index.stop - index.start if isinstance(index, slice) else index.numel()


def block_numel(block: tuple[Index, ...]) -> int:
    return math.prod(index_len(i) for i in block)


def covers(index: Index, size: int) -> bool:
    return isinstance(index, slice) and index.start == 0 and index.stop == size


def take_block(full: torch.Tensor, block: tuple[Index, ...]) -> torch.Tensor:
    """The sub-tensor of ``full`` selected by one index set per dim (a copy only where needed)."""
    out = full
    for dim, index in enumerate(block):
        if covers(index, out.size(dim)):
            continue
        out = (
            out.narrow(dim, index.start, index.stop - index.start)
            if isinstance(index, slice)
            else out.index_select(dim, index.to(out.device))
        )
    return out


def put_block(full: torch.Tensor, block: tuple[Index, ...], values: torch.Tensor) -> None:
    """Inverse of ``take_block``: write ``values`` into the positions ``block`` selects."""
    if all(isinstance(i, slice) for i in block):
        take_block(full, block).copy_(values)  # slices give a view: write through it
        return
    ndim = len(block)
    grids = []
    for dim, index in enumerate(block):
        t = (
            torch.arange(index.start, index.stop, device=full.device)
            if isinstance(index, slice)
            else index.to(full.device)
        )
        grids.append(t.view((1,) * dim + (-1,) + (1,) * (ndim - dim - 1)))
    full.index_put_(tuple(grids), values.to(full.dtype))


@dataclass(frozen=True)
class Layout:
    """How one parameter's logical tensor is spread over its flat group."""

    ranks: tuple[int, ...]  # global ranks of the flat group, in group order
    blocks: tuple[tuple[Index, ...], ...]  # per group rank: index set per tensor dim
    replica_keys: tuple[tuple[int, ...], ...]  # per group rank: coordinates on Replicate mesh dims
    placements: str = "replicated"  # for error messages and plan reports


def replicated_layout(shape: tuple[int, ...], ranks: tuple[int, ...]) -> Layout:
    """A plain tensor that every rank of ``ranks`` holds in full (DDP, or one process)."""
    full = tuple(slice(0, s) for s in shape)
    return Layout(ranks, tuple(full for _ in ranks), tuple((r,) for r in range(len(ranks))))


def _chunk_bounds(size: int, chunks: int, i: int) -> tuple[int, int]:
    """Positions [start, stop) of piece ``i`` when ``size`` items are cut as torch.chunk cuts them: pieces of
    ceil(size / chunks), the last ones short or empty (the rule DTensor's Shard follows, without padding)."""
    step = -(-size // chunks)
    return min(i * step, size), min((i + 1) * step, size)


Runs = tuple[tuple[int, int], ...]  # an ordered index set as consecutive [start, stop) runs


def _take_positions(runs: Runs, start: int, stop: int) -> Runs:
    """The runs covering positions [start, stop) of the ordered index set ``runs``."""
    out, offset = [], 0
    for a, b in runs:
        lo, hi = max(start - offset, 0), min(stop - offset, b - a)
        if lo < hi:
            out.append((a + lo, a + hi))
        offset += b - a
        if offset >= stop:
            break
    return tuple(out)


def _shard_runs(runs: Runs, chunks: int, i: int, split_factor: int | None) -> Runs:
    """Piece ``i`` of ``chunks`` of an ordered index set, as Shard (``split_factor`` None) or _StridedShard cuts it.

    _StridedShard(split_factor=f) first cuts the set into f pieces, cuts each of those into ``chunks``, and
    gives piece i the concatenation of the f sub-pieces i (the order a later mesh dim's sharding left behind).
    """
    size = sum(b - a for a, b in runs)
    if split_factor is None:
        return _take_positions(runs, *_chunk_bounds(size, chunks, i))
    out = []
    for j in range(split_factor):
        lo, hi = _chunk_bounds(size, split_factor, j)
        sub_lo, sub_hi = _chunk_bounds(hi - lo, chunks, i)
        out.extend(_take_positions(runs, lo + sub_lo, lo + sub_hi))
    merged: list[tuple[int, int]] = []
    for a, b in out:
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return tuple(merged)


def dtensor_layout(dtensor, view_shape: tuple[int, ...] | None = None) -> Layout:
    """Derive the layout of a DTensor from its mesh and placements, for every rank of its mesh.

    Each tensor dim is cut independently by the mesh dims that shard it, left to right, by arithmetic on
    index runs with torch.chunk's rule (pieces of ceil(n / k), the last ones short or empty) - the rule
    DTensor cuts its data by, so Shard, uneven chunks, empty shards and _StridedShard (FSDP+TP) all
    agree with the local tensors. A block depends only on the rank's coordinates on the dims that
    shard it, so each distinct block is computed once: the work is linear in the mesh size.
    ``view_shape`` (flattening conv kernels to 2-D) is only allowed where it keeps every rank's block
    a set of whole leading rows.
    """
    return _layout_from_placements(
        *_mesh_ranks(dtensor.device_mesh),
        tuple(dtensor.placements),
        tuple(dtensor.shape),
        None if view_shape is None else tuple(view_shape),
    )


_MESH_RANKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _mesh_ranks(mesh) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A mesh's ranks in row-major order and its shape, once per live mesh (torch rebuilds the tensor per call)."""
    if mesh not in _MESH_RANKS:
        ranks = mesh.mesh
        _MESH_RANKS[mesh] = (tuple(ranks.flatten().tolist()), tuple(ranks.shape))
    return _MESH_RANKS[mesh]


@functools.lru_cache(maxsize=256)
def _layout_from_placements(
    mesh_ranks: tuple[int, ...],
    mesh_shape: tuple[int, ...],
    placements: tuple,
    shape: tuple[int, ...],
    view_shape: tuple[int, ...] | None,
) -> Layout:
    """The layout of a tensor of ``shape`` on a mesh (ranks in row-major order) with ``placements``.

    Cached: a model's layers repeat a few (shape, placements) pairs, and a Layout is immutable.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    for p in placements:
        if not isinstance(p, (Shard, _StridedShard, Replicate)):
            raise ValueError(
                f"unsupported placement {p} (parameters must be Shard or Replicate), placements {placements}"
            )
    # Per tensor dim: the (mesh dim, split factor or None) that cut it, in mesh-dim order.
    cuts = [
        [
            (m, p.split_factor if isinstance(p, _StridedShard) else None)
            for m, p in enumerate(placements)
            if isinstance(p, (Shard, _StridedShard)) and p.dim == tdim
        ]
        for tdim in range(len(shape))
    ]
    replicate_dims = [m for m, p in enumerate(placements) if isinstance(p, Replicate)]
    strides = [math.prod(mesh_shape[m + 1 :]) for m in range(len(mesh_shape))]
    runs_cache: dict[tuple, Runs] = {}

    def dim_runs(tdim: int, coords: tuple[int, ...]) -> Runs:
        """The runs of tensor dim ``tdim`` held at ``coords`` on its cutting mesh dims (a prefix of them),
        each cut computed once per distinct prefix."""
        key = (tdim, coords)
        if key not in runs_cache:
            if not coords:
                runs_cache[key] = ((0, shape[tdim]),)
            else:
                m, split_factor = cuts[tdim][len(coords) - 1]
                runs_cache[key] = _shard_runs(dim_runs(tdim, coords[:-1]), mesh_shape[m], coords[-1], split_factor)
        return runs_cache[key]

    rank_keys = {}
    for flat, rank in enumerate(mesh_ranks):
        coord = tuple(flat // strides[m] % mesh_shape[m] for m in range(len(mesh_shape)))
        dim_keys = tuple((tdim, tuple(coord[m] for m, _ in cuts[tdim])) for tdim in range(len(shape)))
        for tdim, coords in dim_keys:
            dim_runs(tdim, coords)
        rank_keys[rank] = (dim_keys, tuple(coord[m] for m in replicate_dims))
    indices = _indices(runs_cache, {k for dim_keys, _ in rank_keys.values() for k in dim_keys})
    by_rank = {rank: (tuple(indices[k] for k in dim_keys), key) for rank, (dim_keys, key) in rank_keys.items()}
    ranks = tuple(sorted(by_rank))
    blocks = [by_rank[r][0] for r in ranks]
    keys = tuple(by_rank[r][1] for r in ranks)
    if view_shape is not None and view_shape != shape:
        blocks = _flattened(blocks, shape, placements)
    return Layout(ranks, tuple(blocks), keys, str(placements))


def _indices(runs_cache: dict, keys) -> dict:
    """One Index per distinct block: a slice for one run; index tensors for the rest, made together (views
    of one tensor), since thousands of small tensors made one by one would dominate the cost."""
    indices: dict[tuple, Index] = {}
    scattered = []
    for key in keys:
        runs = runs_cache[key]
        if len(runs) <= 1:
            indices[key] = slice(*runs[0]) if runs else slice(0, 0)
        else:
            scattered.append(key)
    if scattered:
        lengths = [sum(b - a for a, b in runs_cache[k]) for k in scattered]
        flat_index = torch.tensor(
            [i for k in scattered for a, b in runs_cache[k] for i in range(a, b)], dtype=torch.long
        )
        indices.update(zip(scattered, flat_index.split(lengths)))
    return indices


def _flattened(blocks: list, shape: tuple[int, ...], placements: tuple) -> list:
    """Blocks of a tensor flattened to [dim0, rest]: only whole leading rows flatten."""
    tail = math.prod(shape[1:])
    whole_rows, flat_blocks = {}, []
    for block in blocks:
        if any(index_len(i) != s for i, s in zip(block[1:], shape[1:])):
            raise ValueError(
                f"cannot flatten a DTensor of shape {shape} with placements {placements} to a matrix: "
                "only dim-0 sharding keeps whole rows; use matrix_view='batch'"
            )
        flat_blocks.append(whole_rows.setdefault(id(block[0]), (block[0], slice(0, tail))))
    return flat_blocks


@dataclass(frozen=True)
class Unit:
    """A part of one parameter that is orthogonalized as one plan entry: some of its matrices (leading
    indices, e.g. the experts one rank holds), each possibly cut into equal row chunks (heads).

    ``shape`` is [n, rows, cols]; ``layout`` gives each rank's block in those coordinates. This rank's
    block of the unit is ``local[lead_pos[:, None], row_pos]`` of its local tensor viewed as
    [leading, rows, cols]; ``lead_pos`` is None where the unit is the whole local tensor as it is.
    ``holder`` is the rank of the first replica that holds the whole unit, if one does: it owns it, so
    nothing is gathered.
    """

    shape: tuple[int, int, int]
    layout: Layout
    label: str
    lead_pos: torch.Tensor | None = None
    row_pos: torch.Tensor | None = None
    holder: int | None = None


def _rows_in(index: Index, start: int, stop: int) -> tuple[int, ...]:
    """The rows of ``index`` within [start, stop), relative to start."""
    if isinstance(index, slice):
        return tuple(range(max(index.start, start) - start, min(index.stop, stop) - start))
    return tuple(int(r) - start for r in index.tolist() if start <= r < stop)


def split_units(view: tuple[int, ...], layout: Layout, my_rank: int, head_rows: int | None = None) -> list[Unit]:
    """Cut a parameter of logical shape ``view`` ([..., A, B]) into plan units.

    Without ``head_rows``, a parameter whose leading (batch) dims no rank splits is one unit, as it is.
    Otherwise the items are (leading index, row chunk of ``head_rows`` rows); items that every rank holds
    the same way (whole, the same rows of each, or not at all) form one unit, so a rank that holds whole
    experts or whole heads orthogonalizes them itself with nothing sent, and only items split inside a
    matrix travel to an owner.
    """
    *lead, rows, cols = view
    n_lead = math.prod(lead)
    world = len(layout.ranks)
    if lead:
        grid = torch.arange(n_lead).view(*lead)
        lead_sets = [take_block(grid, block[:-2]).reshape(-1).tolist() for block in layout.blocks]
    else:
        lead_sets = [[0] for _ in layout.blocks]
    if head_rows is None and all(len(s) == n_lead for s in lead_sets):
        return [Unit(tuple(view), layout, "")]
    chunk = head_rows or rows
    if rows % chunk:
        raise ValueError(f"{rows} rows do not split into heads of {chunk} rows")
    heads = rows // chunk
    members = [set(s) for s in lead_sets]
    held_rows = [
        [_rows_in(b[-2], h * chunk, (h + 1) * chunk) if index_len(b[-1]) else () for h in range(heads)]
        for b in layout.blocks
    ]
    signatures: dict[tuple, list[tuple[int, int]]] = {}
    for e in range(n_lead):
        for h in range(heads):
            sig = tuple(held_rows[r][h] if e in members[r] and held_rows[r][h] else None for r in range(world))
            signatures.setdefault(sig, []).append((e, h))
    first_replica = [r for r in range(world) if layout.replica_keys[r] == layout.replica_keys[0]]
    units = []
    for sig, items in signatures.items():
        n = len(items)
        blocks = tuple(
            (slice(0, 0), slice(0, 0), slice(0, 0))
            if sig[r] is None
            else (slice(0, n), _as_index(torch.tensor(sig[r], dtype=torch.long)), layout.blocks[r][-1])
            for r in range(world)
        )
        holders = [
            r
            for r in first_replica
            if sig[r] is not None and len(sig[r]) == chunk and index_len(layout.blocks[r][-1]) == cols
        ]
        lead_pos, row_pos = _local_positions(layout, my_rank, lead_sets[my_rank], sig[my_rank], items, chunk)
        units.append(
            Unit(
                (n, chunk, cols),
                Layout(layout.ranks, blocks, layout.replica_keys, layout.placements),
                _items_label(items, head_rows is not None),
                lead_pos,
                row_pos,
                holders[0] if len(holders) == 1 else None,
            )
        )
    return units


def _local_positions(layout: Layout, my_rank: int, my_lead: list[int], my_rows, items, chunk: int):
    """Where a unit's items sit in this rank's local tensor viewed as [leading, rows, cols]: (leading
    positions, row positions), or (None, None) where the unit is the whole local tensor as it is."""
    if my_rows is None:
        return None, None
    local_lead = {g: i for i, g in enumerate(my_lead)}
    row_index = layout.blocks[my_rank][-2]
    global_rows = list(range(row_index.start, row_index.stop)) if isinstance(row_index, slice) else row_index.tolist()
    local_row = {g: i for i, g in enumerate(global_rows)}
    lead_list = [local_lead[e] for e, _ in items]
    row_lists = [[local_row[h * chunk + q] for q in my_rows] for _, h in items]
    whole = lead_list == list(range(len(my_lead))) and all(rl == list(range(len(global_rows))) for rl in row_lists)
    if whole:
        return None, None
    return torch.tensor(lead_list, dtype=torch.long), torch.tensor(row_lists, dtype=torch.long)


def _items_label(items: list[tuple[int, int]], by_head: bool) -> str:
    first, last = items[0], items[-1]
    if not by_head:
        return f"[{first[0]}]" if len(items) == 1 else f"[{first[0]}..{last[0]}]"
    return (
        f"[{first[0]}:head {first[1]}]"
        if len(items) == 1
        else f"[{first[0]}:head {first[1]}..{last[0]}:head {last[1]}]"
    )
