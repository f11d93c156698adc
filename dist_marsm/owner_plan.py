"""Which rank orthogonalizes which matrix (layer 2: the plan; the communication lives in collectives.py).

Everything is derived from the parameters themselves: a DTensor's mesh and placements say which
rank holds which rows/columns; a plain tensor under torch.distributed is a full replica on every
rank of its process group (DDP). No per-parameter layout or bucket maps are written by users.

The unit of planning is a *flat group*: the ranks of one device mesh (or the DDP group) in rank
order. Per matrix we record, for every rank of its flat group, the block it holds as one index
set per tensor dim (a slice where contiguous), and a *replica key* (its coordinates on the mesh's
Replicate dims). Ranks with equal replica keys hold disjoint blocks that tile the whole matrix, so
an owner gathers from the ranks of its own replica and scatters the result to every rank.
"""

from __future__ import annotations

import functools
import heapq
import math
import weakref
from dataclasses import dataclass, field

import torch

from dist_marsm.newton_schulz import newton_schulz_flops

OWNER_POLICIES = ("largest_first", "round_robin")

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


def _covers(index: Index, size: int) -> bool:
    return isinstance(index, slice) and index.start == 0 and index.stop == size


def take_block(full: torch.Tensor, block: tuple[Index, ...]) -> torch.Tensor:
    """The sub-tensor of ``full`` selected by one index set per dim (a copy only where needed)."""
    out = full
    for dim, index in enumerate(block):
        if _covers(index, out.size(dim)):
            continue
        out = out.narrow(dim, index.start, index.stop - index.start) if isinstance(index, slice) else \
            out.index_select(dim, index.to(out.device))
    return out


def put_block(full: torch.Tensor, block: tuple[Index, ...], values: torch.Tensor) -> None:
    """Inverse of ``take_block``: write ``values`` into the positions ``block`` selects."""
    if all(isinstance(i, slice) for i in block):
        take_block(full, block).copy_(values)   # slices give a view: write through it
        return
    ndim = len(block)
    grids = []
    for dim, index in enumerate(block):
        t = torch.arange(index.start, index.stop, device=full.device) if isinstance(index, slice) else index.to(full.device)
        grids.append(t.view((1,) * dim + (-1,) + (1,) * (ndim - dim - 1)))
    full.index_put_(tuple(grids), values.to(full.dtype))


@dataclass(frozen=True)
class Layout:
    """How one parameter's logical tensor is spread over its flat group."""

    ranks: tuple[int, ...]                     # global ranks of the flat group, in group order
    blocks: tuple[tuple[Index, ...], ...]      # per group rank: index set per tensor dim
    replica_keys: tuple[tuple[int, ...], ...]  # per group rank: coordinates on Replicate mesh dims
    placements: str = "replicated"             # for error messages and plan reports


def replicated_layout(shape: tuple[int, ...], ranks: tuple[int, ...]) -> Layout:
    """A plain tensor that every rank of ``ranks`` holds in full (DDP, or one process)."""
    full = tuple(slice(0, s) for s in shape)
    return Layout(ranks, tuple(full for _ in ranks), tuple((r,) for r in range(len(ranks))))


def _chunk_bounds(size: int, chunks: int, i: int) -> tuple[int, int]:
    """Positions [start, stop) of piece ``i`` when ``size`` items are cut as torch.chunk cuts them: pieces of
    ceil(size / chunks), the last ones short or empty (the rule DTensor's Shard follows, without padding)."""
    step = -(-size // chunks)
    return min(i * step, size), min((i + 1) * step, size)


Runs = tuple[tuple[int, int], ...]   # an ordered index set as consecutive [start, stop) runs


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
    return _layout_from_placements(*_mesh_ranks(dtensor.device_mesh), tuple(dtensor.placements),
                                   tuple(dtensor.shape), None if view_shape is None else tuple(view_shape))


_MESH_RANKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _mesh_ranks(mesh) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A mesh's ranks in row-major order and its shape, once per live mesh (torch rebuilds the tensor per call)."""
    if mesh not in _MESH_RANKS:
        ranks = mesh.mesh
        _MESH_RANKS[mesh] = (tuple(ranks.flatten().tolist()), tuple(ranks.shape))
    return _MESH_RANKS[mesh]


@functools.lru_cache(maxsize=256)
def _layout_from_placements(mesh_ranks: tuple[int, ...], mesh_shape: tuple[int, ...], placements: tuple,
                            shape: tuple[int, ...], view_shape: tuple[int, ...] | None) -> Layout:
    """The layout of a tensor of ``shape`` on a mesh (ranks in row-major order) with ``placements``.

    Cached: a model's layers repeat a few (shape, placements) pairs, and a Layout is immutable.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    for p in placements:
        if not isinstance(p, (Shard, _StridedShard, Replicate)):
            raise ValueError(f"unsupported placement {p} (parameters must be Shard or Replicate), placements {placements}")
    # Per tensor dim: the (mesh dim, split factor or None) that cut it, in mesh-dim order.
    cuts = [[(m, p.split_factor if isinstance(p, _StridedShard) else None) for m, p in enumerate(placements)
             if isinstance(p, (Shard, _StridedShard)) and p.dim == tdim] for tdim in range(len(shape))]
    replicate_dims = [m for m, p in enumerate(placements) if isinstance(p, Replicate)]
    strides = [math.prod(mesh_shape[m + 1:]) for m in range(len(mesh_shape))]
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
    # One Index per distinct block: a slice for one run; index tensors for the rest, made together (views
    # of one tensor), since thousands of small tensors made one by one would dominate the cost.
    indices: dict[tuple, Index] = {}
    scattered = []
    for key in {k for dim_keys, _ in rank_keys.values() for k in dim_keys}:
        runs = runs_cache[key]
        if len(runs) <= 1:
            indices[key] = slice(*runs[0]) if runs else slice(0, 0)
        else:
            scattered.append(key)
    if scattered:
        lengths = [sum(b - a for a, b in runs_cache[k]) for k in scattered]
        flat_index = torch.tensor([i for k in scattered for a, b in runs_cache[k] for i in range(a, b)],
                                  dtype=torch.long)
        indices.update(zip(scattered, flat_index.split(lengths)))
    by_rank = {rank: (tuple(indices[k] for k in dim_keys), key) for rank, (dim_keys, key) in rank_keys.items()}
    ranks = tuple(sorted(by_rank))
    blocks = [by_rank[r][0] for r in ranks]
    keys = tuple(by_rank[r][1] for r in ranks)
    if view_shape is not None and view_shape != shape:
        tail = math.prod(shape[1:])
        whole_rows = {}
        flat_blocks = []
        for block in blocks:
            if any(index_len(i) != s for i, s in zip(block[1:], shape[1:])):
                raise ValueError(
                    f"cannot flatten a DTensor of shape {shape} with placements {placements} to a matrix: "
                    "only dim-0 sharding keeps whole rows; use matrix_view='batch'"
                )
            flat_blocks.append(whole_rows.setdefault(id(block[0]), (block[0], slice(0, tail))))
        blocks = flat_blocks
    return Layout(ranks, tuple(blocks), keys, str(placements))


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
    held_rows = [[_rows_in(b[-2], h * chunk, (h + 1) * chunk) if index_len(b[-1]) else () for h in range(heads)]
                 for b in layout.blocks]
    signatures: dict[tuple, list[tuple[int, int]]] = {}
    for e in range(n_lead):
        for h in range(heads):
            sig = tuple(held_rows[r][h] if e in members[r] and held_rows[r][h] else None for r in range(world))
            signatures.setdefault(sig, []).append((e, h))
    first_replica = [r for r in range(world) if layout.replica_keys[r] == layout.replica_keys[0]]
    units = []
    for sig, items in signatures.items():
        n = len(items)
        blocks = tuple((slice(0, 0), slice(0, 0), slice(0, 0)) if sig[r] is None else
                       (slice(0, n), _as_index(torch.tensor(sig[r], dtype=torch.long)), layout.blocks[r][-1])
                       for r in range(world))
        holders = [r for r in first_replica if sig[r] is not None and len(sig[r]) == chunk
                   and index_len(layout.blocks[r][-1]) == cols]
        lead_pos = row_pos = None
        if sig[my_rank] is not None:
            local_lead = {g: i for i, g in enumerate(lead_sets[my_rank])}
            row_index = layout.blocks[my_rank][-2]
            global_rows = list(range(row_index.start, row_index.stop)) if isinstance(row_index, slice) \
                else row_index.tolist()
            local_row = {g: i for i, g in enumerate(global_rows)}
            lead_list = [local_lead[e] for e, _ in items]
            row_lists = [[local_row[h * chunk + q] for q in sig[my_rank]] for _, h in items]
            whole = (lead_list == list(range(len(lead_sets[my_rank])))
                     and all(rl == list(range(len(global_rows))) for rl in row_lists))
            if not whole:
                lead_pos = torch.tensor(lead_list, dtype=torch.long)
                row_pos = torch.tensor(row_lists, dtype=torch.long)
        units.append(Unit((n, chunk, cols), Layout(layout.ranks, blocks, layout.replica_keys, layout.placements),
                          _items_label(items, head_rows is not None), lead_pos, row_pos,
                          holders[0] if len(holders) == 1 else None))
    return units


def _items_label(items: list[tuple[int, int]], by_head: bool) -> str:
    first, last = items[0], items[-1]
    if not by_head:
        return f"[{first[0]}]" if len(items) == 1 else f"[{first[0]}..{last[0]}]"
    return f"[{first[0]}:head {first[1]}]" if len(items) == 1 else f"[{first[0]}:head {first[1]}..{last[0]}:head {last[1]}]"


@dataclass
class MatrixEntry:
    """One parameter (a matrix, or a batch of matrices) in the plan."""

    index: int                      # position in the optimizer's list of matrix parameters
    name: str
    shape: tuple[int, ...]          # logical shape as orthogonalized ([..., A, B])
    layout: Layout
    ns_steps: int
    ns_dtype: str
    ns_method: str = "standard"     # newton_schulz's method ("standard" | "gram")
    ns_coefficients: object = "muon"  # a name in NS_COEFFICIENT_SETS or explicit (a, b, c) triples
    holder: int | None = None       # group rank that holds the whole matrix in the first replica: its owner
    owner: int = -1                 # group rank
    flops: int = 0
    _tilings: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_matrices(self) -> int:
        return math.prod(self.shape[:-2])

    def senders(self, owner: int) -> list[int]:
        """Group ranks whose blocks, together, tile the matrix for ``owner``: its own replica."""
        key = self.layout.replica_keys[owner]
        return [r for r, k in enumerate(self.layout.replica_keys) if k == key]

    def leading_tiling(self, owner: int) -> list[tuple[int, int]] | None:
        """(group rank, elements) of each sender to ``owner``, in order, when their blocks are consecutive
        ranges of the leading dim, whole along the others (FSDP's Shard(0), HSDP): the full matrix is then
        the concatenation of the blocks, flattened, and the owner moves them with one call instead of one
        per rank. None for any other layout (tensor parallelism, column shards). Cached per owner."""
        if owner not in self._tilings:
            tiling, expected = [], 0
            for q in self.senders(owner):
                block = self.layout.blocks[q]
                lead = block[0]
                whole = all(_covers(i, s) for i, s in zip(block[1:], self.shape[1:]))
                if not (isinstance(lead, slice) and whole and (lead.start == expected or lead.start == lead.stop)):
                    tiling = None
                    break
                expected = max(expected, lead.stop)
                tiling.append((q, block_numel(block)))
            self._tilings[owner] = tiling if tiling is not None and expected == self.shape[0] else None
        return self._tilings[owner]

    def scatter_sizes(self) -> list[int] | None:
        """Each group rank's block size, when the ranks in group order run through the matrix's leading dim
        as consecutive ranges, once per replica (FSDP: once; HSDP: replicas of consecutive ranks): every rank's
        block of a result is then a range of the result repeated per replica, flattened, and the owner sends
        them with a few views instead of one slice per rank. None otherwise (tensor parallelism). Cached."""
        if "scatter" not in self._tilings:
            sizes, expected, rows = [], 0, self.shape[0]
            for block in self.layout.blocks:
                lead = block[0]
                if not (isinstance(lead, slice) and all(_covers(i, s) for i, s in zip(block[1:], self.shape[1:]))):
                    sizes = None
                    break
                if lead.start == lead.stop:
                    sizes.append(0)
                    continue
                if expected == rows and lead.start == 0:
                    expected = 0      # the next replica starts over
                if lead.start != expected:
                    sizes = None
                    break
                expected = lead.stop
                sizes.append(block_numel(block))
            ok = sizes is not None and expected == rows and sum(sizes) % math.prod(self.shape) == 0
            self._tilings["scatter"] = sizes if ok else None
        return self._tilings["scatter"]

    def sends_to_owner(self, rank: int) -> bool:
        """Whether ``rank`` sends its block to this entry's owner (it is another rank of the owner's replica).

        Constant time: the step asks this for every entry on every rank, so it must not scan the group.
        """
        return rank != self.owner and self.layout.replica_keys[rank] == self.layout.replica_keys[self.owner]


def assign_owners(costs: list[float], world: int, policy: str,
                  fixed: list[int | None] | None = None) -> tuple[list[int], list[int]]:
    """Owner rank per item and the order to process items in.

    ``fixed[i]``, where not None, is item i's owner (a rank that already holds it whole); the policy
    places the rest, counting the fixed items' load.

    round_robin: item i -> i mod world, in the given order (the design card's baseline).
    largest_first: items sorted by cost, largest first, each to the least-loaded rank so far
    (the LPT rule: its makespan is within 4/3 of optimal; see benchmarks/plan_balance.py).
    """
    if policy not in OWNER_POLICIES:
        raise ValueError(f"owner_policy must be one of {OWNER_POLICIES}, got {policy!r}")
    n = len(costs)
    fixed = fixed or [None] * n
    if policy == "round_robin":
        return [f if f is not None else i % world for i, f in enumerate(fixed)], list(range(n))
    order = sorted(range(n), key=lambda i: (fixed[i] is None, -costs[i], i))
    load = [0.0] * world
    owners = [0] * n
    for i in order:
        if fixed[i] is not None:
            owners[i] = fixed[i]
            load[fixed[i]] += costs[i]
    # The least-loaded rank (lowest rank on ties) from a heap: the plan's cost stays linear in the world size.
    heap = [(load[r], r) for r in range(world)]
    heapq.heapify(heap)
    for i in order:
        if fixed[i] is not None:
            continue
        rank_load, rank = heapq.heappop(heap)
        owners[i] = rank
        heapq.heappush(heap, (rank_load + costs[i], rank))
    return owners, order


def make_buckets(order: list[int], sizes: list[int], bucket_bytes: int) -> list[list[int]]:
    """Cut ``order`` into consecutive buckets of at most ``bucket_bytes`` (at least one item each)."""
    buckets: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i in order:
        if current and total + sizes[i] > bucket_bytes:
            buckets.append(current)
            current, total = [], 0
        current.append(i)
        total += sizes[i]
    if current:
        buckets.append(current)
    return buckets


@dataclass
class GroupPlan:
    """The plan for the matrices of one flat group, as seen from this rank."""

    ranks: tuple[int, ...]
    my_rank: int                                   # this process's rank within the group
    entries: list[MatrixEntry]
    buckets: list[list[int]] = field(default_factory=list)  # positions in ``entries``
    wire_bytes: int = 2
    group: object = None                           # torch.distributed ProcessGroup (None: one rank)
    _traffic_cache: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def world(self) -> int:
        return len(self.ranks)

    def owned(self, rank: int | None = None) -> list[MatrixEntry]:
        rank = self.my_rank if rank is None else rank
        return [e for e in self.entries if e.owner == rank]

    def send_elements(self, rank: int) -> int:
        """Elements ``rank`` sends per step: its blocks to owners of its replica, results it owns to everyone."""
        return self._traffic()[0][rank]

    def recv_elements(self, rank: int) -> int:
        """Elements ``rank`` receives per step: blocks of the matrices it owns, its blocks of the others' results."""
        return self._traffic()[1][rank]

    def _traffic(self) -> tuple[list[int], list[int]]:
        """Per group rank: elements sent and received per step, in one pass over the entries (O(entries x W))."""
        if self._traffic_cache is None:
            sent, received = [0] * self.world, [0] * self.world
            for e in self.entries:
                sizes = [block_numel(b) for b in e.layout.blocks]
                owner_key = e.layout.replica_keys[e.owner]
                for q, n in enumerate(sizes):
                    if q == e.owner:
                        continue
                    sent[e.owner] += n           # the owner's result, each rank's block
                    received[q] += n
                    if e.layout.replica_keys[q] == owner_key:
                        sent[q] += n             # the block of momentum, to the owner
                        received[e.owner] += n
            self._traffic_cache = (sent, received)
        return self._traffic_cache

    def report(self) -> list[dict]:
        """Per rank: matrices owned, Newton-Schulz FLOPs, bytes sent per step, local matrix-shard bytes."""
        matrices, flops, local = [0] * self.world, [0] * self.world, [0] * self.world
        for e in self.entries:
            matrices[e.owner] += e.num_matrices
            flops[e.owner] += e.flops
            for q, b in enumerate(e.layout.blocks):
                local[q] += block_numel(b)
        sent, received = self._traffic()
        return [{"rank": self.ranks[r], "matrices_owned": matrices[r], "ns_flops": flops[r],
                 "bytes_sent": sent[r] * self.wire_bytes, "bytes_received": received[r] * self.wire_bytes,
                 "local_shard_bytes": local[r] * self.wire_bytes} for r in range(self.world)]


def build_group_plan(
    entries: list[MatrixEntry],
    ranks: tuple[int, ...],
    my_rank: int,
    policy: str,
    bucket_bytes: int,
    wire_bytes: int,
    group=None,
) -> GroupPlan:
    for e in entries:
        e.flops = newton_schulz_flops(e.shape, e.ns_steps, e.ns_method, dtype=e.ns_dtype,
                                      coefficients=e.ns_coefficients)
    owners, order = assign_owners([float(e.flops) for e in entries], len(ranks), policy, [e.holder for e in entries])
    for e, owner in zip(entries, owners):
        e.owner = owner
    sizes = [math.prod(e.shape) * wire_bytes for e in entries]
    return GroupPlan(ranks, my_rank, entries, make_buckets(order, sizes, bucket_bytes), wire_bytes, group)


def balance_ratio(shapes: list[tuple[int, ...]], world: int, policy: str, ns_steps: int = 5,
                  ns_method: str = "standard", ns_dtype: str = "bfloat16", ns_coefficients="muon") -> float:
    """Max-rank Newton-Schulz FLOPs over the lower bound max(total / world, largest matrix)."""
    costs = [float(newton_schulz_flops(s, ns_steps, ns_method, dtype=ns_dtype, coefficients=ns_coefficients))
             for s in shapes]
    owners, _ = assign_owners(costs, world, policy)
    load = [0.0] * world
    for c, o in zip(costs, owners):
        load[o] += c
    return max(load) / max(sum(costs) / world, max(costs))
