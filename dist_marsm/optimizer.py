"""The MARSM optimizer (layer 3): param groups, state, the AdamW route, and a ``step`` that runs
the element-wise MARS-M math on local shards in foreach form, reduces the clipping norms once per
step, and hands the momentum to the owner plan for Newton-Schulz.

Per matrix parameter W (A x B), approximate variant (the MARS-M reference's default):
    c = g + gamma * beta / (1 - beta) * (g - g_prev);  c /= max(1, ||c||_F)
    m = beta * m + (1 - beta) * c
    W *= 1 - lr * wd;  W -= lr * 0.2 * sqrt(max(A, B)) * NewtonSchulz5(m);  g_prev = g

Every setting is declared once, in :mod:`dist_marsm.settings`.
"""

from __future__ import annotations

import difflib
import inspect
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.optim.adamw import adamw as functional_adamw

from dist_marsm import mars_math, settings
from dist_marsm.collectives import OwnerCompute, all_gather_objects, all_reduce_sum, flat_group
from dist_marsm.newton_schulz import resolve_dtype
from dist_marsm.owner_plan import (
    GroupPlan,
    Layout,
    MatrixEntry,
    block_numel,
    build_group_plan,
    dtensor_layout,
    index_len,
    replicated_layout,
    split_units,
    take_block,
)
from dist_marsm.settings import GROUP_SETTINGS, OPTIMIZER_SETTINGS

# Per-parameter flags in the step's all-reduce: a sparse gradient outweighs any count of non-finite ones.
_SPARSE_FLAG = 2.0**20


class NonFiniteGradientError(FloatingPointError):
    """Raised on every rank, at the same step, when any rank has an inf/NaN gradient."""


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this process stores: a DTensor's local shard, or the tensor itself."""
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "placements")


def _state_dtype(param: torch.Tensor) -> torch.dtype:
    """Optimizer state is kept in float32 for low-precision parameters (fp32 master state)."""
    return torch.float32 if param.dtype in (torch.bfloat16, torch.float16) else param.dtype


@dataclass
class _Matrix:
    """A MARS-M parameter as this rank sees it in the plan (fixed until the plan is rebuilt)."""

    param: torch.Tensor
    group_index: int
    name: str
    view: tuple[int, ...]           # logical shape as orthogonalized ([..., A, B])
    layout: Layout
    block_shape: tuple[int, ...]    # this rank's block of ``view``
    slots: torch.Tensor             # global positions of this rank's matrices among the flat group's
    slot_list: list[int]            # the same, on the host
    contributes: bool               # this rank's block counts towards the global norms (its replica is the first)
    lr_scale: float
    units: list = field(default_factory=list)   # (plan entry position, Unit): what the owners orthogonalize


@dataclass
class _FlatGroup:
    """Parameters that share one set of ranks: one all-reduce and one owner plan per step."""

    ranks: tuple[int, ...]
    my_rank: int
    group: object
    device: torch.device
    matrices: list[_Matrix] = field(default_factory=list)
    others: list = field(default_factory=list)     # (param, group index, name): AdamW-routed
    group_indices: tuple[int, ...] = ()
    num_slots: int = 0                             # matrices in the flat group (batched ones counted each)
    plan: GroupPlan | None = None
    engine: OwnerCompute | None = None
    reduce_buffer: torch.Tensor | None = None     # the step's all-reduce, reused across steps
    all_slots: torch.Tensor | None = None         # every local matrix's slot, in view order
    flag_index: torch.Tensor | None = None        # per view and AdamW parameter: its non-finite flag's position


class MARSM(torch.optim.Optimizer):
    """MARS-M (variance-reduced Muon) for matrices, AdamW for everything else, on one process or many.

    Args:
        params: parameters or param groups. A group's ``use_mars`` flag routes it (False -> AdamW);
            a group without the flag is split in two by ndim (matrices -> MARS-M). Use
            :func:`dist_marsm.build_param_groups` to also send embeddings and the output head to AdamW.
        **settings: keyword arguments, each declared once in :data:`dist_marsm.settings.SETTINGS` with
            its default, allowed values and meaning (``inspect.signature(MARSM)`` lists them). Group
            settings (lr, momentum, gamma, ...) may be overridden per param group; optimizer settings
            (wire_dtype, bucket_mb, owner_policy, nonfinite, process_group) are one per optimizer and
            live in ``opt.options``.

    Settings are checked here, in ``add_param_group`` and ``load_state_dict``, and again at the first
    step after any change (``opt.param_groups[i][key] = ...`` or ``opt.options[key] = ...``); at every
    step all ranks of a flat group must hold the same values, or every rank raises naming the difference.
    """

    def __init__(self, params, **settings_):
        unknown = sorted(set(settings_) - {s.name for s in settings.SETTINGS if s.argument})
        if unknown:
            close = difflib.get_close_matches(unknown[0], [s.name for s in settings.SETTINGS if s.argument], n=1)
            raise TypeError(f"MARSM: unknown setting {unknown[0]!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        defaults = settings.group_defaults(**settings_)
        settings.validate(defaults, "MARSM", names=defaults)
        self.options = settings.canonicalize({s.name: settings_.get(s.name, s.default) for s in OPTIMIZER_SETTINGS})
        settings.validate(self.options, "MARSM", scope="optimizer")
        self.nonfinite_skips = 0
        self.last_step_stats: dict = {}
        self._allreduce_bytes = 0
        self._flat_groups: list[_FlatGroup] | None = None
        self._plan_key = None
        self._checked: list[tuple] = []
        self._checked_options: tuple = ()
        super().__init__(params, defaults)
        self._checked_options = tuple(self.options.values())

    @property
    def wire_dtype(self) -> torch.dtype:
        return resolve_dtype(self.options["wire_dtype"])

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict) -> None:
        if isinstance(param_group.get("params"), torch.Tensor):
            param_group = {**param_group, "params": [param_group["params"]]}
        if param_group.get("use_mars") is None:
            params = list(param_group["params"])
            names = param_group.get("param_names")
            if params and isinstance(params[0], tuple):  # named parameters
                names, params = [n for n, _ in params], [p for _, p in params]
            split = {True: ([], []), False: ([], [])}
            for i, p in enumerate(params):
                split[p.ndim >= 2][0].append(p)
                split[p.ndim >= 2][1].append(names[i] if names else None)
            for use_mars, (ps, ns) in split.items():
                if ps:
                    group = {**param_group, "params": ps, "use_mars": use_mars}
                    if names:
                        group["param_names"] = ns
                    else:
                        group.pop("param_names", None)
                    self.add_param_group(group)
            return
        where = f"MARSM: param group {len(self.param_groups)}"
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        settings.canonicalize(group)
        try:
            settings.validate(group, where)
            names = group.get("param_names")
            if names is not None and len(names) != len(group["params"]):
                raise ValueError(f"{where}: {len(names)} param_names for {len(group['params'])} parameters")
            for i, p in enumerate(group["params"]):
                _check_parameter(p, group, i, where)
        except ValueError:
            self.param_groups.pop()
            raise
        self._checked.append(_group_values(group))
        self._plan_key = None

    # ------------------------------------------------------------------ state dict
    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's (the saved group values are restored), after checking that the state dict is a
        MARSM one for these groups, and keeping float32 master state for low-precision parameters.

        Group settings a checkpoint predates (not checkpointed) keep their live values.
        """
        saved_groups = state_dict.get("param_groups")
        if not isinstance(saved_groups, list) or len(saved_groups) != len(self.param_groups):
            raise ValueError(f"MARSM.load_state_dict: the state dict has "
                             f"{len(saved_groups) if isinstance(saved_groups, list) else 'no'} param groups, "
                             f"this optimizer has {len(self.param_groups)}")
        groups = []
        for i, (saved, live) in enumerate(zip(saved_groups, self.param_groups)):
            where = f"MARSM.load_state_dict: param group {i}"
            missing = sorted(settings.CHECKPOINTED_GROUP_KEYS - {"initial_lr"} - set(saved))
            if missing:
                raise ValueError(f"{where} lacks the MARSM settings {missing}: not a MARSM state dict "
                                 f"(another optimizer's?); it has keys {sorted(k for k in saved if k != 'params')}")
            if saved["use_mars"] != live["use_mars"] or len(saved["params"]) != len(live["params"]) or (
                    "param_names" in saved and "param_names" in live and saved["param_names"] != live["param_names"]):
                raise ValueError(f"{where} does not match this optimizer's group {i} (use_mars "
                                 f"{saved['use_mars']} vs {live['use_mars']}, {len(saved['params'])} vs "
                                 f"{len(live['params'])} parameters, names {_names_hint(saved)} vs "
                                 f"{_names_hint(live)}): groups in another order, or another model?")
            group = {**{s.name: live[s.name] for s in GROUP_SETTINGS if not s.checkpointed}, **saved}
            settings.canonicalize(group)
            settings.validate(group, where)
            groups.append(group)
        saved_ids = [i for g in saved_groups for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        originals = {p: state_dict["state"].get(i, {}) for i, p in zip(saved_ids, params)}
        super().load_state_dict({**state_dict, "param_groups": groups})
        for p, saved in originals.items():
            for key, value in saved.items():
                if key != "step" and torch.is_tensor(value) and value.dtype == torch.float32 != p.dtype:
                    self.state[p][key] = value.to(device=p.device)
        self._checked = [_group_values(g) for g in self.param_groups]
        self._plan_key = None

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step.

        ``variant="exact"`` needs ``closure``: a function that computes the loss on the *current* batch,
        calls backward and returns the loss. The optimizer clears the gradients before each call and
        calls it twice: at the previous iterate x_{t-1} (for g(x_{t-1}; batch_t)) and at x_t.
        """
        start = time.perf_counter()
        try:
            self._check_settings()
        except ValueError as error:
            if self._flat_groups is None or all(fg.group is None for fg in self._flat_groups):
                raise
            # The other ranks are about to enter this step's collectives: take part in them, so that every
            # rank fails at the same point (on the settings digest, or here) instead of waiting for a timeout.
            for fg in self._flat_groups:
                self._reduce_then_raise(fg, error)
        exact = any(g["use_mars"] and g["variant"] == "exact" for g in self.param_groups)
        prev_grads: dict = {}
        if exact:
            if closure is None:
                raise ValueError("MARSM: variant='exact' needs step(closure): the closure recomputes the loss "
                                 "and gradients of the current batch at the previous iterate")
            loss = self._exact_gradients(closure, prev_grads)
        else:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
        flat_groups = self._ensure_plan()
        self._allreduce_bytes = 0
        stats = {"ns_matrices": 0, "bytes_sent": 0, "skipped": False}
        staged = [self._stage(fg, prev_grads) for fg in flat_groups]
        if any(s is None for s in staged):
            self.nonfinite_skips += 1
            stats.update(skipped=True, nonfinite_skips=self.nonfinite_skips, allreduce_bytes=self._allreduce_bytes,
                         step_time_s=time.perf_counter() - start)
            self.last_step_stats = stats
            return loss
        for fg, s in zip(flat_groups, staged):
            self._update_matrices(fg, s)
            stats["ns_matrices"] += fg.engine.ns_matrices
            stats["bytes_sent"] += fg.engine.bytes_sent
            self._update_adamw([item for item in fg.others if item[0].grad is not None], exact)
        stats.update(nonfinite_skips=self.nonfinite_skips, allreduce_bytes=self._allreduce_bytes,
                     step_time_s=time.perf_counter() - start)
        self.last_step_stats = stats
        return loss

    # -- settings ----------------------------------------------------------------
    def _check_settings(self) -> None:
        """Re-validate whatever changed since the last check; a change that moves work rebuilds the plan."""
        options = tuple(self.options.values())
        if options != self._checked_options:
            settings.canonicalize(self.options)
            settings.validate(self.options, "MARSM.options", scope="optimizer")
            if settings.replan_values(self.options, "optimizer") != settings.replan_values(
                    dict(zip(self.options, self._checked_options)), "optimizer"):
                self._plan_key = None
            self._checked_options = tuple(self.options.values())
        if len(self._checked) != len(self.param_groups):
            raise ValueError("MARSM: param_groups was changed by hand; use add_param_group")
        for i, group in enumerate(self.param_groups):
            values = _group_values(group)
            if values == self._checked[i]:
                continue
            where = f"MARSM: param group {i}"
            settings.canonicalize(group)
            settings.validate(group, where)
            old = dict(zip(_GROUP_KEYS, self._checked[i]))
            if (old["variant"] == "efficient") != (group["variant"] == "efficient") and any(
                    "momentum" in self.state[p] for p in group["params"]):
                raise ValueError(f"{where}: variant changed from {old['variant']!r} to {group['variant']!r} after "
                                 "steps were taken; the 'efficient' momentum buffer has another scale than the "
                                 "approx/exact one, so the state cannot carry over (start a new optimizer)")
            if settings.replan_values(old) != settings.replan_values(group):
                self._plan_key = None
            self._checked[i] = _group_values(group)

    # -- plan ------------------------------------------------------------------
    def _ensure_plan(self) -> list[_FlatGroup]:
        key = tuple(id(p) for g in self.param_groups for p in g["params"])
        if self._plan_key == key and self._flat_groups is not None:
            return self._flat_groups
        by_ranks: dict[tuple, _FlatGroup] = {}
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                name = _param_name(group, gi, i)
                ranks, my_rank, pg, layout, view = self._placement(p, group)
                fg = by_ranks.get(ranks)
                if fg is None:
                    fg = by_ranks[ranks] = _FlatGroup(ranks, my_rank, pg, _local(p).device)
                if gi not in fg.group_indices:
                    fg.group_indices += (gi,)
                if group["use_mars"]:
                    block = tuple(index_len(b) for b in layout.blocks[my_rank])
                    fg.matrices.append(_Matrix(p, gi, name, view, layout, block, torch.empty(0), [], False,
                                               mars_math.lr_scale(view, group["lr_adjust"])))
                else:
                    fg.others.append((p, gi, name))
        flat_groups = [by_ranks[k] for k in sorted(by_ranks)]
        for fg in flat_groups:
            self._check_ranks_agree(fg)
            entries = []
            for pos, m in enumerate(fg.matrices):
                g = self.param_groups[m.group_index]
                if g["normalize"] == "neuron" and any(index_len(b[-1]) != m.view[-1] for b in m.layout.blocks):
                    raise ValueError(f"MARSM: normalize='neuron' needs whole rows on each rank; {m.name} is split "
                                     f"along its columns ({m.layout.placements}), as a rowwise tensor-parallel "
                                     "weight is. Put it in a group with normalize=None.")
                try:
                    units = split_units(m.view, m.layout, fg.my_rank, g["ns_head_dim"])
                except ValueError as e:
                    raise ValueError(f"MARSM: {m.name}: {e} (param group {m.group_index} ns_head_dim)") from None
                if g["ns_head_dim"] is not None:
                    m.lr_scale = mars_math.lr_scale((g["ns_head_dim"], m.view[-1]), g["lr_adjust"])
                m.units = []
                for u in units:
                    empty = None if block_numel(u.layout.blocks[fg.my_rank]) else torch.empty(
                        [index_len(i) for i in u.layout.blocks[fg.my_rank]], device=fg.device)
                    m.units.append((len(entries), u, empty))
                    entries.append(MatrixEntry(len(entries), m.name + u.label, u.shape, u.layout, g["ns_steps"],
                                               g["ns_dtype"], g["ns_method"], g["ns_coefficients"], holder=u.holder))
            offset = 0
            for m in fg.matrices:
                m.slots = _leading_indices(m.layout, fg.my_rank, m.view, fg.device) + offset
                m.slot_list = m.slots.tolist()
                m.contributes = m.layout.replica_keys[fg.my_rank] == m.layout.replica_keys[0]
                offset += math.prod(m.view[:-2])
            fg.num_slots = offset
            n_params = len(fg.matrices) + len(fg.others)
            fg.all_slots = torch.cat([m.slots for m in fg.matrices]) if fg.matrices else None
            per_view = [pos for pos, m in enumerate(fg.matrices) for _ in range(math.prod(m.block_shape[:-2]))]
            fg.flag_index = torch.tensor(per_view + [len(fg.matrices) + k for k in range(len(fg.others))],
                                         dtype=torch.long, device=fg.device) + fg.num_slots + n_params
            fg.reduce_buffer = torch.zeros(fg.num_slots + 2 * n_params + 4, dtype=torch.float64, device=fg.device)
            fg.plan = build_group_plan(entries, fg.ranks, fg.my_rank, self.options["owner_policy"],
                                       int(self.options["bucket_mb"] * 2**20), self.wire_dtype.itemsize, fg.group)
            fg.engine = OwnerCompute(fg.plan, self.wire_dtype)
        self._flat_groups, self._plan_key = flat_groups, key
        return flat_groups

    def _placement(self, p, group):
        """(ranks, my group rank, process group, layout or None, logical matrix shape) of one parameter."""
        view = tuple(p.shape)
        if group["use_mars"] and group["matrix_view"] == "flatten" and p.ndim > 2:
            view = (p.shape[0], math.prod(p.shape[1:]))
        if _is_dtensor(p):
            layout = dtensor_layout(p, view) if group["use_mars"] else None
            ranks = layout.ranks if layout else tuple(sorted(int(r) for r in p.device_mesh.mesh.flatten().tolist()))
            return ranks, ranks.index(dist.get_rank()), flat_group(ranks, p.device_mesh), layout, view
        pg = self.options["process_group"]
        if pg == "world":
            pg = dist.group.WORLD if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None
        if pg is None:
            ranks, my_rank = (0,), 0
        else:
            ranks = tuple(dist.get_process_group_ranks(pg))
            my_rank = dist.get_rank(pg)
        return ranks, my_rank, pg, replicated_layout(view, ranks) if group["use_mars"] else None, view

    def _agreed(self, fg: _FlatGroup) -> tuple:
        """Everything the ranks of ``fg`` must share: the optimizer's options and its groups' settings."""
        return (settings.agreed_values(self.options, "optimizer"),
                tuple((gi, settings.agreed_values(self.param_groups[gi])) for gi in fg.group_indices))

    def _check_ranks_agree(self, fg: _FlatGroup) -> None:
        """All ranks of a flat group must hold the same parameters, shapes, dtypes and settings.

        One all_gather_object when the plan is built (and whenever the per-step digest differs): a
        mismatch raises the same error on every rank, naming the first difference.
        """
        mine = ([(m.name, tuple(m.param.shape), str(m.param.dtype)) for m in fg.matrices]
                + [(name, tuple(p.shape), str(p.dtype)) for p, _, name in fg.others], self._agreed(fg))
        everyone = all_gather_objects(mine, fg.group, len(fg.ranks))
        ref_params, ref_settings = everyone[0]
        for rank, (theirs, their_settings) in enumerate(everyone):
            if len(theirs) != len(ref_params):
                names = {t[0] for t in theirs} ^ {t[0] for t in ref_params}
                raise RuntimeError(f"MARSM: rank {fg.ranks[rank]} has {len(theirs)} parameters, rank {fg.ranks[0]} has "
                                   f"{len(ref_params)}; differing: {sorted(map(str, names))[:5]}")
            for a, b in zip(ref_params, theirs):
                if a != b:
                    raise RuntimeError(f"MARSM: parameter {a[0]} differs between rank {fg.ranks[0]} and rank "
                                       f"{fg.ranks[rank]}: {_describe_difference(a, b)}")
            if their_settings != ref_settings:
                differing = [gi for (gi, a), (_, b) in zip(ref_settings[1], their_settings[1]) if a != b]
                first = next((m.name for m in fg.matrices if differing and m.group_index == differing[0]),
                             next((n for _, gi, n in fg.others if differing and gi == differing[0]), None))
                subject = f"parameter {first} differs" if first else "settings differ"
                raise RuntimeError(f"MARSM: {subject} between rank {fg.ranks[0]} and rank {fg.ranks[rank]}: settings "
                                   f"differ: {_describe_settings(ref_settings, their_settings)}")

    # -- stage: element-wise math + the one all-reduce ------------------------------
    def _stage(self, fg: _FlatGroup, prev_grads: dict):
        """Corrected (and clipped) gradients of every local matrix, in foreach form, after one all-reduce
        of [per-matrix squared norms | has-gradient counts | non-finite flags | settings digest].

        Returns {position: NS-input candidate} or None when the step is skipped. Nothing in the
        optimizer's state or the parameters is modified here.
        """
        n_mats, n_params = len(fg.matrices), len(fg.matrices) + len(fg.others)
        present = [pos for pos, m in enumerate(fg.matrices) if m.param.grad is not None]
        others = [k for k, (p, _, _) in enumerate(fg.others) if p.grad is not None]
        for pos in present:
            _check_gradient(fg.matrices[pos].param.grad, fg.matrices[pos].name)
        corrected = self._corrected_gradients(fg, present, prev_grads)
        # One 2-D view per matrix (batched parameters unbound) and the gradients of AdamW-routed parameters.
        views, owners = [], []
        for pos in present:
            c = corrected[pos]
            mats = [c] if c.ndim == 2 else c.reshape(-1, *c.shape[-2:]).unbind(0)
            views.extend(mats)
            owners.extend([pos] * len(mats))
        other_grads = [_local(fg.others[k][0].grad) for k in others]
        sparse = [k for k, g in zip(others, other_grads) if g.is_sparse]
        dense = views + [g for g in other_grads if not g.is_sparse]
        norms = torch._foreach_norm(dense, 2, dtype=torch.float64) if dense else []
        values = fg.reduce_buffer
        values.zero_()
        host = [0.0] * (2 * n_params)
        for pos in present:
            host[pos] = 1.0
        for k in others:
            host[n_mats + k] = 1.0
        for k in sparse:
            host[n_params + n_mats + k] = _SPARSE_FLAG
        host += self._digest_values(fg)
        values[fg.num_slots:].copy_(torch.tensor(host, dtype=torch.float64))
        if norms:
            stacked = torch.stack(norms)
            mat_norms = stacked[: len(views)]
            contributing = [pos for pos in present if fg.matrices[pos].contributes]
            if contributing:
                slots = torch.cat([fg.matrices[pos].slots for pos in contributing]) if len(contributing) < n_mats \
                    else fg.all_slots
                contrib = mat_norms if len(contributing) == len(present) else torch.cat(
                    [mat_norms[i: i + 1] for i, pos in enumerate(owners) if fg.matrices[pos].contributes])
                values.index_add_(0, slots, contrib.square())
            everyone = len(present) == n_mats and len(others) == len(fg.others) and not sparse
            flag_index = fg.flag_index if everyone else torch.tensor(
                owners + [n_mats + k for k in others if k not in sparse], dtype=torch.long,
                device=values.device) + fg.num_slots + n_params
            values.index_add_(0, flag_index, (~torch.isfinite(stacked)).double())
        self._all_reduce(values, fg)
        reduced = values.tolist()
        self._check_agreement(fg, reduced[-4:])
        has_grad = reduced[fg.num_slots: fg.num_slots + n_params]
        partial = [i for i, h in enumerate(has_grad) if 0 < h < len(fg.ranks)]
        if partial:
            raise RuntimeError(f"MARSM: parameter {_names(fg)[partial[0]]} has a gradient on {int(has_grad[partial[0]])} of "
                               f"{len(fg.ranks)} ranks; every rank must take part in every step (or none)")
        flags = reduced[fg.num_slots + n_params: fg.num_slots + 2 * n_params]
        sparse_everywhere = [_names(fg)[i] for i, f in enumerate(flags) if f >= _SPARSE_FLAG]
        if sparse_everywhere:
            raise ValueError(f"MARSM: parameter {sparse_everywhere[0]} has a sparse gradient on some rank; MARSM "
                             "needs dense gradients (use nn.Embedding(sparse=False))")
        bad = [i for i, f in enumerate(flags) if f > 0]
        sq_norms = reduced[: fg.num_slots]
        if bad or not all(math.isfinite(x) for x in sq_norms):
            return self._nonfinite(fg, bad, _names(fg))
        self._clip(fg, present, corrected, sq_norms)
        return corrected

    def _corrected_gradients(self, fg: _FlatGroup, present: list[int], prev_grads: dict) -> dict:
        """c = g + gamma * beta / (1 - beta) * (g - g_prev) per matrix, in one foreach chain per setting."""
        corrected = {}
        batches = defaultdict(list)
        for pos in present:
            m = fg.matrices[pos]
            group = self.param_groups[m.group_index]
            grad = _local(m.param.grad)
            if grad.shape != m.block_shape:
                grad = grad.reshape(m.block_shape)
            dtype = _state_dtype(m.param)
            if grad.dtype != dtype:
                grad = grad.to(dtype)
            if group["variant"] == "efficient" or group["gamma"] == 0:
                corrected[pos] = grad
                continue
            prev = prev_grads.get(m.param, self.state[m.param].get("prev_grad"))
            if prev is not None:
                prev = _local(prev)
                if prev.shape != m.block_shape:
                    prev = prev.reshape(m.block_shape)
                if prev.dtype != dtype:
                    prev = prev.to(dtype)
            batches[(group["gamma"], group["momentum"], prev is not None)].append((pos, grad, prev))
        for (gamma, beta, has_prev), items in batches.items():
            out = mars_math.mars_corrections([g for _, g, _ in items],
                                             [p for _, _, p in items] if has_prev else None, gamma, beta)
            for (pos, _, _), c in zip(items, out):
                corrected[pos] = c
        return corrected

    def _clip(self, fg: _FlatGroup, present: list[int], corrected: dict, sq_norms: list[float]) -> None:
        """Scale each corrected gradient (each matrix of a batch) to Frobenius norm <= 1, one foreach call."""
        tensors, scales = [], []
        for pos in present:
            m = fg.matrices[pos]
            group = self.param_groups[m.group_index]
            if not group["clip"] or group["variant"] == "efficient":
                continue
            c = corrected[pos]
            if c.data_ptr() == _local(m.param.grad).data_ptr():
                c = corrected[pos] = c.clone()   # never scale the gradient itself
            factors = [mars_math.unit_clip_factor(sq_norms[s]) for s in m.slot_list]
            mats = [c] if c.ndim == 2 else c.reshape(-1, *c.shape[-2:]).unbind(0)
            for mat, f in zip(mats, factors):
                if f != 1.0:
                    tensors.append(mat)
                    scales.append(f)
        if tensors:
            torch._foreach_mul_(tensors, scales)

    def _digest_values(self, fg: _FlatGroup) -> list[float]:
        """The settings digest and its squares, as the four values the all-reduce sums (zeros on one rank)."""
        if fg.group is None:
            return [0.0] * 4
        digest = [float(d) for d in settings.digest(self._agreed(fg))]
        return digest + [d * d for d in digest]

    def _reduce_then_raise(self, fg: _FlatGroup, error: ValueError) -> None:
        """This step's all-reduce with no gradients in it, the settings check, then ``error``."""
        values = fg.reduce_buffer
        values.zero_()
        values[-4:].copy_(torch.tensor(self._digest_values(fg), dtype=torch.float64))
        self._all_reduce(values, fg)
        reduced = values.tolist()
        self._check_agreement(fg, reduced[-4:])
        raise error

    def _check_agreement(self, fg: _FlatGroup, digest_sums: list[float]) -> None:
        if fg.group is None:
            return
        if not settings.digests_agree(digest_sums[:2], digest_sums[2:], len(fg.ranks)):
            self._check_ranks_agree(fg)   # names the difference on every rank
            raise RuntimeError("MARSM: the ranks' settings digests differ but their settings compare equal")

    def _all_reduce(self, values: torch.Tensor, fg: _FlatGroup) -> None:
        """The per-step small all-reduces (norms, flags, digest); their bytes are counted in last_step_stats."""
        if fg.group is not None:
            self._allreduce_bytes += values.numel() * values.element_size()
        all_reduce_sum(values, fg.group)

    def _nonfinite(self, fg: _FlatGroup, bad: list[int], names: list[str]):
        step = max((int(self.state[p]["step"]) for p in self._params_of(fg) if "step" in self.state[p]),
                   default=0) + 1
        params = self._params_of(fg)
        local_bad = [names[i] for i in bad if _has_nonfinite(params[i].grad)]
        everyone = all_gather_objects(local_bad, fg.group, len(fg.ranks))
        where = "; ".join(f"rank {fg.ranks[r]}: {', '.join(b[:3])}" for r, b in enumerate(everyone) if b)
        if self.options["nonfinite"] == "raise":
            raise NonFiniteGradientError(f"MARSM: non-finite gradient at step {step} ({where or names[bad[0]]})")
        return None

    @staticmethod
    def _params_of(fg: _FlatGroup) -> list[torch.Tensor]:
        return [m.param for m in fg.matrices] + [o[0] for o in fg.others]

    # -- update ---------------------------------------------------------------------
    def _update_matrices(self, fg: _FlatGroup, staged: dict) -> None:
        for pos in staged:
            m = fg.matrices[pos]
            if "step" not in self.state[m.param]:
                self._init_mars_state(m.param, self.param_groups[m.group_index])
        inputs = {}
        lerps, efficient = defaultdict(list), defaultdict(list)
        for pos, c in staged.items():
            m = fg.matrices[pos]
            group = self.param_groups[m.group_index]
            momentum = _local(self.state[m.param]["momentum"])
            if momentum.shape != c.shape:
                momentum = momentum.view(c.shape)
            if group["variant"] == "efficient":
                efficient[(group["momentum"], group["gamma"])].append((pos, momentum, c))
            else:
                lerps[group["momentum"]].append((momentum, c))
                inputs[pos] = momentum
        for beta, items in lerps.items():
            mars_math.momentum_updates([m for m, _ in items], [c for _, c in items], beta)
        for (beta, gamma), items in efficient.items():
            ns_in = mars_math.efficient_momentum_updates([m for _, m, _ in items], [c for _, _, c in items], beta, gamma)
            for (pos, _, _), x in zip(items, ns_in):
                inputs[pos] = x
        outputs = self._assemble(fg, fg.engine.run(self._unit_inputs(fg, inputs)), staged)
        self._neuron_normalize(fg, outputs)
        self._apply(fg, staged, outputs)

    @staticmethod
    def _unit_inputs(fg: _FlatGroup, inputs: dict) -> dict:
        """Each plan unit's block of this rank's NS inputs (a view where the unit is the whole local block)."""
        out = {}
        me = fg.my_rank
        for pos, x in inputs.items():
            for epos, u, empty in fg.matrices[pos].units:
                if empty is not None:
                    out[epos] = empty.to(x.dtype) if empty.dtype != x.dtype else empty
                elif u.lead_pos is None:
                    shape = [index_len(i) for i in u.layout.blocks[me]]
                    out[epos] = x if list(x.shape) == shape else x.reshape(shape)
                else:
                    out[epos] = x.reshape(-1, *x.shape[-2:])[u.lead_pos[:, None], u.row_pos]
        return out

    @staticmethod
    def _assemble(fg: _FlatGroup, unit_outputs: dict, staged: dict) -> dict:
        """This rank's block of every matrix's update, put together from its units' results."""
        outputs = {}
        for pos in staged:
            m = fg.matrices[pos]
            if len(m.units) == 1 and m.units[0][1].lead_pos is None:
                outputs[pos] = unit_outputs[m.units[0][0]]
                continue
            parts = [(u, unit_outputs[epos]) for epos, u, empty in m.units if empty is None]
            if len(parts) == 1 and parts[0][0].lead_pos is None:
                outputs[pos] = parts[0][1].reshape(m.block_shape)
                continue
            full = torch.empty(m.block_shape, dtype=parts[0][1].dtype if parts else fg.engine.wire_dtype,
                               device=fg.device)
            rows = full.view(-1, *m.block_shape[-2:])
            for u, result in parts:
                rows[u.lead_pos[:, None], u.row_pos] = result.to(full.dtype)
            outputs[pos] = full
        return outputs

    def _apply(self, fg: _FlatGroup, staged: dict, outputs: dict) -> None:
        """Keep what the next step reads, then W *= 1 - lr * wd; W -= lr * scale * update, grouped by value."""
        prev_dst, prev_src, param_dst, param_src, steps = [], [], [], [], []
        update = defaultdict(lambda: ([], []))
        for pos in staged:
            m = fg.matrices[pos]
            group = self.param_groups[m.group_index]
            state = self.state[m.param]
            local_p = _local(m.param)
            if group["variant"] == "approx" and group["gamma"] != 0:
                if "prev_grad" not in state:  # gamma raised from 0 mid-run: the correction starts now
                    state["prev_grad"] = torch.zeros_like(m.param, dtype=_state_dtype(m.param))
                prev_dst.append(_local(state["prev_grad"]))
                prev_src.append(_local(m.param.grad))
            if group["variant"] == "exact":
                if "prev_param" not in state:  # switched to exact mid-run
                    state["prev_param"] = m.param.detach().clone()
                param_dst.append(_local(state["prev_param"]))
                param_src.append(local_p)
            steps.append(state["step"])
            u = outputs[pos]
            if u.shape != local_p.shape:
                u = u.reshape(local_p.shape)
            key = (group["lr"], group["weight_decay"], m.lr_scale, u.dtype)
            update[key][0].append(local_p)
            update[key][1].append(u)
        _foreach_copy(prev_dst, prev_src)
        _foreach_copy(param_dst, param_src)
        for (lr, wd, scale, _), (params, updates) in update.items():
            mars_math.apply_updates(params, updates, lr, wd, scale)
        if steps:
            torch._foreach_add_(steps, 1.0)

    def _neuron_normalize(self, fg: _FlatGroup, outputs: dict) -> None:
        """NorMuon on the local rows after the scatter, then one all-reduce for the RMS-restoring rescale.

        Rows are output neurons; FSDP2 shards them (Shard(0)), so the row state lives with the rows and
        only two squared Frobenius norms per matrix travel. Convention (NorMuon, Li et al. 2025, and its
        modded-nanogpt code): O' = O / (sqrt(v) + eps), then O' *= ||O||_F / ||O'||_F.
        """
        positions = [pos for pos in outputs if self.param_groups[fg.matrices[pos].group_index]["normalize"] == "neuron"]
        if not positions:
            return
        sums = torch.zeros(2 * fg.num_slots, dtype=torch.float32, device=fg.device)
        normalized = {}
        for pos in positions:
            m = fg.matrices[pos]
            group = self.param_groups[m.group_index]
            o = outputs[pos].float()
            v = _local(self.state[m.param]["row_second_moment"]).view(*o.shape[:-1], 1)
            o_n = mars_math.neuron_normalize(o, v, group["normuon_beta2"], 1e-8)
            normalized[pos] = o_n
            if m.contributes:
                sums[: fg.num_slots].index_add_(0, m.slots, o.square().sum(dim=(-2, -1)).reshape(-1))
                sums[fg.num_slots:].index_add_(0, m.slots, o_n.square().sum(dim=(-2, -1)).reshape(-1))
        self._all_reduce(sums, fg)
        ratio = (sums[: fg.num_slots] / sums[fg.num_slots:].clamp_min(1e-20)).sqrt()
        for pos, o_n in normalized.items():
            outputs[pos] = o_n * ratio[fg.matrices[pos].slots].view(*o_n.shape[:-2], 1, 1)

    def _init_mars_state(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        dtype = _state_dtype(p)
        state["step"] = torch.tensor(0.0)
        state["momentum"] = torch.zeros_like(p, dtype=dtype)
        if group["variant"] == "approx" and group["gamma"] != 0:  # gamma = 0 (Muon) never reads it
            state["prev_grad"] = torch.zeros_like(p, dtype=dtype)
        if group["normalize"] == "neuron":
            state["row_second_moment"] = _row_state_like(p, dtype)
        if group["variant"] == "exact":
            state["prev_param"] = p.detach().clone()

    def _update_adamw(self, items: list, exact: bool) -> None:
        """torch's own functional AdamW (foreach), one call per distinct setting."""
        by_setting = defaultdict(list)
        rewind_dst, rewind_src = [], []
        for p, gi, _ in items:
            group = self.param_groups[gi]
            state = self.state[p]
            if exact:  # the exact variant rewinds the whole model, AdamW-routed parameters too
                if "prev_param" not in state:
                    state["prev_param"] = p.detach().clone()
                else:
                    rewind_dst.append(_local(state["prev_param"]))
                    rewind_src.append(_local(p))
            if "step" not in state:
                dtype = _state_dtype(p)
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, dtype=dtype)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)
            key = (group["lr"], group["adamw_betas"], group["adamw_eps"], group["weight_decay"])
            by_setting[key].append(p)
        _foreach_copy(rewind_dst, rewind_src)
        for (lr, (beta1, beta2), eps, wd), params in by_setting.items():
            locals_ = [_local(p) for p in params]
            master = [t.float() if t.dtype != _state_dtype(t) else t for t in locals_]
            grads = [_local(p.grad) for p in params]
            grads = [g if g.dtype == m.dtype else g.to(m.dtype) for g, m in zip(grads, master)]
            functional_adamw(
                master, grads, [_local(self.state[p]["exp_avg"]) for p in params],
                [_local(self.state[p]["exp_avg_sq"]) for p in params], [],
                [self.state[p]["step"] for p in params], foreach=True,
                amsgrad=False, beta1=beta1, beta2=beta2, lr=lr, weight_decay=wd, eps=eps, maximize=False)
            for t, m in zip(locals_, master):
                if t is not m:
                    t.copy_(m)

    # -- exact variant ---------------------------------------------------------------
    def _exact_gradients(self, closure, prev_grads: dict):
        """Gradients at x_{t-1} on the current batch (into ``prev_grads``), then at x_t; returns the loss.

        Every parameter that has a previous iterate is rewound (the AdamW-routed ones too), so the
        correction's gradient is taken at the whole model's x_{t-1}, not at a mix of old and new values.
        Gradients are cleared before each closure call, so a closure that does not zero them is correct too.
        """
        exact = [p for g in self.param_groups if g["use_mars"] and g["variant"] == "exact" for p in g["params"]
                 if "prev_param" in self.state[p]]
        rewound = [p for g in self.param_groups for p in g["params"] if "prev_param" in self.state[p]]
        if exact:
            current = [_local(p).clone() for p in rewound]
            for p in rewound:
                _local(p).copy_(_local(self.state[p]["prev_param"]))
            self.zero_grad(set_to_none=True)
            with torch.enable_grad():
                closure()
            for p in exact:
                prev_grads[p] = _local(p.grad).clone() if p.grad is not None else torch.zeros_like(_local(p))
            for p, saved in zip(rewound, current):
                _local(p).copy_(saved)
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            return closure()

    def plan_report(self) -> list[dict]:
        """Per flat group: who owns which matrix, Newton-Schulz FLOPs and bytes per rank (after one step)."""
        if self._flat_groups is None:
            raise RuntimeError("MARSM.plan_report: the plan is built at the first step")
        return [{"ranks": fg.ranks,
                 "owners": {e.name: fg.ranks[e.owner] for e in fg.plan.entries},
                 "per_rank": fg.plan.report()} for fg in self._flat_groups]


MARSM.__init__.__signature__ = inspect.Signature(
    [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
     inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    + [inspect.Parameter(s.name, inspect.Parameter.KEYWORD_ONLY, default=s.default) for s in settings.SETTINGS
       if s.argument])


# ---------------------------------------------------------------------- helpers
_GROUP_KEYS = tuple(s.name for s in GROUP_SETTINGS)


def _group_values(group: dict) -> tuple:
    return tuple(group.get(k) for k in _GROUP_KEYS)


def _names(fg: _FlatGroup) -> list[str]:
    return [m.name for m in fg.matrices] + [o[2] for o in fg.others]


def _param_name(group: dict, group_index: int, i: int) -> str:
    names = group.get("param_names")
    return names[i] if names else f"param_groups[{group_index}][{i}] (shape {tuple(group['params'][i].shape)})"


def _names_hint(group: dict) -> str:
    names = group.get("param_names")
    return f"[{names[0]!r}, ...]" if names else "(unnamed)"


def _check_parameter(p: torch.Tensor, group: dict, i: int, where: str) -> None:
    name = group["param_names"][i] if group.get("param_names") else f"params[{i}] (shape {tuple(p.shape)})"
    if p.is_complex():
        raise ValueError(f"{where}: parameter {name} is complex ({p.dtype}); MARSM supports real floating "
                         "tensors (split it into real and imaginary parameters)")
    if not p.is_floating_point():
        raise ValueError(f"{where}: parameter {name} has dtype {p.dtype}; MARSM needs floating-point parameters")
    if group["use_mars"] and p.ndim < 2:
        raise ValueError(f"{where}: parameter {name} has ndim {p.ndim}; MARS-M needs matrices "
                         "(put it in a group with use_mars=False, or use build_param_groups)")


def _check_gradient(grad: torch.Tensor, name: str) -> None:
    g = _local(grad)
    if g.is_sparse:
        raise ValueError(f"MARSM: parameter {name} has a sparse gradient; MARSM needs dense gradients")


def _foreach_copy(dst: list, src: list) -> None:
    if dst:
        torch._foreach_copy_(dst, src)


def _leading_indices(layout: Layout, rank: int, view: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Global positions of this rank's local matrices within the flattened leading (batch) dims."""
    lead = view[:-2]
    if not lead:
        return torch.zeros(1, dtype=torch.long, device=device)
    grid = torch.arange(math.prod(lead), device=device).view(lead)
    return take_block(grid, layout.blocks[rank][:-2]).reshape(-1)


def _row_state_like(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Zeros with one value per row ([..., rows, 1]), sharded like the parameter's rows."""
    if not _is_dtensor(p):
        return torch.zeros(*p.shape[:-1], 1, dtype=dtype, device=p.device)
    from torch.distributed.tensor import DTensor

    local = _local(p)
    shape = (*p.shape[:-1], 1)
    return DTensor.from_local(torch.zeros(*local.shape[:-1], 1, dtype=dtype, device=local.device),
                              p.device_mesh, p.placements, run_check=False, shape=shape,
                              stride=torch.empty(shape, device="meta").stride())


def _describe_difference(a: tuple, b: tuple) -> str:
    """What differs between two ranks' (name, shape, dtype) records of a parameter."""
    if a[0] != b[0]:
        return f"the parameter at this position is {b[0]} on the other rank (different parameter sets or order)"
    if a[1] != b[1]:
        return f"shape {a[1]} vs {b[1]}"
    return f"dtype {a[2]} vs {b[2]}"


def _describe_settings(a: tuple, b: tuple) -> str:
    """The first differing settings between two ranks' ``MARSM._agreed`` records."""
    (opt_a, groups_a), (opt_b, groups_b) = a, b
    diffs = [f"{k} {va!r} vs {vb!r}" for (k, va), (_, vb) in zip(opt_a, opt_b) if va != vb]
    for (gi, ga), (_, gb) in zip(groups_a, groups_b):
        diffs += [f"param group {gi} {k} {va!r} vs {vb!r}" for (k, va), (_, vb) in zip(ga, gb) if va != vb]
    return "; ".join(diffs) or f"{len(groups_a)} vs {len(groups_b)} param groups"


def _has_nonfinite(grad) -> bool:
    return grad is not None and not bool(torch.isfinite(_local(grad)).all())
