"""Which rank orthogonalizes which matrix (layer 2: the owner plan; the communication lives in
collectives.py, the layouts it is derived from in layouts.py).

The unit of planning is a *flat group*: the ranks of one device mesh (or the DDP group) in rank order. An
owner gathers a matrix from the ranks of its own replica and scatters the result to every rank.
"""

from __future__ import annotations

import functools
import heapq
import math
from dataclasses import dataclass, field

from dist_marsm.layouts import Layout, block_numel, covers
from dist_marsm.newton_schulz import newton_schulz_flops

OWNER_POLICIES = ("largest_first", "round_robin")


@dataclass
class MatrixEntry:
    """One parameter (a matrix, or a batch of matrices) in the plan."""

    index: int  # position in the optimizer's list of matrix parameters
    name: str
    shape: tuple[int, ...]  # logical shape as orthogonalized ([..., A, B])
    layout: Layout
    ns_steps: int
    ns_dtype: str
    ns_method: str = "standard"  # newton_schulz's method ("standard" | "gram")
    ns_coefficients: object = "muon"  # a name in NS_COEFFICIENT_SETS or explicit (a, b, c) triples
    holder: int | None = None  # group rank that holds the whole matrix in the first replica: its owner
    owner: int = -1  # group rank
    flops: int = 0
    _tilings: dict = field(default_factory=dict, repr=False, compare=False)

    @functools.cached_property
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
                whole = all(covers(i, s) for i, s in zip(block[1:], self.shape[1:]))
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
                if not (isinstance(lead, slice) and all(covers(i, s) for i, s in zip(block[1:], self.shape[1:]))):
                    sizes = None
                    break
                if lead.start == lead.stop:
                    sizes.append(0)
                    continue
                if expected == rows and lead.start == 0:
                    expected = 0  # the next replica starts over
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


def assign_owners(
    costs: list[float], world: int, policy: str, fixed: list[int | None] | None = None
) -> tuple[list[int], list[int]]:
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
    my_rank: int  # this process's rank within the group
    entries: list[MatrixEntry]
    buckets: list[list[int]] = field(default_factory=list)  # positions in ``entries``
    wire_bytes: int = 2
    group: object = None  # torch.distributed ProcessGroup (None: one rank)
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
                    sent[e.owner] += n  # the owner's result, each rank's block
                    received[q] += n
                    if e.layout.replica_keys[q] == owner_key:
                        sent[q] += n  # the block of momentum, to the owner
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
        return [
            {
                "rank": self.ranks[r],
                "matrices_owned": matrices[r],
                "ns_flops": flops[r],
                "bytes_sent": sent[r] * self.wire_bytes,
                "bytes_received": received[r] * self.wire_bytes,
                "local_shard_bytes": local[r] * self.wire_bytes,
            }
            for r in range(self.world)
        ]


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
        e.flops = newton_schulz_flops(
            e.shape, e.ns_steps, e.ns_method, dtype=e.ns_dtype, coefficients=e.ns_coefficients
        )
    owners, order = assign_owners([float(e.flops) for e in entries], len(ranks), policy, [e.holder for e in entries])
    for e, owner in zip(entries, owners):
        e.owner = owner
    sizes = [math.prod(e.shape) * wire_bytes for e in entries]
    return GroupPlan(ranks, my_rank, entries, make_buckets(order, sizes, bucket_bytes), wire_bytes, group)


def balance_ratio(
    shapes: list[tuple[int, ...]],
    world: int,
    policy: str,
    ns_steps: int = 5,
    ns_method: str = "standard",
    ns_dtype: str = "bfloat16",
    ns_coefficients="muon",
) -> float:
    """Max-rank Newton-Schulz FLOPs over the lower bound max(total / world, largest matrix)."""
    costs = [
        float(newton_schulz_flops(s, ns_steps, ns_method, dtype=ns_dtype, coefficients=ns_coefficients)) for s in shapes
    ]
    owners, _ = assign_owners(costs, world, policy)
    load = [0.0] * world
    for c, o in zip(costs, owners):
        load[o] += c
    return max(load) / max(sum(costs) / world, max(costs))
