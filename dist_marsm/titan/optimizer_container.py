"""``MARS-M`` as a torchtitan optimizer name beside ``AdamW`` and ``DistMuon``, with a typed config.

One typed field per MARSM setting, generated from :data:`dist_marsm.settings.SETTINGS`, so torchtitan's
tyro CLI parses, checks and documents them. Routing, checkpoint keys and the resume policy (the recipe's
values win except what the lr scheduler drives): docs/torchtitan.md.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import types
import typing
from typing import Annotated, Any, Literal, Optional

import torch
import tyro
from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig

from dist_marsm import DEFAULT_ADAMW_PATTERNS, MARSM, build_param_groups, settings
from dist_marsm.qk_clip import QKClipSettings
from dist_marsm.titan.qk_clip_hooks import install_qk_clip

logger = logging.getLogger(__name__)

OPTIMIZER_NAME = "MARS-M"
OPTIMIZER_NAMES = ("MARS-M", "AdamW", "DistMuon")
SCHEDULED_KEYS = ("lr", "initial_lr")         # driven by the lr scheduler: the checkpoint's values stay
_IMPL_KEYS = ("fused", "foreach")
# Settings a recipe cannot express: runtime objects (the glue plans over the default process group).
_NOT_CONFIGURABLE = ("process_group",)
CONFIG_SETTINGS = tuple(s for s in settings.SETTINGS if s.argument and s.name not in _NOT_CONFIGURABLE)


def _value_type(value):
    """The annotation of a setting's default: tuples become ``tuple[T, ...]`` of their element type."""
    if isinstance(value, tuple):
        return tuple[_value_type(value[0]) if value else float, ...]
    return type(value)


def _accepts(s: settings.Setting, value) -> bool:
    try:
        return bool(s.valid(value))
    except Exception:  # noqa: BLE001 - a check that cannot take the probe does not accept it
        return False


def _annotation(s: settings.Setting):
    if s.choices is not None and set(s.choices) != {True, False}:
        values = tuple(c for c in s.choices if c is not None)
        kind = Literal[values]  # type: ignore[valid-type]
        return Optional[kind] if None in s.choices else kind
    if s.default is None:   # no type in the default: the probe values the declaration's own check accepts
        kinds = tuple(type(v) for v in (True, 1, 0.5) if _accepts(s, v))
        return Optional[typing.Union[kinds]] if kinds else type(None)
    return _value_type(s.default)


def _config_fields():
    out = [("name", Annotated[Literal[OPTIMIZER_NAMES], tyro.conf.arg(  # type: ignore[valid-type]
        help="which optimizer: MARS-M, torch AdamW, or torchtitan's DistMuon (GPU only)")], "MARS-M")]
    for s in CONFIG_SETTINGS:
        default = dataclasses.field(default_factory=lambda d=s.default: d) if isinstance(s.default, list) else s.default
        out.append((s.name, Annotated[_annotation(s), tyro.conf.arg(help=f"MARS-M: {s.doc}")], default))
    out += [
        ("adamw_lr", Annotated[Optional[float], tyro.conf.arg(
            help="lr of the AdamW route (embeddings, head, vectors); None = lr")], None),
        ("adamw_patterns", Annotated[list[str], tyro.conf.arg(
            help="extra regexes (canonical parameter names) sent to the AdamW route")],
         dataclasses.field(default_factory=list)),
        ("nesterov", Annotated[bool, tyro.conf.arg(help="DistMuon: Nesterov momentum")], True),
        ("implementation", Literal["for-loop", "foreach", "fused", "fused_opt_states_bf16"], "foreach"),
        ("qk_clip_tau", Annotated[Optional[float], tyro.conf.arg(
            help="QK-clip (MuonClip) threshold on each head's max pre-softmax logit; None = off "
                 "(docs/attention.md)")], None),
    ]
    return out


def _check(self) -> None:
    """Each MARS-M setting by the declaration's checks (canonical spellings stored); recipe-level limits."""
    values = settings.canonicalize({s.name: getattr(self, s.name) for s in CONFIG_SETTINGS})
    for name, value in values.items():
        object.__setattr__(self, name, value)
    for scope in ("group", "optimizer"):
        try:
            settings.validate(values, "", scope, names=set(values))
        except ValueError as e:
            raise ValueError(str(e).removeprefix(": ")) from None
    problems = [(not self.lr > 0, f"lr must be > 0 (the peak learning rate), got {self.lr!r}"),
                (self.variant == "exact", "variant 'exact' needs step(closure), which torchtitan's Trainer never "
                                          "gives; use 'approx' or 'efficient'"),
                (self.name == "DistMuon" and self.lr_adjust == "none", "lr_adjust 'none' has no DistMuon "
                 "equivalent (use 'moonlight' = match_rms_adamw, or 'original')"),
                (self.adamw_lr is not None and not self.adamw_lr > 0, f"adamw_lr must be > 0 or None, got "
                                                                      f"{self.adamw_lr!r}")]
    for bad, message in problems:
        if bad:
            raise ValueError(message)
    try:
        QKClipSettings(tau=self.qk_clip_tau)
    except ValueError as e:
        raise ValueError(f"qk_clip_tau: {e}") from None
    for pattern in self.adamw_patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"adamw_patterns: {pattern!r} is not a regular expression ({e})") from None


def route_group(model: torch.nn.Module, group: dict) -> list[dict]:
    """Split one torchtitan param-group dict into MARSM groups with ``use_mars`` True/False."""
    group = {k: v for k, v in group.items() if k not in _IMPL_KEYS}
    patterns = tuple(group.pop("adamw_patterns", None) or DEFAULT_ADAMW_PATTERNS)
    adamw_lr, adamw_wd = group.pop("adamw_lr", None), group.pop("adamw_weight_decay", None)
    params, names = group.pop("params"), group.pop("param_names")
    head_dim = group.pop("ns_head_dim", None)   # per head for attention q/k/v only, not every matrix
    # build_param_groups reads modules() and named_parameters(): the model's, restricted to this group
    view = types.SimpleNamespace(modules=model.modules, named_parameters=lambda: zip(names, params))
    routed = build_param_groups(view, adamw_patterns=patterns, adamw_lr=adamw_lr, adamw_weight_decay=adamw_wd,
                                head_dim=head_dim)
    return [{**group, **g} for g in routed]   # per-route overrides win over the shared values


def build_dist_muon_owned(param_groups: list[dict], **kwargs: Any):
    """torchtitan's DistMuon; without a FlexShard layout each matrix is orthogonalized whole by one
    owner on the FSDP axis, one bucket. DistMuon refuses CPU parameters."""
    from torchtitan.distributed.flex_shard import BucketConfig, ComputeLayout, Owned, build_dist_muon

    groups = [{k: v for k, v in g.items() if k not in _IMPL_KEYS} for g in param_groups]
    kwargs.setdefault("compute_sharding_by_fqn", {n: ComputeLayout(shardings_by_mesh_axis={"fsdp": Owned()})
                                                  for g in groups for n in g["param_names"]})
    kwargs.setdefault("bucket_configs", [BucketConfig(patterns=("*",))])
    return build_dist_muon(groups, **kwargs)


def param_groups_of(config) -> tuple[list[ParamGroupConfig], dict]:
    """torchtitan ParamGroupConfigs and factory kwargs for the typed fields of ``config``."""
    patterns = tuple(DEFAULT_ADAMW_PATTERNS) + tuple(config.adamw_patterns)
    adamw = {"lr": config.adamw_lr or config.lr, "weight_decay": config.weight_decay,
             "betas": tuple(config.adamw_betas), "eps": config.adamw_eps}
    if config.name == "MARS-M":
        kwargs = {s.name: getattr(config, s.name) for s in CONFIG_SETTINGS if s.scope == "group"}
        kwargs["adamw_patterns"] = patterns
        if config.adamw_lr is not None:
            kwargs["adamw_lr"] = config.adamw_lr
        options = {s.name: getattr(config, s.name) for s in CONFIG_SETTINGS if s.scope == "optimizer"}
        return [ParamGroupConfig(pattern=".*", optimizer_name=OPTIMIZER_NAME, optimizer_kwargs=kwargs)], \
            {OPTIMIZER_NAME: options}
    if config.name == "AdamW":
        return [ParamGroupConfig(pattern=".*", optimizer_name="AdamW", optimizer_kwargs={**adamw, "lr": config.lr})], {}
    kwargs = {"lr": config.lr, "weight_decay": config.weight_decay, "momentum": config.momentum,
              "nesterov": config.nesterov, "ns_steps": config.ns_steps, "adamw_patterns": patterns,
              "adjust_lr_fn": {"moonlight": "match_rms_adamw", "original": "original"}[config.lr_adjust],
              "adamw_kwargs": adamw}
    return [ParamGroupConfig(pattern=".*", optimizer_name="DistMuon", optimizer_kwargs=kwargs)], {}


class MARSMOptimizersContainer(OptimizersContainer):
    """torchtitan's OptimizersContainer plus the ``MARS-M`` name, a typed config and the resume policy."""

    Config = dataclasses.make_dataclass(
        "Config", _config_fields(), bases=(OptimizersContainer.Config,), kw_only=True, slots=True,
        namespace={"__post_init__": _check, "__qualname__": "MARSMOptimizersContainer.Config",
                   "__doc__": "torchtitan's optimizer config with one typed field per MARS-M setting."})

    def __init__(self, config, *, model_parts: list[torch.nn.Module]) -> None:
        if not config.param_groups:
            groups, factory_kwargs = param_groups_of(config)
            config = dataclasses.replace(config, param_groups=groups, optimizer_factory_kwargs_by_name={
                **factory_kwargs, **config.optimizer_factory_kwargs_by_name})
        super().__init__(config, model_parts=model_parts)
        # QK-clip runs as this container's step post-hook, over all model parts (one all-reduce per step).
        self.qk_clip = None if config.qk_clip_tau is None else install_qk_clip(
            model_parts, config.qk_clip_tau, optimizer=self)

    @staticmethod
    def _resolve_optimizer_factory(name: str):
        if name == OPTIMIZER_NAME:
            return MARSM
        if name == "DistMuon":
            return build_dist_muon_owned
        return OptimizersContainer._resolve_optimizer_factory(name)

    @staticmethod
    def _build_param_groups(model, param_group_configs, impl_kwargs):
        groups, patterns = OptimizersContainer._build_param_groups(model, param_group_configs, impl_kwargs)
        if OPTIMIZER_NAME in groups:
            pairs = [(routed, f"{pattern} [{'MARS-M' if routed['use_mars'] else 'AdamW'} route]")
                     for group, pattern in zip(groups[OPTIMIZER_NAME], patterns[OPTIMIZER_NAME])
                     for routed in route_group(model, group)]
            groups[OPTIMIZER_NAME], patterns[OPTIMIZER_NAME] = [g for g, _ in pairs], [p for _, p in pairs]
        # DistMuon groups from the typed config carry "adamw_kwargs": their non-matrix parameters move
        # to a torch AdamW group (DistMuon takes matrices only).
        if any("adamw_kwargs" in g for g in groups.get("DistMuon", [])):
            muon, muon_patterns = [], []
            for group, pattern in zip(groups["DistMuon"], patterns["DistMuon"]):
                if "adamw_kwargs" not in group:
                    muon.append(group)
                    muon_patterns.append(pattern)
                    continue
                group = dict(group)
                adamw_kwargs = group.pop("adamw_kwargs")
                for routed in route_group(model, group):
                    if routed.pop("use_mars"):
                        muon.append(routed)
                        muon_patterns.append(f"{pattern} [DistMuon route]")
                    else:
                        keep = {k: routed[k] for k in ("params", "param_names")}
                        groups["AdamW"].append({**keep, **impl_kwargs, **adamw_kwargs})
                        patterns["AdamW"].append(f"{pattern} [AdamW route]")
            groups["DistMuon"], patterns["DistMuon"] = muon, muon_patterns
        return groups, patterns

    def state_dict(self) -> dict[str, Any]:
        """torchtitan's flat FQN-keyed dict; MARSM param-group keys limited to the declaration's
        checkpointed keys (a setting not checkpointed is neither saved nor expected at load)."""
        result = super().state_dict()
        for optim in self.optimizers:
            if isinstance(optim, MARSM):
                for group in optim.param_groups:
                    for fqn in group.get("param_names") or []:
                        for key in group:
                            if key not in settings.CHECKPOINTED_GROUP_KEYS:
                                result.pop(f"param_groups.{fqn}.{key}", None)
        return result

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the state; then the recipe's (live) settings win except ``SCHEDULED_KEYS`` (see module doc)."""
        state_dict, missing = dict(state_dict), set()
        live = [[dict(g) for g in optim.param_groups] for optim in self.optimizers]
        for group in (g for groups in live for g in groups if g.get("param_names")):
            for key, value in group.items():
                flat = f"param_groups.{group['param_names'][0]}.{key}"
                if key not in ("params", "param_names") and flat not in state_dict:
                    missing.add(key)
                    state_dict[flat] = value
        if missing:
            logger.warning(f"optimizer checkpoint lacks param-group keys {sorted(missing)}; keeping their "
                           "current values")
        super().load_state_dict(state_dict)
        changed, kept = {}, {}
        for optim, groups in zip(self.optimizers, live):
            for group, recipe in zip(optim.param_groups, groups):
                for key, value in recipe.items():
                    if key in ("params", "param_names") or _same(group.get(key), value):
                        continue
                    if key in SCHEDULED_KEYS:
                        kept.setdefault(key, (group[key], value))
                        continue
                    changed.setdefault(key, (group.get(key), value))
                    group[key] = value
        for key, (old, new) in changed.items():
            logger.info(f"resume: {key} {old!r} -> {new!r} (the recipe's value wins over the checkpoint's)")
        if "initial_lr" in kept:   # the scheduler's peak; "lr" itself always differs mid-schedule
            saved, recipe = kept["initial_lr"]
            logger.info(f"resume: peak lr (initial_lr) stays {saved!r} from the checkpoint's lr schedule; the "
                        f"recipe gives {recipe!r} (start a new dump_folder to change it)")


def _same(a, b) -> bool:
    a, b = (tuple(x) if isinstance(x, list) else x for x in (a, b))
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def checkpoint_optimizer_name(step_dir: str) -> str | None:
    """Which optimizer wrote a DCP checkpoint folder, from its metadata (None: no optimizer state)."""
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(step_dir).read_metadata().state_dict_metadata.keys()
    groups = [k for k in keys if k.startswith("optimizer.param_groups.")]
    if not groups:
        return None
    if any(k.endswith(".gamma") for k in groups):
        return OPTIMIZER_NAME
    return "DistMuon" if any(k.endswith(".adjust_lr_fn") for k in groups) else "AdamW"
