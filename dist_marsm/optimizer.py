"""The MARSM optimizer (layer 3): param groups, state, the AdamW route, and a ``step`` that runs
the element-wise MARS-M math on local shards, reduces the clipping norms once per step, and hands
the momentum to the owner plan for Newton-Schulz.

Per matrix parameter W (A x B), approximate variant (the MARS-M reference's default):
    c = g + gamma * beta / (1 - beta) * (g - g_prev);  c /= max(1, ||c||_F)
    m = beta * m + (1 - beta) * c
    W *= 1 - lr * wd;  W -= lr * 0.2 * sqrt(max(A, B)) * NewtonSchulz5(m);  g_prev = g
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from dist_marsm import mars_math
from dist_marsm.collectives import OwnerCompute, all_gather_objects, all_reduce_sum, flat_group
from dist_marsm.newton_schulz import resolve_dtype
from dist_marsm.owner_plan import (
    OWNER_POLICIES,
    GroupPlan,
    Layout,
    MatrixEntry,
    build_group_plan,
    dtensor_layout,
    index_len,
    replicated_layout,
    take_block,
)

VARIANTS = ("approx", "exact", "efficient")
MATRIX_VIEWS = ("batch", "flatten")
NORMALIZE = (None, "neuron")
NONFINITE_POLICIES = ("raise", "skip")

# Group keys that must agree on every rank (checked at the first step).
_CHECKED_KEYS = ("use_mars", "momentum", "gamma", "weight_decay", "variant", "clip", "ns_steps", "ns_dtype",
                 "lr_adjust", "matrix_view", "adamw_betas", "adamw_eps", "normalize", "normuon_beta2")


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
class _FlatGroup:
    """Parameters that share one set of ranks: one norm all-reduce and one owner plan per step."""

    ranks: tuple[int, ...]
    my_rank: int
    group: object
    matrices: list = field(default_factory=list)   # (param, group dict, name, view shape, layout)
    others: list = field(default_factory=list)     # (param, group dict, name): AdamW-routed
    plan: GroupPlan | None = None
    engine: OwnerCompute | None = None
    device: torch.device = torch.device("cpu")   # where the parameters' local shards live


class MARSM(torch.optim.Optimizer):
    """MARS-M (variance-reduced Muon) for matrices, AdamW for everything else, on one process or many.

    Args:
        params: parameters or param groups. A group's ``use_mars`` flag routes it (False -> AdamW);
            a group without the flag is split in two by ndim (matrices -> MARS-M). Use
            :func:`dist_marsm.build_param_groups` to also send embeddings and the output head to AdamW.
        lr: learning rate (both routes; a group may override it). Default 3e-3.
        momentum: beta in [0, 1). Default 0.95.
        gamma: MARS correction scale (0 gives Moonlight-style Muon). Default 0.025.
        weight_decay: decoupled, multiplied by the unscaled lr. Default 0.1.
        variant: "approx" (default), "exact" (needs ``step(closure)``), or "efficient" (one buffer, no clipping).
        clip: clip the corrected gradient to unit Frobenius norm (approx/exact). Default True.
        ns_steps, ns_dtype: Newton-Schulz iterations (5) and compute dtype ("bfloat16" or "float32").
        lr_adjust: "moonlight" 0.2*sqrt(max(A,B)) (default), "original" sqrt(max(1,A/B)), or "none".
        matrix_view: parameters with ndim > 2 as a "batch" of matrices over leading dims (MoE experts,
            default) or "flatten"ed to [dim0, rest] (convolution kernels).
        adamw_betas, adamw_eps: for the AdamW route. Defaults (0.9, 0.95), 1e-8.
        normalize: None or "neuron" (NorMuon row-wise second-moment normalization).
        wire_dtype: dtype of momentum and results on the wire between ranks ("bfloat16" or "float32").
        bucket_mb: full-matrix bytes per communication bucket (bounds transient memory).
        owner_policy: "largest_first" (LPT, default) or "round_robin".
        nonfinite: "raise" (default) or "skip" the whole step on every rank when any gradient is inf/NaN.
        process_group: ranks over which plain (non-DTensor) parameters are replicated, as under DDP:
            "world" (default; all ranks when torch.distributed is initialized), a ProcessGroup,
            or None (each rank optimizes on its own).
    """

    def __init__(
        self,
        params,
        lr: float = 3e-3,
        momentum: float = 0.95,
        gamma: float = 0.025,
        weight_decay: float = 0.1,
        variant: str = "approx",
        clip: bool = True,
        ns_steps: int = 5,
        ns_dtype: str = "bfloat16",
        lr_adjust: str = "moonlight",
        matrix_view: str = "batch",
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        normalize: str | None = None,
        normuon_beta2: float = 0.95,
        *,
        wire_dtype: str = "bfloat16",
        bucket_mb: float = 64.0,
        owner_policy: str = "largest_first",
        nonfinite: str = "raise",
        process_group="world",
    ):
        if isinstance(ns_dtype, torch.dtype):
            ns_dtype = str(ns_dtype).removeprefix("torch.")
        if isinstance(wire_dtype, torch.dtype):
            wire_dtype = str(wire_dtype).removeprefix("torch.")
        defaults = dict(lr=lr, momentum=momentum, gamma=gamma, weight_decay=weight_decay, variant=variant,
                        clip=clip, ns_steps=ns_steps, ns_dtype=ns_dtype, lr_adjust=lr_adjust,
                        matrix_view=matrix_view, adamw_betas=tuple(adamw_betas), adamw_eps=adamw_eps,
                        normalize=normalize, normuon_beta2=normuon_beta2)
        _validate_hyperparameters(defaults, where="MARSM")
        try:
            self.wire_dtype = resolve_dtype(wire_dtype)
        except ValueError as e:
            raise ValueError(f"MARSM: wire_dtype: {e}") from None
        if not bucket_mb > 0:
            raise ValueError(f"MARSM: bucket_mb must be > 0, got {bucket_mb}")
        if owner_policy not in OWNER_POLICIES:
            raise ValueError(f"MARSM: owner_policy must be one of {OWNER_POLICIES}, got {owner_policy!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"MARSM: nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.owner_policy = owner_policy
        self.nonfinite = nonfinite
        self.process_group = process_group
        self.nonfinite_skips = 0
        self.last_step_stats: dict = {}
        self._allreduce_bytes = 0
        self._exact_in_use = False
        self._flat_groups: list[_FlatGroup] | None = None
        self._plan_key = None
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict) -> None:
        if "use_mars" not in param_group and not isinstance(param_group.get("params"), torch.Tensor):
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
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f"param group {len(self.param_groups) - 1}"
        if isinstance(group.get("ns_dtype"), torch.dtype):
            group["ns_dtype"] = str(group["ns_dtype"]).removeprefix("torch.")
        group["adamw_betas"] = tuple(group["adamw_betas"])
        _validate_hyperparameters(group, where=where)
        if group["use_mars"]:
            for i, p in enumerate(group["params"]):
                if p.ndim < 2:
                    name = _param_name(group, i)
                    raise ValueError(f"{where}: parameter {name} has ndim {p.ndim}; MARS-M needs matrices "
                                     "(put it in a group with use_mars=False, or use build_param_groups)")
        self._plan_key = None

    # ------------------------------------------------------------------ state dict
    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but keeps float32 master state for low-precision parameters.

        torch.optim casts floating state to the parameter's dtype on load; for bf16 parameters that
        would round the momentum to bf16 and break bit-identical resume.
        """
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        originals = {p: state_dict["state"].get(i, {}) for i, p in zip(saved_ids, params)}
        super().load_state_dict(state_dict)
        for p, saved in originals.items():
            for key, value in saved.items():
                if key != "step" and torch.is_tensor(value) and value.dtype == torch.float32 != p.dtype:
                    self.state[p][key] = value.to(device=p.device)
        self._plan_key = None

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step.

        ``variant="exact"`` needs ``closure``: a function that clears the gradients, computes the loss
        on the *current* batch, calls backward and returns the loss. The optimizer calls it twice:
        at the previous iterate x_{t-1} (to get g(x_{t-1}; batch_t) for the correction) and at x_t.
        """
        start = time.perf_counter()
        exact = self._exact_in_use = any(g["use_mars"] and g["variant"] == "exact" for g in self.param_groups)
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
            self._update_adamw([item for item in fg.others if item[0].grad is not None])
        stats.update(nonfinite_skips=self.nonfinite_skips, allreduce_bytes=self._allreduce_bytes,
                     step_time_s=time.perf_counter() - start)
        self.last_step_stats = stats
        return loss

    # -- plan ------------------------------------------------------------------
    def _ensure_plan(self) -> list[_FlatGroup]:
        key = tuple(id(p) for g in self.param_groups for p in g["params"])
        if self._plan_key == key and self._flat_groups is not None:
            return self._flat_groups
        by_ranks: dict[tuple, _FlatGroup] = {}
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                name = _param_name(group, i)
                ranks, my_rank, pg, layout, view = self._placement(p, group)
                fg = by_ranks.get(ranks)
                if fg is None:
                    fg = by_ranks[ranks] = _FlatGroup(ranks, my_rank, pg, device=_local(p).device)
                if group["use_mars"]:
                    fg.matrices.append((p, group, name, view, layout))
                else:
                    fg.others.append((p, group, name))
        flat_groups = [by_ranks[k] for k in sorted(by_ranks)]
        for fg in flat_groups:
            self._check_ranks_agree(fg)
            for p, g, name, view, layout in fg.matrices:
                if g["normalize"] == "neuron" and any(index_len(b[-1]) != view[-1] for b in layout.blocks):
                    raise ValueError(f"MARSM: normalize='neuron' needs whole rows on each rank; {name} is split "
                                     f"along its columns ({layout.placements}), as a rowwise tensor-parallel "
                                     "weight is. Put it in a group with normalize=None.")
            entries = [MatrixEntry(i, name, view, layout, g["ns_steps"], g["ns_dtype"])
                       for i, (p, g, name, view, layout) in enumerate(fg.matrices)]
            fg.plan = build_group_plan(entries, fg.ranks, fg.my_rank, self.owner_policy, self.bucket_bytes,
                                       torch.tensor([], dtype=self.wire_dtype).element_size(), fg.group)
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
        pg = self.process_group
        if pg == "world":
            pg = dist.group.WORLD if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None
        if pg is None:
            ranks, my_rank = (0,), 0
        else:
            ranks = tuple(dist.get_process_group_ranks(pg))
            my_rank = dist.get_rank(pg)
        return ranks, my_rank, pg, replicated_layout(view, ranks) if group["use_mars"] else None, view

    def _check_ranks_agree(self, fg: _FlatGroup) -> None:
        """All ranks of a flat group must hold the same parameters, shapes and hyperparameters.

        Checked once, when the plan is built, with one all_gather_object: a mismatch raises the same
        error on every rank (naming the first differing parameter) instead of hanging a collective.
        """
        mine = [(name, tuple(p.shape), str(p.dtype), tuple((k, g[k]) for k in _CHECKED_KEYS))
                for p, g, name, *_ in fg.matrices] + \
               [(name, tuple(p.shape), str(p.dtype), tuple((k, g[k]) for k in _CHECKED_KEYS))
                for p, g, name in fg.others]
        everyone = all_gather_objects(mine, fg.group, len(fg.ranks))
        reference = everyone[0]
        for rank, theirs in enumerate(everyone):
            if theirs == reference:
                continue
            if len(theirs) != len(reference):
                names = {t[0] for t in theirs} ^ {t[0] for t in reference}
                raise RuntimeError(f"MARSM: rank {fg.ranks[rank]} has {len(theirs)} parameters, rank {fg.ranks[0]} has "
                                   f"{len(reference)}; differing: {sorted(map(str, names))[:5]}")
            for a, b in zip(reference, theirs):
                if a != b:
                    raise RuntimeError(f"MARSM: parameter {a[0]} differs between rank {fg.ranks[0]} and rank "
                                       f"{fg.ranks[rank]}: {_describe_difference(a, b)}")

    # -- stage: element-wise math + the one norm all-reduce ------------------------
    def _stage(self, fg: _FlatGroup, prev_grads: dict):
        """Compute every matrix's NS input candidate and reduce norms/flags once for the flat group.

        Returns per-matrix (corrected gradient, clip scales) or None when the step is skipped.
        Nothing in the optimizer's state or the parameters is modified here.
        """
        plan = fg.plan
        n_mats = [e.num_matrices for e in plan.entries]
        offsets = [0]
        for n in n_mats:
            offsets.append(offsets[-1] + n)
        n_params = len(fg.matrices) + len(fg.others)
        # [per-matrix squared norms | has-grad per param | non-finite per param]
        values = torch.zeros(offsets[-1] + 2 * n_params, dtype=torch.float32, device=fg.device)
        flags = offsets[-1]
        corrected = {}
        for pos, (p, group, name, view, layout) in enumerate(fg.matrices):
            if p.grad is None:
                continue
            values[flags + pos] = 1.0
            grad = _local(p.grad).reshape(_block_shape(layout, fg.my_rank))
            state = self.state[p]
            if group["variant"] == "efficient":
                c = grad
            else:
                prev = prev_grads.get(p, state.get("prev_grad"))
                prev = _local(prev).reshape(grad.shape) if prev is not None else torch.zeros_like(grad)
                c = mars_math.mars_correction(grad.to(_state_dtype(p)), prev.to(_state_dtype(p)),
                                              group["gamma"], group["momentum"])
            sq = c.float().square().sum(dim=(-2, -1)).reshape(-1)
            if not torch.isfinite(sq).all():
                values[flags + n_params + pos] = 1.0
            if layout.replica_keys[fg.my_rank] == layout.replica_keys[0]:
                idx = _leading_indices(layout, fg.my_rank, view, fg.device)
                values[offsets[pos]: offsets[pos + 1]].index_add_(0, idx, sq)
            corrected[pos] = c
        others_with_grad = [(k, p) for k, (p, _, _) in enumerate(fg.others) if p.grad is not None]
        if others_with_grad:
            norms = torch._foreach_norm([_local(p.grad) for _, p in others_with_grad])
            for (k, _), norm in zip(others_with_grad, norms):
                pos = len(fg.matrices) + k
                values[flags + pos] = 1.0
                if not torch.isfinite(norm):
                    values[flags + n_params + pos] = 1.0
        self._all_reduce(values, fg)
        names = [m[2] for m in fg.matrices] + [o[2] for o in fg.others]
        has_grad = values[flags: flags + n_params]
        partial = ((has_grad > 0) & (has_grad < len(fg.ranks))).nonzero().flatten().tolist()
        if partial:
            raise RuntimeError(f"MARSM: parameter {names[partial[0]]} has a gradient on {int(has_grad[partial[0]])} of "
                               f"{len(fg.ranks)} ranks; every rank must take part in every step (or none)")
        bad = (values[flags + n_params:] > 0).nonzero().flatten().tolist()
        if bad or not torch.isfinite(values[:flags]).all():
            return self._nonfinite(fg, bad, names)
        sq_norms = values[:flags]
        staged = {}
        for pos, c in corrected.items():
            group, layout, view = fg.matrices[pos][1], fg.matrices[pos][4], fg.matrices[pos][3]
            if group["clip"] and group["variant"] != "efficient":
                scale = mars_math.unit_clip_scale(sq_norms[offsets[pos]: offsets[pos + 1]])
                local_scale = scale[_leading_indices(layout, fg.my_rank, view, fg.device)]
                c = c * local_scale.view(*c.shape[:-2], 1, 1).to(c.dtype)
            staged[pos] = c
        return staged

    def _all_reduce(self, values: torch.Tensor, fg: _FlatGroup) -> None:
        """The per-step small all-reduces (norms, flags); their bytes are counted in last_step_stats."""
        if fg.group is not None:
            self._allreduce_bytes += values.numel() * values.element_size()
        all_reduce_sum(values, fg.group)

    def _nonfinite(self, fg: _FlatGroup, bad: list[int], names: list[str]):
        step = max((int(self.state[p]["step"]) for p, *_ in fg.matrices + fg.others if "step" in self.state[p]),
                   default=0) + 1
        local_bad = [names[i] for i in bad if _has_nonfinite(self._param_at(fg, i).grad)]
        everyone = all_gather_objects(local_bad, fg.group, len(fg.ranks))
        where = "; ".join(f"rank {fg.ranks[r]}: {', '.join(b[:3])}" for r, b in enumerate(everyone) if b)
        if self.nonfinite == "raise":
            raise NonFiniteGradientError(f"MARSM: non-finite gradient at step {step} ({where})")
        return None

    @staticmethod
    def _param_at(fg: _FlatGroup, i: int) -> torch.Tensor:
        return fg.matrices[i][0] if i < len(fg.matrices) else fg.others[i - len(fg.matrices)][0]

    # -- update ---------------------------------------------------------------------
    def _update_matrices(self, fg: _FlatGroup, staged: dict) -> None:
        inputs = {}
        for pos, c in staged.items():
            p, group, _, view, layout = fg.matrices[pos]
            state = self.state[p]
            if "step" not in state:
                self._init_mars_state(p, group)
            momentum = _local(state["momentum"]).view(c.shape)
            beta = group["momentum"]
            if group["variant"] == "efficient":
                mars_math.efficient_momentum_update(momentum, c, beta, group["gamma"])
                inputs[pos] = mars_math.efficient_ns_input(momentum, c, beta, group["gamma"])
            else:
                mars_math.momentum_update(momentum, c, beta)
                inputs[pos] = momentum
        outputs = fg.engine.run(inputs)
        self._neuron_normalize(fg, outputs)
        for pos in staged:
            p, group, _, view, layout = fg.matrices[pos]
            state = self.state[p]
            local_p = _local(p)
            if group["variant"] == "approx" and group["gamma"] != 0:
                if "prev_grad" not in state:  # gamma raised from 0 mid-run: the correction starts now
                    state["prev_grad"] = torch.zeros_like(p, dtype=_state_dtype(p))
                _local(state["prev_grad"]).copy_(_local(p.grad))
            if group["variant"] == "exact":
                _local(state["prev_param"]).copy_(local_p)
            update = outputs[pos].reshape(local_p.shape)
            scale = mars_math.lr_scale(view, group["lr_adjust"])
            mars_math.apply_update(local_p, update, group["lr"], group["weight_decay"], scale)
            state["step"] += 1

    def _neuron_normalize(self, fg: _FlatGroup, outputs: dict) -> None:
        """NorMuon on the local rows after the scatter, then one all-reduce for the RMS-restoring rescale.

        Rows are output neurons; FSDP2 shards them (Shard(0)), so the row state lives with the rows and
        only two squared Frobenius norms per matrix travel. Convention (NorMuon, Li et al. 2025, and its
        modded-nanogpt code): O' = O / (sqrt(v) + eps), then O' *= ||O||_F / ||O'||_F.
        """
        positions = [pos for pos in outputs if fg.matrices[pos][1]["normalize"] == "neuron"]
        if not positions:
            return
        offsets, total = {}, 0
        for pos in positions:
            offsets[pos] = total
            total += fg.plan.entries[pos].num_matrices
        sums = torch.zeros(2 * total, dtype=torch.float32, device=fg.device)
        normalized = {}
        for pos in positions:
            p, group, name, view, layout = fg.matrices[pos]
            o = outputs[pos].float()
            v = _local(self.state[p]["row_second_moment"]).view(*o.shape[:-1], 1)
            o_n = mars_math.neuron_normalize(o, v, group["normuon_beta2"], 1e-8)
            normalized[pos] = o_n
            if layout.replica_keys[fg.my_rank] == layout.replica_keys[0]:
                idx = _leading_indices(layout, fg.my_rank, view, fg.device) + offsets[pos]
                sums[:total].index_add_(0, idx, o.square().sum(dim=(-2, -1)).reshape(-1))
                sums[total:].index_add_(0, idx, o_n.square().sum(dim=(-2, -1)).reshape(-1))
        self._all_reduce(sums, fg)
        ratio = (sums[:total] / sums[total:].clamp_min(1e-20)).sqrt()
        for pos, o_n in normalized.items():
            p, group, name, view, layout = fg.matrices[pos]
            local_ratio = ratio[_leading_indices(layout, fg.my_rank, view, fg.device) + offsets[pos]]
            outputs[pos] = o_n * local_ratio.view(*o_n.shape[:-2], 1, 1)

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

    def _update_adamw(self, items: list) -> None:
        by_setting = defaultdict(list)
        for p, group, _ in items:
            state = self.state[p]
            if self._exact_in_use:  # the exact variant rewinds the whole model, AdamW-routed parameters too
                if "prev_param" not in state:
                    state["prev_param"] = p.detach().clone()
                else:
                    _local(state["prev_param"]).copy_(_local(p))
            if "step" not in state:
                dtype = _state_dtype(p)
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, dtype=dtype)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)
            state["step"] += 1
            key = (int(state["step"]), group["lr"], group["adamw_betas"], group["adamw_eps"], group["weight_decay"])
            by_setting[key].append(p)
        for (step, lr, betas, eps, wd), params in by_setting.items():
            locals_ = [_local(p) for p in params]
            master = [t.float() if t.dtype != _state_dtype(t) else t for t in locals_]
            mars_math.adamw_update(master, [_local(p.grad).to(m.dtype) for p, m in zip(params, master)],
                                   [_local(self.state[p]["exp_avg"]) for p in params],
                                   [_local(self.state[p]["exp_avg_sq"]) for p in params],
                                   step, lr, betas, eps, wd)
            for t, m in zip(locals_, master):
                if t is not m:
                    t.copy_(m)

    # -- exact variant ---------------------------------------------------------------
    def _exact_gradients(self, closure, prev_grads: dict):
        """Gradients at x_{t-1} on the current batch (into ``prev_grads``), then at x_t; returns the loss.

        Every parameter that has a previous iterate is rewound (the AdamW-routed ones too), so the
        correction's gradient is taken at the whole model's x_{t-1}, not at a mix of old and new values.
        """
        exact = [p for g in self.param_groups if g["use_mars"] and g["variant"] == "exact" for p in g["params"]
                 if "prev_param" in self.state[p]]
        rewound = [p for g in self.param_groups for p in g["params"] if "prev_param" in self.state[p]]
        if exact:
            current = [_local(p).clone() for p in rewound]
            for p in rewound:
                _local(p).copy_(_local(self.state[p]["prev_param"]))
            with torch.enable_grad():
                closure()
            for p in exact:
                prev_grads[p] = _local(p.grad).clone() if p.grad is not None else torch.zeros_like(_local(p))
            for p, saved in zip(rewound, current):
                _local(p).copy_(saved)
        with torch.enable_grad():
            return closure()

    def plan_report(self) -> list[dict]:
        """Per flat group: who owns which matrix, Newton-Schulz FLOPs and bytes per rank (after one step)."""
        if self._flat_groups is None:
            raise RuntimeError("MARSM.plan_report: the plan is built at the first step")
        return [{"ranks": fg.ranks,
                 "owners": {e.name: fg.ranks[e.owner] for e in fg.plan.entries},
                 "per_rank": fg.plan.report()} for fg in self._flat_groups]


# ---------------------------------------------------------------------- helpers
def _param_name(group: dict, i: int) -> str:
    names = group.get("param_names")
    return names[i] if names else f"param_groups[?][{i}] shape {tuple(group['params'][i].shape)}"


def _block_shape(layout: Layout, rank: int) -> list[int]:
    return [index_len(i) for i in layout.blocks[rank]]


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
    """What differs between two ranks' (name, shape, dtype, hyperparameters) records of a parameter."""
    if a[0] != b[0]:
        return f"the parameter at this position is {b[0]} on the other rank (different parameter sets or order)"
    if a[1] != b[1]:
        return f"shape {a[1]} vs {b[1]}"
    if a[2] != b[2]:
        return f"dtype {a[2]} vs {b[2]}"
    return ", ".join(f"{k} {va!r} vs {vb!r}" for (k, va), (_, vb) in zip(a[3], b[3]) if va != vb)


def _has_nonfinite(grad) -> bool:
    return grad is not None and not bool(torch.isfinite(_local(grad)).all())


def _validate_hyperparameters(h: dict, where: str) -> None:
    def bad(key, why):
        raise ValueError(f"{where}: {key} {why}, got {h[key]!r}")

    if not (isinstance(h["lr"], (int, float, torch.Tensor)) and float(h["lr"]) >= 0):
        bad("lr", "must be a number >= 0")
    if not 0.0 <= h["momentum"] < 1.0:
        bad("momentum", "must be in [0, 1)")
    if not 0.0 <= h["gamma"] <= 1.0:
        bad("gamma", "must be in [0, 1]")
    if not h["weight_decay"] >= 0:
        bad("weight_decay", "must be >= 0")
    if h["variant"] not in VARIANTS:
        bad("variant", f"must be one of {VARIANTS}")
    if h["variant"] == "efficient" and h["momentum"] == 0:
        bad("momentum", "must be > 0 for variant='efficient' (its buffer is scaled by 1/momentum)")
    if not isinstance(h["clip"], bool):
        bad("clip", "must be True or False")
    if not (isinstance(h["ns_steps"], int) and 0 < h["ns_steps"] < 100):
        bad("ns_steps", "must be an int in [1, 99]")
    if h["ns_dtype"] not in ("bfloat16", "float32"):
        bad("ns_dtype", "must be 'bfloat16' or 'float32'")
    if h["lr_adjust"] not in mars_math.LR_ADJUST_MODES:
        bad("lr_adjust", f"must be one of {mars_math.LR_ADJUST_MODES}")
    if h["matrix_view"] not in MATRIX_VIEWS:
        bad("matrix_view", f"must be one of {MATRIX_VIEWS}")
    betas = h["adamw_betas"]
    if not (len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
        bad("adamw_betas", "must be two numbers in [0, 1)")
    if not h["adamw_eps"] >= 0:
        bad("adamw_eps", "must be >= 0")
    if h["normalize"] not in NORMALIZE:
        bad("normalize", f"must be one of {NORMALIZE}")
    if not 0.0 <= h["normuon_beta2"] < 1.0:
        bad("normuon_beta2", "must be in [0, 1)")
    if "use_mars" in h and not isinstance(h["use_mars"], bool):
        bad("use_mars", "must be True or False")
