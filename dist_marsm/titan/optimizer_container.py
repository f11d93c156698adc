"""``MARS-M`` as a torchtitan optimizer name beside ``AdamW`` and ``DistMuon``, with a typed config whose
fields are generated from :data:`dist_marsm.settings.SETTINGS`. Routing, checkpoint keys and the resume
policy: docs/torchtitan.md.
"""

from __future__ import annotations

import dataclasses
import re
import time
import types
from typing import Annotated, Any, Literal, Optional

import torch
import tyro
from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig
from torchtitan.tools.logging import logger

from dist_marsm import DEFAULT_ADAMW_PATTERNS, MARSM, build_param_groups, settings
from dist_marsm.qk_clip import QKClipSettings
from dist_marsm.titan.qk_clip_hooks import install_qk_clip

OPTIMIZER_NAME = "MARS-M"
SCHEDULED_KEYS = ("lr", "initial_lr")  # driven by the lr scheduler: the checkpoint's values stay
_IMPL_KEYS = ("fused", "foreach")
# process_group is a runtime object: the glue plans over the default process group.
CONFIG_SETTINGS = tuple(s for s in settings.SETTINGS if s.argument and s.name != "process_group")


def _config_fields():
    def arg(kind, doc):
        return Annotated[kind, tyro.conf.arg(help=doc)]

    return [
        (
            "name",
            arg(
                Literal["MARS-M", "AdamW", "DistMuon"],
                "which optimizer: MARS-M, torch AdamW, or torchtitan's DistMuon (GPU only)",
            ),
            "MARS-M",
        ),
        *[(s.name, arg(s.annotation, f"MARS-M: {s.doc}"), s.default) for s in CONFIG_SETTINGS],
        ("adamw_lr", arg(Optional[float], "lr of the AdamW route (embeddings, head, vectors); None = lr"), None),
        (
            "adamw_patterns",
            arg(list[str], "extra regexes (canonical parameter names) sent to the AdamW route"),
            dataclasses.field(default_factory=list),
        ),
        ("nesterov", arg(bool, "DistMuon: Nesterov momentum"), True),
        ("implementation", Literal["for-loop", "foreach", "fused", "fused_opt_states_bf16"], "foreach"),
        (
            "qk_clip_tau",
            arg(
                Optional[float],
                "QK-clip (MuonClip) threshold on each head's max pre-softmax logit; None = off (docs/attention.md)",
            ),
            None,
        ),
    ]


def _check(self) -> None:
    """The declaration's checks and group rules (canonical spellings stored), then what torchtitan's Trainer needs."""
    values = settings.canonicalize({s.name: getattr(self, s.name) for s in CONFIG_SETTINGS})
    for name, value in values.items():
        object.__setattr__(self, name, value)
    for scope in ("group", "optimizer"):
        settings.validate(values, "", scope, names=values)
    try:
        QKClipSettings(tau=self.qk_clip_tau)
        for pattern in self.adamw_patterns:
            re.compile(pattern)
    except ValueError as e:
        raise ValueError(str(e).replace("QKClipSettings.tau", "qk_clip_tau")) from None
    except re.error as e:
        raise ValueError(f"adamw_patterns entry {e.pattern!r} is not a regular expression ({e})") from None
    problems = [
        (not self.lr > 0, f"lr must be > 0 (the peak learning rate), got {self.lr!r}"),
        (
            self.variant == "exact",
            "variant 'exact' needs step(closure), which torchtitan's Trainer never gives; use 'approx' or 'efficient'",
        ),
        (
            self.name == "DistMuon" and self.lr_adjust == "none",
            "lr_adjust 'none' has no DistMuon equivalent (use 'moonlight' = match_rms_adamw, or 'original')",
        ),
        (self.adamw_lr is not None and not self.adamw_lr > 0, f"adamw_lr must be > 0 or None, got {self.adamw_lr!r}"),
    ]
    if message := next((m for bad, m in problems if bad), None):
        raise ValueError(message)


def route_group(model: torch.nn.Module, group: dict) -> list[dict]:
    """Split one torchtitan param-group dict into MARSM groups with ``use_mars`` True/False."""
    group = {k: v for k, v in group.items() if k not in _IMPL_KEYS}
    patterns = tuple(group.pop("adamw_patterns", None) or DEFAULT_ADAMW_PATTERNS)
    adamw_lr, adamw_wd = group.pop("adamw_lr", None), group.pop("adamw_weight_decay", None)
    params, names = group.pop("params"), group.pop("param_names")
    head_dim = group.pop("ns_head_dim", None)  # per head for attention q/k/v only, not every matrix
    # build_param_groups reads modules() and named_parameters(): the model's, restricted to this group
    view = types.SimpleNamespace(modules=model.modules, named_parameters=lambda: zip(names, params))
    routed = build_param_groups(
        view, adamw_patterns=patterns, adamw_lr=adamw_lr, adamw_weight_decay=adamw_wd, head_dim=head_dim
    )
    return [{**group, **g} for g in routed]  # per-route overrides win over the shared values


def build_dist_muon_owned(param_groups: list[dict], **kwargs: Any):
    """torchtitan's DistMuon, each matrix orthogonalized whole by one owner on the FSDP axis (GPU only)."""
    from torchtitan.distributed.flex_shard import BucketConfig, ComputeLayout, Owned, build_dist_muon

    groups = [{k: v for k, v in g.items() if k not in _IMPL_KEYS} for g in param_groups]
    kwargs.setdefault(
        "compute_sharding_by_fqn",
        {n: ComputeLayout(shardings_by_mesh_axis={"fsdp": Owned()}) for g in groups for n in g["param_names"]},
    )
    kwargs.setdefault("bucket_configs", [BucketConfig(patterns=("*",))])
    return build_dist_muon(groups, **kwargs)


def param_groups_of(config) -> tuple[list[ParamGroupConfig], dict]:
    """torchtitan ParamGroupConfigs and factory kwargs for the typed fields of ``config``."""
    patterns = tuple(DEFAULT_ADAMW_PATTERNS) + tuple(config.adamw_patterns)
    adamw = {
        "lr": config.adamw_lr or config.lr,
        "weight_decay": config.weight_decay,
        "betas": tuple(config.adamw_betas),
        "eps": config.adamw_eps,
    }
    factory_kwargs = {}
    if config.name == OPTIMIZER_NAME:
        kwargs = {s.name: getattr(config, s.name) for s in CONFIG_SETTINGS if s.scope == "group"} | {
            "adamw_patterns": patterns,
            "adamw_lr": config.adamw_lr,
        }
        factory_kwargs = {
            OPTIMIZER_NAME: {s.name: getattr(config, s.name) for s in CONFIG_SETTINGS if s.scope == "optimizer"}
        }
    elif config.name == "AdamW":
        kwargs = {**adamw, "lr": config.lr}
    else:
        kwargs = {
            "lr": config.lr,
            "weight_decay": config.weight_decay,
            "momentum": config.momentum,
            "nesterov": config.nesterov,
            "ns_steps": config.ns_steps,
            "adamw_patterns": patterns,
            "adjust_lr_fn": {"moonlight": "match_rms_adamw", "original": "original"}[config.lr_adjust],
            "adamw_kwargs": adamw,
        }
    return [ParamGroupConfig(pattern=".*", optimizer_name=config.name, optimizer_kwargs=kwargs)], factory_kwargs


class MARSMOptimizersContainer(OptimizersContainer):
    """torchtitan's OptimizersContainer plus the ``MARS-M`` name, a typed config and the resume policy."""

    Config = dataclasses.make_dataclass(
        "Config",
        _config_fields(),
        bases=(OptimizersContainer.Config,),
        kw_only=True,
        slots=True,
        namespace={
            "__post_init__": _check,
            "__qualname__": "MARSMOptimizersContainer.Config",
            "__doc__": "torchtitan's optimizer config with one typed field per MARS-M setting.",
        },
    )

    def __init__(self, config, *, model_parts: list[torch.nn.Module]) -> None:
        if not config.param_groups:
            groups, factory_kwargs = param_groups_of(config)
            config = dataclasses.replace(
                config,
                param_groups=groups,
                optimizer_factory_kwargs_by_name={**factory_kwargs, **config.optimizer_factory_kwargs_by_name},
            )
        super().__init__(config, model_parts=model_parts)
        # QK-clip runs as this container's step post-hook, over all model parts (one all-reduce per step).
        self.qk_clip = (
            None if config.qk_clip_tau is None else install_qk_clip(model_parts, config.qk_clip_tau, optimizer=self)
        )
        self.last_step_time_s, self._start = None, 0.0  # the whole step, QK-clip's post-hook included
        self.register_step_pre_hook(lambda *_: setattr(self, "_start", time.perf_counter()))
        self.register_step_post_hook(lambda *_: setattr(self, "last_step_time_s", time.perf_counter() - self._start))

    @staticmethod
    def _resolve_optimizer_factory(name: str):
        ours = {OPTIMIZER_NAME: MARSM, "DistMuon": build_dist_muon_owned}
        return ours[name] if name in ours else OptimizersContainer._resolve_optimizer_factory(name)

    @staticmethod
    def _build_param_groups(model, param_group_configs, impl_kwargs):
        """MARS-M groups split into their routes; the typed config's DistMuon groups (with ``adamw_kwargs``)
        send non-matrix parameters to a torch AdamW group."""
        groups, patterns = OptimizersContainer._build_param_groups(model, param_group_configs, impl_kwargs)
        for name in (n for n in (OPTIMIZER_NAME, "DistMuon") if n in groups):
            kept = []
            for group, pattern in zip(groups[name], patterns[name]):
                adamw = group.get("adamw_kwargs")
                if name == "DistMuon" and adamw is None:
                    kept.append((group, pattern))
                    continue
                for routed in route_group(model, {k: v for k, v in group.items() if k != "adamw_kwargs"}):
                    if name == OPTIMIZER_NAME:
                        kept.append((routed, f"{pattern} [{'MARS-M' if routed['use_mars'] else 'AdamW'} route]"))
                    elif routed.pop("use_mars"):
                        kept.append((routed, f"{pattern} [DistMuon route]"))
                    else:
                        groups["AdamW"].append(
                            {"params": routed["params"], "param_names": routed["param_names"], **impl_kwargs, **adamw}
                        )
                        patterns["AdamW"].append(f"{pattern} [AdamW route]")
            groups[name], patterns[name] = [g for g, _ in kept], [p for _, p in kept]
        return groups, patterns

    def state_dict(self) -> dict[str, Any]:
        """torchtitan's flat FQN-keyed dict, MARSM's param-group keys limited to the checkpointed settings."""
        result = super().state_dict()
        for group in (g for optim in self.optimizers if isinstance(optim, MARSM) for g in optim.param_groups):
            for fqn in group.get("param_names") or []:
                for key in set(group) - settings.CHECKPOINTED_GROUP_KEYS:
                    result.pop(f"param_groups.{fqn}.{key}", None)
        return result

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the state; then the recipe's (live) settings win except ``SCHEDULED_KEYS``."""
        state_dict, missing = dict(state_dict), set()
        live = [[dict(g) for g in optim.param_groups] for optim in self.optimizers]
        for group in (g for groups in live for g in groups if g.get("param_names")):
            for key in set(group) - {"params", "param_names"}:
                if (flat := f"param_groups.{group['param_names'][0]}.{key}") not in state_dict:
                    missing.add(key)
                    state_dict[flat] = group[key]
        if missing:
            logger.warning(
                f"optimizer checkpoint lacks param-group keys {sorted(missing)}; keeping their current values"
            )
        super().load_state_dict(state_dict)
        changed, kept = {}, {}
        for optim, groups in zip(self.optimizers, live):
            for group, recipe in zip(optim.param_groups, groups):
                for key in set(recipe) - {"params", "param_names"}:
                    old, new = group.get(key), recipe[key]
                    same = (tuple(old) if isinstance(old, list) else old) == (
                        tuple(new) if isinstance(new, list) else new
                    )
                    if not (same and isinstance(old, bool) == isinstance(new, bool)):
                        (kept if key in SCHEDULED_KEYS else changed).setdefault(key, (old, new))
                        group[key] = old if key in SCHEDULED_KEYS else new
        for key, (old, new) in sorted(changed.items()):
            logger.info(f"resume: {key} {old!r} -> {new!r} (the recipe's value wins over the checkpoint's)")
        if "initial_lr" in kept:  # the scheduler's peak; "lr" itself always differs mid-schedule
            logger.info(
                f"resume: peak lr (initial_lr) stays {kept['initial_lr'][0]!r} from the checkpoint's lr "
                f"schedule; the recipe gives {kept['initial_lr'][1]!r} (start a new dump_folder to change it)"
            )
