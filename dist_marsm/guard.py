"""The step's guard (layer 3): every rank of a flat group trains on the same plan and settings, and
every rank fails together.

The checks ride in the one float64 all-reduce the step issues per flat group (its layout is
:class:`dist_marsm.step_plan.ReduceLayout`): settings and plan digests, a flag from any rank whose
parameters changed since its plan was built, gradient presence, sparse and non-finite flags, and the
gradient norms of plain replicated parameters. Every rank reads the same sums, so every rank reaches
the same verdict at the same point; only when a check fails do the ranks exchange their records (one
``all_gather_object``) to name what differs.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from dist_marsm import settings
from dist_marsm.step_plan import FlatGroup, ParamRecord, PlanRecord, ReduceLayout, local

DIGEST_BITS = 20
# Replicas synchronised by an all-reduce or a broadcast hold bitwise-equal gradients, so their float64
# norms are equal; the tolerance only absorbs the rounding of sums over thousands of ranks in the check
# itself, while replicas that are not synchronised differ in the leading digits.
REPLICA_RTOL = 1e-6


class NonFiniteGradientError(FloatingPointError):
    """Raised on every rank, at the same step, when any rank has an inf/NaN gradient."""


def digest(record) -> tuple[int, int]:
    """Two 20-bit integers from ``repr(record)``, small enough that sums and sums of squares over
    thousands of ranks stay exact in float64."""
    h = hashlib.blake2b(repr(record).encode(), digest_size=8).digest()
    word = int.from_bytes(h, "little")
    mask = (1 << DIGEST_BITS) - 1
    return word & mask, (word >> DIGEST_BITS) & mask


def digest_values(record, world: int) -> list[float]:
    """A record's two digest words and their squares (zeros on one rank, where there is nobody to disagree)."""
    if world == 1:
        return [0.0] * 4
    words = [float(w) for w in digest(record)]
    return words + [w * w for w in words]


def digests_agree(sums: list[float], world: int) -> bool:
    """All ranks sent the same words iff world * sum(x^2) == sum(x)^2 for each (Cauchy-Schwarz)."""
    return all(world * int(q) == int(s) ** 2 for s, q in zip(sums[:2], sums[2:]))


class SettingsRecord(NamedTuple):
    """Everything the ranks of a flat group must share: the optimizer's options and its groups' settings."""

    options: tuple  # ((name, value), ...)
    groups: tuple  # ((group index, ((name, value), ...)), ...)


def settings_record(options: dict, param_groups: list[dict], group_indices: tuple[int, ...]) -> SettingsRecord:
    return SettingsRecord(
        settings.agreed_values(options, "optimizer"),
        tuple((gi, settings.agreed_values(param_groups[gi])) for gi in group_indices),
    )


@dataclass(frozen=True)
class RankRecord:
    """One rank's records, exchanged only when a check fails, to name what differs."""

    plan: PlanRecord
    settings: SettingsRecord
    replanned: bool = False
    changed: str | None = None  # the first parameter that changed on a rank that rebuilt its plan


@dataclass(frozen=True)
class Header:
    """This rank's part of the guard in the step's all-reduce (or in the plan agreement's)."""

    settings_digest: list[float]
    plan_digest: list[float]
    replanned: bool


@dataclass
class Reduced:
    """The step's all-reduce read back to the host once, as named lists."""

    sq_norms: list[float]
    has_grad: list[float]
    nonfinite: list[float]
    sparse: list[float]
    replica_norms: list[float]
    replica_sq: list[float]
    settings_digest: list[float]
    plan_digest: list[float]
    replanned: float

    @classmethod
    def read(cls, layout: ReduceLayout, values: torch.Tensor) -> Reduced:
        host = values.tolist()
        return cls(
            host[layout.sq_norms],
            host[layout.has_grad],
            host[layout.nonfinite],
            host[layout.sparse],
            host[layout.replica_norms],
            host[layout.replica_sq],
            host[layout.settings_digest],
            host[layout.plan_digest],
            host[layout.replanned][0],
        )


def write_header(fg: FlatGroup, header: Header) -> None:
    layout, values = fg.reduce_layout, fg.reduce_buffer
    values[layout.settings_digest.start : layout.replanned.stop].copy_(
        torch.tensor(header.settings_digest + header.plan_digest + [float(header.replanned)], dtype=torch.float64)
    )


def all_reduce(values: torch.Tensor, fg: FlatGroup) -> int:
    """Sum over the flat group; returns the bytes this rank put on the wire."""
    if fg.process_group is None:
        return 0
    dist.all_reduce(values, op=dist.ReduceOp.SUM, group=fg.process_group)
    return values.numel() * values.element_size()


# ------------------------------------------------------------------ agreement
def check_agreement(fg: FlatGroup, reduced: Reduced, mine: dict) -> None:
    """Raise on every rank when the ranks' settings, plans or parameter sets differ.

    ``mine`` is this rank's record (see :func:`name_difference`); it is exchanged only on a mismatch.
    """
    if fg.process_group is None:
        return
    world = fg.world
    if (
        reduced.replanned == 0
        and digests_agree(reduced.settings_digest, world)
        and digests_agree(reduced.plan_digest, world)
    ):
        return
    if reduced.replanned == world and digests_agree(reduced.settings_digest, world):
        return  # every rank changed its parameters: the caller rebuilds the plan and agrees on the new one
    raise RuntimeError(name_difference(fg, mine))


def name_difference(fg: FlatGroup, mine: dict) -> str:
    """Every rank's record, gathered; the first difference from the group's first rank, in words.

    Records: ``plan`` (per parameter: name, shape, dtype, placements, group), ``settings`` (see
    :func:`settings_record`), ``replanned`` and ``changed`` (the first parameter that changed on a
    rank that rebuilt its plan).
    """
    everyone = [None] * fg.world
    dist.all_gather_object(everyone, mine, group=fg.process_group)
    ref = everyone[0]
    for rank, theirs in enumerate(everyone):
        message = _describe(fg.ranks[0], fg.ranks[rank], ref, theirs)
        if message:
            return message
    changed = [(fg.ranks[r], rec.changed) for r, rec in enumerate(everyone) if rec.replanned]
    still = [fg.ranks[r] for r, rec in enumerate(everyone) if not rec.replanned]
    if changed:
        first = next((name for _, name in changed if name), "a parameter")
        return (
            f"MARSM: the parameters changed on rank(s) {[r for r, _ in changed]} but not on rank(s) {still} "
            f"since the last step (first change: {first}); every rank must make the same change "
            "(add_param_group, a replaced parameter, a re-wrapped model) before the next step"
        )
    return "MARSM: the ranks' settings or plan digests differ but their records compare equal"


def _describe(rank_a: int, rank_b: int, a: RankRecord, b: RankRecord) -> str | None:
    params_a, params_b = a.plan.params, b.plan.params
    if len(params_a) != len(params_b):
        names = {p.name for p in params_a} ^ {p.name for p in params_b}
        return (
            f"MARSM: rank {rank_b} has {len(params_b)} parameters, rank {rank_a} has {len(params_a)}; "
            f"differing: {sorted(map(str, names))[:5]}"
        )
    for pa, pb in zip(params_a, params_b):
        if pa != pb:
            return (
                f"MARSM: parameter {pa.name} differs between rank {rank_a} and rank {rank_b}: "
                f"{_field_difference(pa, pb)}"
            )
    if a.settings != b.settings:
        differing = [gi for (gi, ga), (_, gb) in zip(a.settings.groups, b.settings.groups) if ga != gb]
        first = next((p.name for p in params_a if differing and p.group == differing[0]), None)
        subject = f"parameter {first} differs" if first else "settings differ"
        return (
            f"MARSM: {subject} between rank {rank_a} and rank {rank_b}: settings differ: "
            f"{_settings_difference(a.settings, b.settings)}"
        )
    if a.plan.replan_settings != b.plan.replan_settings:
        return (
            f"MARSM: the plan settings differ between rank {rank_a} and rank {rank_b}: "
            f"{a.plan.replan_settings} vs {b.plan.replan_settings}"
        )
    return None


def _field_difference(a: ParamRecord, b: ParamRecord) -> str:
    """What differs between two ranks' records of a parameter."""
    if a.name != b.name:
        return f"the parameter at this position is {b.name} on the other rank (different parameter sets or order)"
    return "; ".join(
        f"{field.replace('group', 'param group')} {x} vs {y}"
        for field, x, y in zip(ParamRecord._fields, a, b)
        if x != y
    )


def _settings_difference(a: SettingsRecord, b: SettingsRecord) -> str:
    diffs = [f"{k} {va!r} vs {vb!r}" for (k, va), (_, vb) in zip(a.options, b.options) if va != vb]
    for (gi, ga), (_, gb) in zip(a.groups, b.groups):
        diffs += [f"param group {gi} {k} {va!r} vs {vb!r}" for (k, va), (_, vb) in zip(ga, gb) if va != vb]
    return "; ".join(diffs) or f"{len(a.groups)} vs {len(b.groups)} param groups"


def agree_on_plan(fg: FlatGroup, header: Header, mine: dict) -> None:
    """When a plan is (re)built: the digests in a fixed-size all-reduce, whose size cannot differ between
    ranks as the step's may; a mismatch is named on every rank."""
    if fg.process_group is None:
        return
    values = torch.tensor(header.settings_digest + header.plan_digest, dtype=torch.float64, device=fg.device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM, group=fg.process_group)
    host = values.tolist()
    if not (digests_agree(host[:4], fg.world) and digests_agree(host[4:], fg.world)):
        raise RuntimeError(name_difference(fg, mine))


# ------------------------------------------------------------------ gradients
def check_gradients(fg: FlatGroup, reduced: Reduced) -> list[int]:
    """Raise on every rank for gradients that only some ranks have, sparse gradients, or replicas whose
    gradients differ; returns the parameters with non-finite gradients (positions in ``fg.params``).

    The common case (no finding) is decided by builtins over the lists; names are looked up only on a finding.
    """
    if not set(reduced.has_grad) <= {0.0, float(fg.world)}:
        first = next(i for i, h in enumerate(reduced.has_grad) if 0 < h < fg.world)
        raise RuntimeError(
            f"MARSM: parameter {fg.names[first]} has a gradient on {int(reduced.has_grad[first])} "
            f"of {fg.world} ranks; every rank must take part in every step (or none)"
        )
    if any(reduced.sparse):
        first = next(i for i, s in enumerate(reduced.sparse) if s > 0)
        raise ValueError(
            f"MARSM: parameter {fg.names[first]} has a sparse gradient on some rank; MARSM needs "
            "dense gradients (use nn.Embedding(sparse=False))"
        )
    if any(reduced.nonfinite):
        return [i for i, f in enumerate(reduced.nonfinite) if f > 0]
    if reduced.replica_norms and all_finite(reduced.replica_norms):
        _check_replicas(fg, reduced)
    return []


def all_finite(values: list[float]) -> bool:
    """Whether every value is finite. Their sum is, unless one is not, or the sum overflows: only then
    are they looked at one by one."""
    return math.isfinite(sum(values)) or all(math.isfinite(x) for x in values)


def _check_replicas(fg: FlatGroup, reduced: Reduced) -> None:
    world = fg.world
    for k, (s, q) in enumerate(zip(reduced.replica_norms, reduced.replica_sq)):
        mean = s / world
        spread = math.sqrt(max(q / world - mean * mean, 0.0))
        if spread > REPLICA_RTOL * mean + 1e-30:
            name = fg.names[int(fg.view_params[fg.replica_views[k]])]
            raise RuntimeError(
                f"MARSM: parameter {name} is a plain tensor replicated over {world} ranks, but its gradient differs "
                f"between them (gradient norms: mean {mean:.6g}, spread {spread:.3g}); replicas that are not "
                "synchronised train apart. Wrap the model in DDP or FSDP2 (fully_shard) so that gradients are "
                "averaged, or pass process_group=None if each rank trains its own parameters."
            )


def nonfinite_error(fg: FlatGroup, bad: list[int], step: int) -> NonFiniteGradientError:
    """The error naming every rank's non-finite parameters (one all_gather_object: an error path)."""
    params, names = fg.params, fg.names
    local_bad = [names[i] for i in bad if _has_nonfinite(params[i].grad)]
    everyone = [local_bad]
    if fg.process_group is not None:
        everyone = [None] * fg.world
        dist.all_gather_object(everyone, local_bad, group=fg.process_group)
    where = "; ".join(f"rank {fg.ranks[r]}: {', '.join(b[:3])}" for r, b in enumerate(everyone) if b)
    return NonFiniteGradientError(f"MARSM: non-finite gradient at step {step} ({where or names[bad[0]]})")


def _has_nonfinite(grad) -> bool:
    return grad is not None and not bool(torch.isfinite(local(grad)).all())
