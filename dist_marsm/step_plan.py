"""The step plan (layer 2): what one ``MARSM.step`` does on this rank, built once from the param groups.

Parameters are gathered into *flat groups*: the parameters that live on one set of ranks (a DTensor's
mesh, or the process group plain tensors are replicated over). Each flat group holds its MARS-M
parameters (:class:`MatrixParam`) and AdamW parameters (:class:`AdamWParam`) as named records, the owner
plan that says who orthogonalizes what (:mod:`dist_marsm.owner_plan`), and the layout of the one float64
all-reduce that the step issues for it (:class:`ReduceLayout`). The plan is rebuilt only when the
parameter set or a setting that moves work changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from dist_marsm import mars_math
from dist_marsm.collectives import OwnerCompute, flat_group
from dist_marsm.layouts import (
    Layout,
    Unit,
    block_numel,
    dtensor_layout,
    index_len,
    replicated_layout,
    split_units,
    take_block,
)
from dist_marsm.newton_schulz import resolve_dtype
from dist_marsm.owner_plan import GroupPlan, MatrixEntry, build_group_plan


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this process stores: a DTensor's local shard, or the tensor itself."""
    return t._local_tensor if isinstance(t, DTensor) else t


def is_dtensor(t: torch.Tensor) -> bool:
    return isinstance(t, DTensor)


def state_dtype(param: torch.Tensor) -> torch.dtype:
    """Optimizer state is kept in float32 for low-precision parameters (fp32 master state)."""
    return torch.float32 if param.dtype in (torch.bfloat16, torch.float16) else param.dtype


@dataclass(frozen=True)
class UnitSlot:
    """One plan unit of a parameter: its entry in the owner plan, and, where this rank holds none of it,
    the empty block it contributes (so every unit has an input)."""

    entry: int
    unit: Unit
    empty: torch.Tensor | None


@dataclass
class MatrixParam:
    """A MARS-M parameter (a matrix, or a batch of matrices over leading dims) as this rank holds it."""

    param: torch.Tensor
    group_index: int
    name: str
    view: tuple[int, ...]  # logical shape as orthogonalized ([..., A, B])
    layout: Layout
    block_shape: tuple[int, ...]  # this rank's block of ``view``
    lr_scale: float
    replicated: bool  # a plain tensor every rank of the flat group holds in full (DDP-style)
    slots: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))  # its matrices' slots
    slot_list: list[int] = field(default_factory=list)  # the same, on the host
    first_replica: bool = True  # this rank's block counts towards the global norms
    units: list[UnitSlot] = field(default_factory=list)
    whole_unit: int | None = None  # the entry of the one unit that is this rank's whole block, as it is
    # Read for every matrix at every step, so fixed when the plan is built, as block_shape is. A later
    # change of the parameter's dtype leaves state_dtype valid: it only tells float32 master state apart.
    state_dtype: torch.dtype = field(init=False)
    reshaped: bool = field(init=False)  # this rank's tensors have another shape than block_shape

    def __post_init__(self):
        self.state_dtype = state_dtype(self.param)
        self.reshaped = tuple(local(self.param).shape) != self.block_shape

    @property
    def num_local_matrices(self) -> int:
        return math.prod(self.block_shape[:-2])


@dataclass
class AdamWParam:
    param: torch.Tensor
    group_index: int
    name: str
    replicated: bool


@dataclass(frozen=True)
class ReduceLayout:
    """Where each number of a flat group's one float64 all-reduce per step lives.

    Counts are summed over ranks; digests travel as two integer words and their squares, so that
    ``world * sum(x^2) == sum(x)^2`` holds exactly when every rank sent the same words.
    """

    sq_norms: slice  # per matrix slot: squared Frobenius norm of its corrected gradient (first replica)
    replica_norms: slice  # per view of a replicated plain parameter: this rank's gradient norm
    replica_sq: slice  # the same norms, squared
    has_grad: slice  # per parameter (matrices, then AdamW): 1 where this rank has its gradient
    nonfinite: slice  # per parameter: this rank's count of non-finite gradient views
    sparse: slice  # per parameter: 1 where this rank's gradient is sparse
    settings_digest: slice  # 2 words, then their 2 squares
    plan_digest: slice  # 2 words, then their 2 squares
    replanned: slice  # 1 value: 1 where this rank's parameters changed since the plan was built
    size: int

    @classmethod
    def build(cls, num_slots: int, num_params: int, num_replica_views: int) -> ReduceLayout:
        # From has_grad to the end, the numbers are written from the host in one copy.
        sizes = dict(
            sq_norms=num_slots,
            replica_norms=num_replica_views,
            replica_sq=num_replica_views,
            has_grad=num_params,
            nonfinite=num_params,
            sparse=num_params,
            settings_digest=4,
            plan_digest=4,
            replanned=1,
        )
        offset, slices = 0, {}
        for name, n in sizes.items():
            slices[name] = slice(offset, offset + n)
            offset += n
        return cls(**slices, size=offset)


@dataclass
class FlatGroup:
    """Parameters that share one set of ranks: one all-reduce and one owner plan per step."""

    ranks: tuple[int, ...]
    my_rank: int
    process_group: object  # None on one rank
    device: torch.device
    matrices: list[MatrixParam] = field(default_factory=list)
    adamw: list[AdamWParam] = field(default_factory=list)
    group_indices: tuple[int, ...] = ()
    num_slots: int = 0  # matrices in the flat group, each matrix of a batch counted
    owner_plan: GroupPlan | None = None
    engine: OwnerCompute | None = None
    reduce_layout: ReduceLayout | None = None
    reduce_buffer: torch.Tensor | None = None  # reused across steps
    all_slots: torch.Tensor | None = None  # every local matrix's slot, in view order
    view_params: torch.Tensor | None = None  # per gradient view (matrix views, then AdamW): its parameter
    replica_views: torch.Tensor | None = None  # positions of replicated parameters' views among all views
    plan_record: PlanRecord | None = None  # what the plan is built from, comparable across ranks
    plan_digest: list[float] = field(default_factory=list)  # the guard's digest of plan_record
    settings_digest: tuple[int, list[float]] = (-1, [])  # (settings version, the guard's digest of them)

    @property
    def world(self) -> int:
        return len(self.ranks)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.matrices] + [a.name for a in self.adamw]

    @property
    def params(self) -> list[torch.Tensor]:
        return [m.param for m in self.matrices] + [a.param for a in self.adamw]


@dataclass
class StepPlan:
    key: tuple  # identities of the parameters the plan was built for, in group order
    flat_groups: list[FlatGroup]


def param_name(group: dict, group_index: int, i: int) -> str:
    names = group.get("param_names")
    return names[i] if names else f"param_groups[{group_index}][{i}] (shape {tuple(group['params'][i].shape)})"


def plan_key(param_groups: list[dict]) -> tuple:
    return tuple(id(p) for g in param_groups for p in g["params"])


def resolve_process_group(option):
    """The process group plain tensors are replicated over: 'world' is WORLD when there is more than one rank."""
    if option == "world":
        initialized = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        return dist.group.WORLD if initialized else None
    return option


def placement(p: torch.Tensor, group: dict, process_group) -> tuple:
    """(ranks, my group rank, process group, layout or None, logical matrix shape) of one parameter."""
    view = tuple(p.shape)
    if group["use_mars"] and group["matrix_view"] == "flatten" and p.ndim > 2:
        view = (p.shape[0], math.prod(p.shape[1:]))
    if is_dtensor(p):
        layout = dtensor_layout(p, view) if group["use_mars"] else None
        ranks = layout.ranks if layout else tuple(sorted(int(r) for r in p.device_mesh.mesh.flatten().tolist()))
        return ranks, ranks.index(dist.get_rank()), flat_group(ranks, p.device_mesh), layout, view
    if process_group is None:
        ranks, my_rank = (0,), 0
    else:
        ranks, my_rank = tuple(dist.get_process_group_ranks(process_group)), dist.get_rank(process_group)
    layout = replicated_layout(view, ranks) if group["use_mars"] else None
    return ranks, my_rank, process_group, layout, view


def collect_flat_groups(param_groups: list[dict], process_group) -> list[FlatGroup]:
    """Every parameter into the flat group of its ranks, as a named record (no owners, no slots yet)."""
    by_ranks: dict[tuple, FlatGroup] = {}
    for gi, group in enumerate(param_groups):
        for i, p in enumerate(group["params"]):
            ranks, my_rank, pg, layout, view = placement(p, group, process_group)
            fg = by_ranks.get(ranks)
            if fg is None:
                fg = by_ranks[ranks] = FlatGroup(ranks, my_rank, pg, local(p).device)
            if gi not in fg.group_indices:
                fg.group_indices += (gi,)
            replicated = not is_dtensor(p) and len(ranks) > 1
            name = param_name(group, gi, i)
            if group["use_mars"]:
                block = tuple(index_len(b) for b in layout.blocks[my_rank])
                fg.matrices.append(
                    MatrixParam(
                        p, gi, name, view, layout, block, mars_math.lr_scale(view, group["lr_adjust"]), replicated
                    )
                )
            else:
                fg.adamw.append(AdamWParam(p, gi, name, replicated))
    return [by_ranks[k] for k in sorted(by_ranks)]


class ParamRecord(NamedTuple):
    """One parameter as the plan sees it; ranks compare these to name what differs."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    placements: str
    group: int


class PlanRecord(NamedTuple):
    """What the plan of a flat group is built from: every rank of the flat group must hold the same."""

    params: tuple[ParamRecord, ...]
    replan_settings: tuple  # per param group: (index, the values of its settings that move work)


def plan_record(fg: FlatGroup, param_groups: list[dict], replan_values) -> PlanRecord:
    params = tuple(
        ParamRecord(m.name, tuple(m.param.shape), str(m.param.dtype), m.layout.placements, m.group_index)
        for m in fg.matrices
    )
    params += tuple(
        ParamRecord(a.name, tuple(a.param.shape), str(a.param.dtype), _placements(a.param), a.group_index)
        for a in fg.adamw
    )
    return PlanRecord(params, tuple((gi, replan_values(param_groups[gi])) for gi in fg.group_indices))


def _placements(p: torch.Tensor) -> str:
    return str(tuple(p.placements)) if is_dtensor(p) else "replicated"


def plan_units(fg: FlatGroup, param_groups: list[dict]) -> list[MatrixEntry]:
    """Cut every matrix parameter into plan units; returns the owner plan's entries, in unit order."""
    entries: list[MatrixEntry] = []
    for m in fg.matrices:
        g = param_groups[m.group_index]
        if g["normalize"] == "neuron" and any(index_len(b[-1]) != m.view[-1] for b in m.layout.blocks):
            raise ValueError(
                f"MARSM: normalize='neuron' needs whole rows on each rank; {m.name} is split along "
                f"its columns ({m.layout.placements}), as a rowwise tensor-parallel weight is. Put it "
                "in a group with normalize=None."
            )
        try:
            units = split_units(m.view, m.layout, fg.my_rank, g["ns_head_dim"])
        except ValueError as e:
            raise ValueError(f"MARSM: {m.name}: {e} (param group {m.group_index} ns_head_dim)") from None
        if g["ns_head_dim"] is not None:
            m.lr_scale = mars_math.lr_scale((g["ns_head_dim"], m.view[-1]), g["lr_adjust"])
        m.units = []
        for u in units:
            my_block = u.layout.blocks[fg.my_rank]
            empty = None if block_numel(my_block) else torch.empty([index_len(i) for i in my_block], device=fg.device)
            m.units.append(UnitSlot(len(entries), u, empty))
            if (
                len(units) == 1
                and u.lead_pos is None
                and empty is None
                and tuple(index_len(i) for i in my_block) == m.block_shape
            ):
                m.whole_unit = len(entries)
            entries.append(
                MatrixEntry(
                    len(entries),
                    m.name + u.label,
                    u.shape,
                    u.layout,
                    g["ns_steps"],
                    g["ns_dtype"],
                    g["ns_method"],
                    g["ns_coefficients"],
                    holder=u.holder,
                )
            )
    return entries


def assign_slots(fg: FlatGroup) -> None:
    """Give every matrix of the flat group a global slot (its squared norm's place in the all-reduce) and
    lay out the per-step index tensors, so that the step reads them instead of rebuilding them."""
    offset = 0
    for m in fg.matrices:
        m.slots = _leading_indices(m.layout, fg.my_rank, m.view, fg.device) + offset
        m.slot_list = m.slots.tolist()
        m.first_replica = m.layout.replica_keys[fg.my_rank] == m.layout.replica_keys[0]
        offset += math.prod(m.view[:-2])
    fg.num_slots = offset
    fg.all_slots = torch.cat([m.slots for m in fg.matrices]) if fg.matrices else None
    view_params = [pos for pos, m in enumerate(fg.matrices) for _ in range(m.num_local_matrices)]
    replicas = [k for k, pos in enumerate(view_params) if fg.matrices[pos].replicated]
    n = len(view_params)
    view_params += [len(fg.matrices) + k for k in range(len(fg.adamw))]
    replicas += [n + k for k, a in enumerate(fg.adamw) if a.replicated]
    fg.view_params = torch.tensor(view_params, dtype=torch.long, device=fg.device)
    fg.replica_views = torch.tensor(replicas, dtype=torch.long, device=fg.device)
    fg.reduce_layout = ReduceLayout.build(fg.num_slots, len(fg.matrices) + len(fg.adamw), len(replicas))
    fg.reduce_buffer = torch.zeros(fg.reduce_layout.size, dtype=torch.float64, device=fg.device)


def build_step_plan(param_groups: list[dict], options: dict, replan_values) -> StepPlan:
    """The plan of every flat group, without any collective (agreement is the guard's job)."""
    flat_groups = collect_flat_groups(param_groups, resolve_process_group(options["process_group"]))
    wire_dtype = resolve_dtype(options["wire_dtype"])
    for fg in flat_groups:
        fg.plan_record = plan_record(fg, param_groups, replan_values)
        entries = plan_units(fg, param_groups)
        assign_slots(fg)
        fg.owner_plan = build_group_plan(
            entries,
            fg.ranks,
            fg.my_rank,
            options["owner_policy"],
            int(options["bucket_mb"] * 2**20),
            wire_dtype.itemsize,
            fg.process_group,
        )
        fg.engine = OwnerCompute(fg.owner_plan, wire_dtype)
    return StepPlan(plan_key(param_groups), flat_groups)


def _leading_indices(layout: Layout, rank: int, view: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Global positions of this rank's local matrices within the flattened leading (batch) dims."""
    lead = view[:-2]
    if not lead:
        return torch.zeros(1, dtype=torch.long, device=device)
    grid = torch.arange(math.prod(lead), device=device).view(lead)
    return take_block(grid, layout.blocks[rank][:-2]).reshape(-1)


def plan_report(plan: StepPlan) -> list[dict]:
    """Per flat group: who owns which matrix, Newton-Schulz FLOPs and bytes per rank."""
    return [
        {
            "ranks": fg.ranks,
            "owners": {e.name: fg.ranks[e.owner] for e in fg.owner_plan.entries},
            "per_rank": fg.owner_plan.report(),
        }
        for fg in plan.flat_groups
    ]
