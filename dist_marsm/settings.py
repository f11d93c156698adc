"""Every MARSM setting, declared once (layer 3).

Each :class:`Setting` says what a value may be and how the optimizer treats it. From this one table
come the constructor's defaults and checks, the checks of ``add_param_group``, ``load_state_dict`` and
of the first step after any change to ``param_groups``, the cross-rank agreement check, the param-group
keys saved in checkpoints, and the typed torchtitan config (``dist_marsm.titan``). Adding a setting
means one entry here and the code that reads it; a rule between settings goes in :func:`check_group_rules`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch

from dist_marsm.mars_math import LR_ADJUST_MODES
from dist_marsm.newton_schulz import NS_COEFFICIENT_SETS, NS_METHODS, resolve_coefficients
from dist_marsm.owner_plan import OWNER_POLICIES

VARIANTS = ("approx", "exact", "efficient")
MATRIX_VIEWS = ("batch", "flatten")
NORMALIZE_MODES = (None, "neuron")
NS_DTYPES = ("bfloat16", "float32")
WIRE_DTYPES = ("bfloat16", "float32")
NONFINITE_POLICIES = ("raise", "skip")


@dataclass(frozen=True)
class Range:
    """Finite reals (ints where ``integer``) from ``low`` to ``high``; ``str()`` is the error messages' wording.
    A setting with a real range stores floats."""

    low: float = 0.0
    high: float = math.inf
    low_open: bool = False  # low itself excluded
    high_closed: bool = False  # high itself included
    integer: bool = False

    def __call__(self, x) -> bool:
        if isinstance(x, bool) or not isinstance(x, int if self.integer else (int, float)) or not math.isfinite(x):
            return False
        return (self.low < x if self.low_open else self.low <= x) and (
            x <= self.high if self.high_closed else x < self.high
        )

    @property
    def bounds(self) -> str:
        if not math.isfinite(self.high):
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{']' if self.high_closed else ')'}"

    def __str__(self) -> str:
        kind = "an int" if self.integer else "a number" if math.isfinite(self.high) else "a finite number"
        return f"{kind} {self.bounds}"


@dataclass(frozen=True)
class Setting:
    """One setting. A closed set of values is given once, as ``choices``; a numeric one as a :class:`Range`
    ``valid``; either way ``expect`` (the error messages' "must be ...") is derived unless given."""

    name: str
    default: Any
    doc: str
    expect: str = ""  # what a valid value is, for error messages
    valid: Callable[[Any], bool] | None = None
    choices: tuple | None = None  # the closed set of values, where there is one
    scope: str = "group"  # "group": per param group; "optimizer": one per MARSM
    agree: bool = True  # every rank of a flat group must hold the same value
    checkpointed: bool = True  # group scope: saved with the param groups
    replan: bool = False  # a change rebuilds the owner plan
    argument: bool = True  # a MARSM constructor argument (else set by routing)
    canonical: Callable[[Any], Any] | None = None  # accepted spellings -> the one stored
    kind: Any = None  # the value's type where the default does not show it

    def __post_init__(self):
        if self.choices is None and not (isinstance(self.valid, Range) or self.valid and self.expect):
            raise TypeError(f"setting {self.name}: declare its choices, a Range, or a valid check and its expect")
        if self.valid is None:  # bools are ints in Python: a choice matches by type too
            object.__setattr__(self, "valid", lambda x: any(x == c and type(x) is type(c) for c in self.choices))
        if not self.expect:
            object.__setattr__(
                self,
                "expect",
                str(self.valid)
                if isinstance(self.valid, Range)
                else "True or False"
                if set(self.choices) == {True, False}
                else f"one of {self.choices}",
            )
        if self.canonical is None and isinstance(self.valid, Range) and not self.valid.integer:
            object.__setattr__(self, "canonical", _float)

    @property
    def annotation(self):
        """The value's type, for typed configs: a Literal of the choices where the set is closed."""
        if self.choices is not None and set(self.choices) != {True, False}:
            values = Literal[tuple(c for c in self.choices if c is not None)]  # type: ignore[misc]
            return Optional[values] if None in self.choices else values
        if self.kind is not None:
            return self.kind
        if self.default is None:
            raise TypeError(f"setting {self.name}: a None default shows no type; declare its kind")
        return tuple[type(self.default[0]), ...] if isinstance(self.default, tuple) else type(self.default)


def _float(x):
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else x


def _dtype_name(x):
    return str(x).removeprefix("torch.") if isinstance(x, torch.dtype) else x


def _pair(x):
    return tuple(_float(b) for b in x) if isinstance(x, (list, tuple)) else x


def _coefficients_ok(x) -> bool:
    try:
        resolve_coefficients(x, len(x) if isinstance(x, (list, tuple)) else 1)
    except (ValueError, TypeError):
        return False
    return True


def _coefficients(x):
    return tuple(_pair(t) for t in x) if isinstance(x, (list, tuple)) else x


def _is_process_group(x) -> bool:
    if x is None or x == "world":
        return True
    import torch.distributed as dist

    return dist.is_available() and isinstance(x, dist.ProcessGroup)


_NON_NEGATIVE, _UNIT, _BETA = Range(), Range(0.0, 1.0, high_closed=True), Range(0.0, 1.0)
_HEAD_ROWS = Range(1, integer=True)

SETTINGS: tuple[Setting, ...] = (
    Setting(
        "lr",
        3e-3,
        "learning rate of both routes (torch LR schedulers drive it)",
        f"{_NON_NEGATIVE} (a Python float, not a tensor)",
        _NON_NEGATIVE,
    ),
    Setting("momentum", 0.95, "beta of the MARS-M momentum", valid=_BETA),
    Setting("gamma", 0.025, "MARS correction scale; 0 gives Moonlight-style Muon", valid=_UNIT),
    Setting("weight_decay", 0.1, "decoupled weight decay, W *= 1 - lr * wd (unscaled lr)", valid=_NON_NEGATIVE),
    Setting(
        "variant",
        "approx",
        "approx (reference default), exact (step(closure), two gradients per step), "
        "efficient (one buffer, no clipping)",
        choices=VARIANTS,
    ),
    Setting("clip", True, "clip the corrected gradient to unit Frobenius norm (approx/exact)", choices=(True, False)),
    Setting("ns_steps", 5, "Newton-Schulz iterations", valid=Range(1, 99, high_closed=True, integer=True), replan=True),
    Setting(
        "ns_dtype", "bfloat16", "Newton-Schulz compute dtype", choices=NS_DTYPES, replan=True, canonical=_dtype_name
    ),
    # Not checkpointed: checkpoints written before these settings existed lack them.
    Setting(
        "ns_method",
        "standard",
        "Newton-Schulz form: standard, or gram (iterates on the small Gram matrix; "
        "falls back to standard where it saves no FLOPs, aspect ratio <= 1.5)",
        choices=NS_METHODS,
        checkpointed=False,
        replan=True,
    ),
    Setting(
        "ns_coefficients",
        "muon",
        "per-iteration (a, b, c) of the Newton-Schulz quintic: muon "
        "(3.4445, -4.7750, 2.0315 each iteration), polar_express (Amsel et al. 2025), or a list of triples",
        f"one of {tuple(NS_COEFFICIENT_SETS)} or a non-empty list of (a, b, c) triples of finite numbers",
        _coefficients_ok,
        checkpointed=False,
        replan=True,
        canonical=_coefficients,
        kind=Literal[tuple(NS_COEFFICIENT_SETS)],
    ),  # typed configs take set names; triples: the Python API
    Setting(
        "ns_head_dim",
        None,
        "rows per attention head: orthogonalize each head's rows of q/k/v on its own "
        "(per-head Newton-Schulz); None: the whole matrix",
        f"None or {_HEAD_ROWS}",
        lambda x: x is None or _HEAD_ROWS(x),
        checkpointed=False,
        replan=True,
        kind=Optional[int],
    ),
    Setting(
        "lr_adjust",
        "moonlight",
        "moonlight 0.2*sqrt(max(A,B)), original sqrt(max(1,A/B)), or none",
        choices=LR_ADJUST_MODES,
        replan=True,
    ),
    Setting(
        "matrix_view",
        "batch",
        "ndim > 2: a batch of matrices over leading dims (MoE experts) or flattened to [dim0, rest] (conv kernels)",
        choices=MATRIX_VIEWS,
        replan=True,
    ),
    Setting(
        "adamw_betas",
        (0.9, 0.95),
        "betas of the AdamW route",
        f"two numbers {_BETA.bounds}",
        lambda x: isinstance(x, tuple) and len(x) == 2 and all(map(_BETA, x)),
        canonical=_pair,
    ),
    Setting("adamw_eps", 1e-8, "eps of the AdamW route", valid=_NON_NEGATIVE),
    Setting(
        "normalize",
        None,
        "None, or neuron: NorMuon row-wise second-moment normalization",
        choices=NORMALIZE_MODES,
        replan=True,
    ),
    Setting("normuon_beta2", 0.95, "beta2 of NorMuon's row second moment", valid=_BETA),
    Setting(
        "use_mars",
        None,
        "route: True orthogonalizes matrices, False sends the group to AdamW; unset splits a group by ndim",
        choices=(True, False),
        replan=True,
        argument=False,
        kind=Optional[bool],
    ),
    # One per optimizer: they shape the owner plan and the step's collectives.
    Setting(
        "wire_dtype",
        "bfloat16",
        "dtype of momentum and results on the wire between ranks",
        choices=WIRE_DTYPES,
        scope="optimizer",
        replan=True,
        canonical=_dtype_name,
    ),
    Setting(
        "bucket_mb",
        64.0,
        "full-matrix MiB per communication bucket (bounds transient memory)",
        valid=Range(low_open=True),
        scope="optimizer",
        replan=True,
    ),
    Setting(
        "owner_policy",
        "largest_first",
        "which rank orthogonalizes which matrix",
        choices=OWNER_POLICIES,
        scope="optimizer",
        replan=True,
    ),
    Setting(
        "nonfinite",
        "raise",
        "an inf/NaN gradient on any rank: raise on every rank, or skip the step everywhere",
        choices=NONFINITE_POLICIES,
        scope="optimizer",
    ),
    Setting(
        "process_group",
        "world",
        "ranks over which plain (non-DTensor) parameters are replicated: "
        "'world', a ProcessGroup, or None (each rank on its own)",
        "'world', None or a torch.distributed ProcessGroup",
        _is_process_group,
        scope="optimizer",
        agree=False,
        replan=True,
    ),
)

BY_NAME = {s.name: s for s in SETTINGS}
GROUP_SETTINGS = tuple(s for s in SETTINGS if s.scope == "group")
OPTIMIZER_SETTINGS = tuple(s for s in SETTINGS if s.scope == "optimizer")
# Param-group keys a checkpoint holds; "initial_lr" is added by torch's LR schedulers.
CHECKPOINTED_GROUP_KEYS = frozenset({s.name for s in GROUP_SETTINGS if s.checkpointed} | {"initial_lr"})


def group_defaults(**overrides) -> dict:
    """The per-group defaults, with ``overrides`` (constructor arguments) in canonical form."""
    values = {s.name: overrides.get(s.name, s.default) for s in GROUP_SETTINGS if s.argument}
    return canonicalize(values)


def canonicalize(values: dict) -> dict:
    """Store accepted spellings in one form (torch dtypes as names, lists as tuples), in place."""
    for name, value in values.items():
        setting = BY_NAME.get(name)
        if setting is not None and setting.canonical is not None:
            values[name] = setting.canonical(value)
    return values


def validate(values: Mapping, where: str, scope: str = "group", names=None) -> None:
    """Raise ValueError naming ``where``, the setting and the value for the first invalid setting; for group
    scope, :func:`check_group_rules` too.

    Every setting of ``scope`` must be present: a missing one is an error too (a group that did not
    come from this optimizer, or another optimizer's state dict). ``names`` limits the check to those.
    """
    at = f"{where}: " if where else ""
    for s in SETTINGS:
        if s.scope != scope or (names is not None and s.name not in names):
            continue
        if s.name not in values:
            raise ValueError(f"{at}missing setting {s.name!r} ({s.expect})")
        value = values[s.name]
        if torch.is_tensor(value):
            raise ValueError(f"{at}{s.name} must be {s.expect}, got a tensor {value!r}")
        if not s.valid(value):
            raise ValueError(f"{at}{s.name} must be {s.expect}, got {value!r}")
    if scope == "group":
        check_group_rules(values, where)


def check_group_rules(group: Mapping, where: str) -> None:
    """The rules between one group's settings (each setting valid on its own), where the group holds them.

    Rules that need more than the settings stay with what they need: a variant change after steps (the
    optimizer's state), normalize='neuron' and ns_head_dim against each matrix's layout (the owner plan).
    """
    at = f"{where}: " if where else ""
    if "ns_steps" in group and not isinstance(group.get("ns_coefficients", "muon"), str):
        try:
            resolve_coefficients(group["ns_coefficients"], group["ns_steps"])
        except ValueError as e:
            raise ValueError(f"{at}ns_coefficients: {e}") from None
    if group.get("variant") == "efficient" and group.get("momentum") == 0:
        raise ValueError(
            f"{at}momentum must be > 0 for variant='efficient' (its buffer is scaled by "
            f"1/momentum), got {group['momentum']!r}"
        )


def agreed_values(values: Mapping, scope: str = "group") -> tuple:
    """The values every rank must share, as ((name, value), ...) in declaration order."""
    return tuple((s.name, values[s.name]) for s in SETTINGS if s.scope == scope and s.agree)


def replan_values(values: Mapping, scope: str = "group") -> tuple:
    return tuple(values[s.name] for s in SETTINGS if s.scope == scope and s.replan)
