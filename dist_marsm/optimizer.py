"""The MARSM optimizer (layer 3): arguments, param groups, state, resume, and a ``step`` that runs the
functional step (:mod:`dist_marsm.functional`) over the step plan (:mod:`dist_marsm.step_plan`) under the
guard (:mod:`dist_marsm.guard`).

Per matrix parameter W (A x B), approximate variant (the MARS-M reference's default):
    c = g + gamma * beta / (1 - beta) * (g - g_prev);  c /= max(1, ||c||_F)
    m = beta * m + (1 - beta) * c
    W *= 1 - lr * wd;  W -= lr * 0.2 * sqrt(max(A, B)) * NewtonSchulz5(m);  g_prev = g

Every setting is declared once, in :mod:`dist_marsm.settings`; ``__init__`` lists them as arguments
(a test keeps the two equal).
"""

from __future__ import annotations

import time

import torch

from dist_marsm import functional, gradients, guard, settings
from dist_marsm.guard import Header, NonFiniteGradientError
from dist_marsm.newton_schulz import resolve_dtype
from dist_marsm.step_plan import FlatGroup, StepPlan, build_step_plan, plan_key, plan_report

__all__ = ["MARSM", "NonFiniteGradientError"]

_GROUP_KEYS = tuple(s.name for s in settings.GROUP_SETTINGS)


class MARSM(torch.optim.Optimizer):
    """MARS-M (variance-reduced Muon) for matrices, AdamW for everything else, on one process or many.

    ``params``: parameters or param groups. A group's ``use_mars`` flag routes it (False -> AdamW); a group
    without the flag is split in two by ndim (matrices -> MARS-M). :func:`dist_marsm.build_param_groups`
    also sends embeddings and the output head to AdamW. The keyword arguments are the settings of
    :data:`dist_marsm.settings.SETTINGS` (defaults, allowed values and meaning there and in the README).
    Group settings may be overridden per param group; optimizer settings (wire_dtype, bucket_mb,
    owner_policy, nonfinite, process_group) are one per optimizer and live in ``opt.options``.

    Settings are checked here, in ``add_param_group`` and ``load_state_dict``, and again at the first step
    after any change; at every step all ranks of a flat group must hold the same settings and parameters,
    or every rank raises naming the difference. ``record_phases = True`` adds per-phase times of the last
    step to ``last_step_stats["phase_s"]``.
    """

    def __init__(
        self,
        params,
        *,
        lr=3e-3,
        momentum=0.95,
        gamma=0.025,
        weight_decay=0.1,
        variant="approx",
        clip=True,
        ns_steps=5,
        ns_dtype="bfloat16",
        ns_method="standard",
        ns_coefficients="muon",
        ns_head_dim=None,
        lr_adjust="moonlight",
        matrix_view="batch",
        adamw_betas=(0.9, 0.95),
        adamw_eps=1e-8,
        normalize=None,
        normuon_beta2=0.95,
        wire_dtype="bfloat16",
        bucket_mb=64.0,
        owner_policy="largest_first",
        nonfinite="raise",
        process_group="world",
    ):
        arguments = dict(locals())
        defaults = settings.canonicalize({s.name: arguments[s.name] for s in settings.GROUP_SETTINGS if s.argument})
        settings.validate(defaults, "MARSM", names=defaults)
        self.options = settings.canonicalize({s.name: arguments[s.name] for s in settings.OPTIMIZER_SETTINGS})
        settings.validate(self.options, "MARSM", scope="optimizer")
        self.nonfinite_skips = 0
        self.last_step_stats: dict = {}
        self.record_phases = False
        self.step_plan: StepPlan | None = None
        self._replan = False
        self._settings_version = 0  # advanced on every change of settings, so digests are recomputed only then
        self._checked: list[tuple] = []
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
            for group in _split_by_ndim(param_group):
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
        self._settings_version += 1

    # ------------------------------------------------------------------ state dict
    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's (the saved group values are restored), after checking that the state dict is a MARSM
        one for these groups, keeping float32 master state for low-precision parameters. This is the one
        resume policy: group settings a checkpoint predates keep their live values."""
        saved_groups = state_dict.get("param_groups")
        if not isinstance(saved_groups, list) or len(saved_groups) != len(self.param_groups):
            count = len(saved_groups) if isinstance(saved_groups, list) else "no"
            raise ValueError(
                f"MARSM.load_state_dict: the state dict has {count} param groups, "
                f"this optimizer has {len(self.param_groups)}"
            )
        groups = [
            _resumed_group(i, saved, live) for i, (saved, live) in enumerate(zip(saved_groups, self.param_groups))
        ]
        saved_ids = [i for g in saved_groups for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        originals = {p: state_dict["state"].get(i, {}) for i, p in zip(saved_ids, params)}
        super().load_state_dict({**state_dict, "param_groups": groups})
        for p, saved in originals.items():
            for key, value in saved.items():
                if key != "step" and torch.is_tensor(value) and value.dtype == torch.float32 != p.dtype:
                    self.state[p][key] = value.to(device=p.device)
        self._checked = [_group_values(g) for g in self.param_groups]
        self._replan = True
        self._settings_version += 1

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step.

        ``variant="exact"`` needs ``closure``: a function that computes the loss on the *current* batch,
        calls backward and returns the loss. The optimizer clears the gradients before each call and calls
        it twice: at the previous iterate x_{t-1} (for g(x_{t-1}; batch_t)) and at x_t.
        """
        start = time.perf_counter()
        try:
            self._check_settings()
        except ValueError as error:
            self._fail_together(error)
        prev_grads: dict = {}
        loss = gradients.closure_gradients(self, closure, prev_grads)
        plan_start = time.perf_counter()
        plan = self._current_plan()
        plan_s = time.perf_counter() - plan_start
        timer = functional.PhaseTimer(self.record_phases, plan.flat_groups[0].device if plan.flat_groups else None)
        stats = {"ns_matrices": 0, "bytes_sent": 0, "allreduce_bytes": 0, "skipped": False, "plan_s": plan_s}
        staged = [self._stage(fg, prev_grads, stats, timer) for fg in plan.flat_groups]
        if any(s is None for s in staged):
            self.nonfinite_skips += 1
            stats["skipped"] = True
        else:
            exact = any(g["use_mars"] and g["variant"] == "exact" for g in self.param_groups)
            for fg, s in zip(plan.flat_groups, staged):
                self._update(fg, s, exact, stats, timer)
        stats.update(nonfinite_skips=self.nonfinite_skips, step_time_s=time.perf_counter() - start)
        if self.record_phases:
            stats["phase_s"] = timer.phases
        self.last_step_stats = stats
        return loss

    def _stage(self, fg: FlatGroup, prev_grads: dict, stats: dict, timer) -> functional.Staged | None:
        """Corrected gradients and the step's one all-reduce under the guard; None when the step is skipped."""
        staged = functional.stage_gradients(fg, self.param_groups, self.state, prev_grads, self._header_values(fg))
        timer.mark("stage")
        stats["allreduce_bytes"] += guard.all_reduce(fg.reduce_buffer, fg)
        reduced = guard.Reduced.read(fg.reduce_layout, fg.reduce_buffer)
        timer.mark("all_reduce")
        guard.check_agreement(fg, reduced, self._record(fg))
        bad = guard.check_gradients(fg, reduced)
        if bad or not guard.all_finite(reduced.sq_norms):
            if self.options["nonfinite"] == "raise":
                raise guard.nonfinite_error(fg, bad, self._step_count(fg) + 1)
            return None
        functional.clip_gradients(fg, staged, self.param_groups, reduced.sq_norms)
        timer.mark("clip")
        return staged

    def _update(self, fg: FlatGroup, staged: functional.Staged, exact: bool, stats: dict, timer) -> None:
        groups, state = self.param_groups, self.state
        inputs = functional.update_momentum(fg, staged, groups)
        timer.mark("momentum")
        outputs = functional.orthogonalize(fg, inputs)
        timer.mark("orthogonalize")

        def all_reduce(values):
            stats["allreduce_bytes"] += guard.all_reduce(values, fg)

        functional.neuron_normalize(fg, staged, outputs, groups, all_reduce)
        functional.apply_updates(fg, staged, outputs, groups)
        timer.mark("apply")
        stats["ns_matrices"] += fg.engine.ns_matrices
        stats["bytes_sent"] += fg.engine.bytes_sent
        functional.adamw_route([fg.adamw[k] for k in staged.adamw_present], groups, state, exact)
        timer.mark("adamw")

    # ------------------------------------------------------------------ settings and plan
    def _check_settings(self) -> None:
        """Re-validate whatever changed since the last check; a change that moves work rebuilds the plan."""
        options = tuple(self.options.values())
        if options != self._checked_options:
            self._settings_version += 1  # before the check: a rank whose new value fails still sends its digest
            settings.canonicalize(self.options)
            settings.validate(self.options, "MARSM.options", scope="optimizer")
            old = dict(zip(self.options, self._checked_options))
            self._replan |= settings.replan_values(self.options, "optimizer") != settings.replan_values(
                old, "optimizer"
            )
            self._checked_options = tuple(self.options.values())
        if len(self._checked) != len(self.param_groups):
            raise ValueError("MARSM: param_groups was changed by hand; use add_param_group")
        for i, group in enumerate(self.param_groups):
            if _group_values(group) == self._checked[i]:
                continue
            self._settings_version += 1
            where = f"MARSM: param group {i}"
            settings.canonicalize(group)
            settings.validate(group, where)
            old = dict(zip(_GROUP_KEYS, self._checked[i]))
            if (old["variant"] == "efficient") != (group["variant"] == "efficient") and any(
                "momentum" in self.state[p] for p in group["params"]
            ):
                raise ValueError(
                    f"{where}: variant changed from {old['variant']!r} to {group['variant']!r} after "
                    "steps were taken; the 'efficient' momentum buffer has another scale than the "
                    "approx/exact one, so the state cannot carry over (start a new optimizer)"
                )
            self._replan |= settings.replan_values(old) != settings.replan_values(group)
            self._checked[i] = _group_values(group)

    def _current_plan(self) -> StepPlan:
        """The step plan, rebuilt when this rank's parameters or a setting that moves work changed.

        A rank that rebuilds first says so through its old plan's all-reduce: if the other ranks did not
        change too, every rank raises there, instead of issuing collectives the others never join.
        """
        old = self.step_plan
        if old is not None and not self._replan and old.key == plan_key(self.param_groups):
            return old
        new = build_step_plan(self.param_groups, self.options, settings.replan_values)
        for fg in new.flat_groups:
            fg.plan_digest = guard.digest_values(fg.plan_record, fg.world)
        if old is not None:
            self._announce_replan(old, new)
        for fg in new.flat_groups:
            guard.agree_on_plan(fg, self._header(fg), self._record(fg))
        self.step_plan, self._replan = new, False
        return new

    def _announce_replan(self, old: StepPlan, new: StepPlan) -> None:
        changed = _first_change(old, new)
        for fg in old.flat_groups:
            fresh = next((f for f in new.flat_groups if f.ranks == fg.ranks), None)
            header = Header(self._settings_digest(fg), fresh.plan_digest if fresh else [0.0] * 4, True)
            fg.reduce_buffer.zero_()
            guard.write_header(fg, header)
            guard.all_reduce(fg.reduce_buffer, fg)
            reduced = guard.Reduced.read(fg.reduce_layout, fg.reduce_buffer)
            guard.check_agreement(fg, reduced, self._record(fresh or fg, replanned=True, changed=changed))

    def _fail_together(self, error: ValueError):
        """Raise ``error`` after taking part in this step's all-reduce, so that the other ranks, already in
        it, fail at the same point (on the settings digest, or here) instead of waiting for a timeout."""
        if self.step_plan is None or all(fg.process_group is None for fg in self.step_plan.flat_groups):
            raise error
        for fg in self.step_plan.flat_groups:
            fg.reduce_buffer.zero_()
            guard.write_header(fg, self._header(fg))
            guard.all_reduce(fg.reduce_buffer, fg)
            guard.check_agreement(fg, guard.Reduced.read(fg.reduce_layout, fg.reduce_buffer), self._record(fg))
        raise error

    def _settings_digest(self, fg: FlatGroup) -> list[float]:
        version, words = fg.settings_digest
        if version != self._settings_version:
            record = guard.settings_record(self.options, self.param_groups, fg.group_indices)
            words = guard.digest_values(record, fg.world)
            fg.settings_digest = (self._settings_version, words)
        return words

    def _header(self, fg: FlatGroup) -> Header:
        return Header(self._settings_digest(fg), fg.plan_digest, False)

    def _header_values(self, fg: FlatGroup) -> list[float]:
        header = self._header(fg)
        return header.settings_digest + header.plan_digest + [0.0]

    def _record(self, fg: FlatGroup, replanned: bool = False, changed: str | None = None) -> guard.RankRecord:
        record = guard.settings_record(self.options, self.param_groups, fg.group_indices)
        return guard.RankRecord(fg.plan_record, record, replanned, changed)

    def _step_count(self, fg: FlatGroup) -> int:
        return max((int(self.state[p]["step"]) for p in fg.params if "step" in self.state[p]), default=0)

    def plan_report(self) -> list[dict]:
        """Per flat group: who owns which matrix, Newton-Schulz FLOPs and bytes per rank (after one step)."""
        if self.step_plan is None:
            raise RuntimeError("MARSM.plan_report: the plan is built at the first step")
        return plan_report(self.step_plan)


# ---------------------------------------------------------------------- helpers
def _group_values(group: dict) -> tuple:
    return tuple(group.get(k) for k in _GROUP_KEYS)


def _first_change(old: StepPlan, new: StepPlan) -> str | None:
    """The first parameter of ``new`` that is not where it was in ``old`` (identity), by name."""
    old_params = [m.param for fg in old.flat_groups for m in fg.matrices] + [
        a.param for fg in old.flat_groups for a in fg.adamw
    ]
    names = {id(p): n for fg in new.flat_groups for p, n in zip(fg.params, fg.names)}
    new_params = [p for fg in new.flat_groups for p in fg.params]
    for a, b in zip(old_params, new_params):
        if a is not b:
            return names[id(b)]
    extra = new_params[len(old_params) :]
    return names[id(extra[0])] if extra else None


def _split_by_ndim(param_group: dict) -> list[dict]:
    """A group without ``use_mars``: its matrices (ndim >= 2) to MARS-M, the rest to AdamW."""
    params = list(param_group["params"])
    names = param_group.get("param_names")
    if params and isinstance(params[0], tuple):  # named parameters
        names, params = [n for n, _ in params], [p for _, p in params]
    groups = []
    for use_mars in (True, False):
        picked = [i for i, p in enumerate(params) if (p.ndim >= 2) == use_mars]
        if not picked:
            continue
        group = {**param_group, "params": [params[i] for i in picked], "use_mars": use_mars}
        group.pop("param_names", None)
        if names:
            group["param_names"] = [names[i] for i in picked]
        groups.append(group)
    return groups


def _resumed_group(i: int, saved: dict, live: dict) -> dict:
    """A saved param group checked against the live one, with the settings it predates taken from live."""
    where = f"MARSM.load_state_dict: param group {i}"
    missing = sorted(settings.CHECKPOINTED_GROUP_KEYS - {"initial_lr"} - set(saved))
    if missing:
        raise ValueError(
            f"{where} lacks the MARSM settings {missing}: not a MARSM state dict "
            f"(another optimizer's?); it has keys {sorted(k for k in saved if k != 'params')}"
        )
    if (
        saved["use_mars"] != live["use_mars"]
        or len(saved["params"]) != len(live["params"])
        or ("param_names" in saved and "param_names" in live and saved["param_names"] != live["param_names"])
    ):
        raise ValueError(
            f"{where} does not match this optimizer's group {i} (use_mars {saved['use_mars']} vs "
            f"{live['use_mars']}, {len(saved['params'])} vs {len(live['params'])} parameters, names "
            f"{_names_hint(saved)} vs {_names_hint(live)}): groups in another order, or another model?"
        )
    group = {**{s.name: live[s.name] for s in settings.GROUP_SETTINGS if not s.checkpointed}, **saved}
    settings.canonicalize(group)
    settings.validate(group, where)
    return group


def _names_hint(group: dict) -> str:
    names = group.get("param_names")
    return f"[{names[0]!r}, ...]" if names else "(unnamed)"


def _check_parameter(p: torch.Tensor, group: dict, i: int, where: str) -> None:
    name = group["param_names"][i] if group.get("param_names") else f"params[{i}] (shape {tuple(p.shape)})"
    if p.is_complex():
        raise ValueError(
            f"{where}: parameter {name} is complex ({p.dtype}); MARSM supports real floating "
            "tensors (split it into real and imaginary parameters)"
        )
    if not p.is_floating_point():
        raise ValueError(f"{where}: parameter {name} has dtype {p.dtype}; MARSM needs floating-point parameters")
    if group["use_mars"] and p.ndim < 2:
        raise ValueError(
            f"{where}: parameter {name} has ndim {p.ndim}; MARS-M needs matrices "
            "(put it in a group with use_mars=False, or use build_param_groups)"
        )
