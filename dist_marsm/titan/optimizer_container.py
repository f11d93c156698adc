"""``MARS-M`` as a torchtitan optimizer name, beside ``AdamW`` and ``DistMuon``.

torchtitan 0.3.0 resolves ``ParamGroupConfig.optimizer_name`` in
``OptimizersContainer._resolve_optimizer_factory``, a closed dict. :class:`MARSMOptimizersContainer`
is a small subclass that overrides three hooks and nothing else:

* ``_resolve_optimizer_factory``: ``"MARS-M"`` -> :func:`build_marsm`; other names go to torchtitan.
* ``_build_param_groups``: the parameters a ``MARS-M`` pattern matched are split by
  :func:`dist_marsm.build_param_groups` into the MARS-M route (matrices) and MARSM's own AdamW
  route (``ndim < 2``, ``nn.Embedding`` weights, and names matching ``adamw_patterns``: by default
  token/position embeddings and the output head ``lm_head``/``output``). Names are matched in
  torchtitan's *canonical* form (``canonical_fqn``: ``_checkpoint_wrapped_module`` and other wrapper
  segments removed), so a pattern written for the plain model also works with activation
  checkpointing on. ``fused``/``foreach`` (torchtitan's implementation flags) are dropped from
  MARS-M groups.
* ``state_dict``/``load_state_dict``: MARSM param-group keys in checkpoints are frozen to
  :data:`CHECKPOINTED_GROUP_KEYS` (format 1), so a hyperparameter added to MARSM later is not
  expected from an older checkpoint (DCP refuses keys a checkpoint lacks); and a param-group key
  the checkpoint lacks keeps its live value, with a warning, instead of torchtitan's ``KeyError``.

Instance-wide MARSM arguments (``wire_dtype``, ``bucket_mb``, ``owner_policy``, ``nonfinite``) go in
``Config.optimizer_factory_kwargs_by_name["MARS-M"]``, torchtitan's channel for per-instance
arguments; per-group hyperparameters (lr, momentum, gamma, ...) in ``ParamGroupConfig.optimizer_kwargs``.
With pipeline parallelism torchtitan builds one optimizer per model part, so each stage's MARSM plans
over its own parameters.

Fused QKV (``attention.qkv_linear.wqkv.weight`` in the llama3 debug model): orthogonalized as ONE
matrix, like every other 2-D weight; see docs/torchtitan.md for the measurement behind this.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torchtitan.components.checkpointer.utils import canonical_fqn
from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig

from dist_marsm import DEFAULT_ADAMW_PATTERNS, MARSM, build_param_groups

logger = logging.getLogger(__name__)

OPTIMIZER_NAME = "MARS-M"
# Keys of a MARS-M ParamGroupConfig that steer routing and never reach MARSM's param groups.
ROUTING_KEYS = ("adamw_patterns", "adamw_lr", "adamw_weight_decay")
# Instance-wide MARSM constructor arguments (Config.optimizer_factory_kwargs_by_name["MARS-M"]).
INSTANCE_KEYS = ("wire_dtype", "bucket_mb", "owner_policy", "nonfinite")
_IMPL_KEYS = ("fused", "foreach")
# MARSM param-group keys saved in checkpoints: frozen at the keys of checkpoint format 1. Never add to
# this set (older checkpoints lack new keys and DCP would refuse to load them); new hyperparameters
# simply come from the recipe on resume. "initial_lr" is added by torch's LR schedulers.
CHECKPOINTED_GROUP_KEYS = frozenset({
    "lr", "initial_lr", "momentum", "gamma", "weight_decay", "variant", "clip", "ns_steps", "ns_dtype", "lr_adjust",
    "matrix_view", "adamw_betas", "adamw_eps", "normalize", "normuon_beta2", "use_mars"})


def build_marsm(param_groups: list[dict], **instance_kwargs: Any) -> MARSM:
    """torchtitan optimizer factory for ``MARS-M``: param-group dicts in, a :class:`MARSM` out."""
    unknown = set(instance_kwargs) - set(INSTANCE_KEYS)
    if unknown:
        raise TypeError(f"MARS-M: unknown instance arguments {sorted(unknown)}; allowed {INSTANCE_KEYS}")
    return MARSM(param_groups, **instance_kwargs)


def build_dist_muon_owned(param_groups: list[dict], **kwargs: Any):
    """torchtitan's DistMuon factory; when the recipe gives no FlexShard layout, each matrix is
    orthogonalized whole by one owner rank on the FSDP axis (``Owned`` on "fsdp"), one bucket.
    DistMuon requires CUDA parameters (it refuses CPU ones)."""
    from torchtitan.distributed.flex_shard import BucketConfig, ComputeLayout, Owned, build_dist_muon

    groups = [{k: v for k, v in g.items() if k not in _IMPL_KEYS} for g in param_groups]
    if "compute_sharding_by_fqn" not in kwargs:
        kwargs["compute_sharding_by_fqn"] = {n: ComputeLayout(shardings_by_mesh_axis={"fsdp": Owned()})
                                             for g in groups for n in g["param_names"]}
    kwargs.setdefault("bucket_configs", [BucketConfig(patterns=("*",))])
    return build_dist_muon(groups, **kwargs)


class _NamedView:
    """What build_param_groups reads from a model (modules(), named_parameters()), restricted to
    some parameters and using canonical names."""

    def __init__(self, model: torch.nn.Module, params: list, names: list[str]):
        self._model, self._params, self._names = model, params, names

    def modules(self):
        return self._model.modules()

    def named_parameters(self):
        return zip(self._names, self._params)


def route_group(model: torch.nn.Module, group: dict) -> list[dict]:
    """Split one torchtitan param-group dict (``params``, ``param_names`` and the ParamGroupConfig's
    optimizer_kwargs) into MARSM groups with ``use_mars`` True/False via build_param_groups."""
    group = dict(group)
    for key in _IMPL_KEYS:
        group.pop(key, None)
    patterns = tuple(group.pop("adamw_patterns", None) or DEFAULT_ADAMW_PATTERNS)
    adamw_lr = group.pop("adamw_lr", None)
    adamw_wd = group.pop("adamw_weight_decay", None)
    params, names = group.pop("params"), group.pop("param_names")
    routed = build_param_groups(_NamedView(model, params, names), adamw_patterns=patterns,
                                adamw_lr=adamw_lr, adamw_weight_decay=adamw_wd)
    # Per-route overrides (lr/weight_decay of the AdamW route) win over the shared hyperparameters.
    return [{**group, **g} for g in routed]


class MARSMOptimizersContainer(OptimizersContainer):
    """torchtitan's OptimizersContainer plus the ``MARS-M`` optimizer name (see module docstring)."""

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        pass

    @staticmethod
    def _resolve_optimizer_factory(name: str):
        if name == OPTIMIZER_NAME:
            return build_marsm
        if name == "DistMuon":
            return build_dist_muon_owned
        return OptimizersContainer._resolve_optimizer_factory(name)

    @staticmethod
    def _build_param_groups(model, param_group_configs, impl_kwargs):
        groups, patterns = OptimizersContainer._build_param_groups(model, param_group_configs, impl_kwargs)
        if OPTIMIZER_NAME in groups:
            new_groups, new_patterns = [], []
            for group, pattern in zip(groups[OPTIMIZER_NAME], patterns[OPTIMIZER_NAME]):
                for routed in route_group(model, group):
                    new_groups.append(routed)
                    new_patterns.append(f"{pattern} [{'MARS-M' if routed['use_mars'] else 'AdamW'} route]")
            groups[OPTIMIZER_NAME], patterns[OPTIMIZER_NAME] = new_groups, new_patterns
        # DistMuon groups written by a recipe (they carry "adamw_kwargs"): the same routing, with the
        # non-matrix parameters moved to a torch AdamW group (DistMuon takes matrices only).
        if any("adamw_kwargs" in g for g in groups.get("DistMuon", [])):
            muon_groups, muon_patterns = [], []
            for group, pattern in zip(groups["DistMuon"], patterns["DistMuon"]):
                if "adamw_kwargs" not in group:
                    muon_groups.append(group)
                    muon_patterns.append(pattern)
                    continue
                group = dict(group)
                adamw_kwargs = group.pop("adamw_kwargs")
                for routed in route_group(model, group):
                    use_mars = routed.pop("use_mars")
                    if use_mars:
                        muon_groups.append(routed)
                        muon_patterns.append(f"{pattern} [DistMuon route]")
                    else:
                        keep = {k: routed[k] for k in ("params", "param_names")}
                        groups["AdamW"].append({**keep, **impl_kwargs, **adamw_kwargs})
                        patterns["AdamW"].append(f"{pattern} [AdamW route]")
            groups["DistMuon"], patterns["DistMuon"] = muon_groups, muon_patterns
        return groups, patterns

    def state_dict(self) -> dict[str, Any]:
        """torchtitan's flat FQN-keyed dict, with MARSM param-group keys limited to
        :data:`CHECKPOINTED_GROUP_KEYS`. A hyperparameter added to MARSM later is then neither saved
        nor expected when DCP loads an older checkpoint (DCP fails on a key the checkpoint lacks);
        it keeps its live (recipe) value."""
        result = super().state_dict()
        for optim in self.optimizers:
            if not isinstance(optim, MARSM):
                continue
            for group in optim.param_groups:
                for fqn in group.get("param_names") or []:
                    for key in group:
                        if key not in CHECKPOINTED_GROUP_KEYS:
                            result.pop(f"param_groups.{fqn}.{key}", None)
        return result

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = []
        state_dict = dict(state_dict)  # shallow copy: the caller's dict is not modified
        for optim in self.optimizers:
            for group in optim.param_groups:
                names = group.get("param_names") or []
                if not names:
                    continue
                for key, value in group.items():
                    flat = f"param_groups.{names[0]}.{key}"
                    if key not in ("params", "param_names") and flat not in state_dict:
                        missing.append(key)
                        state_dict[flat] = value
        if missing:
            logger.warning("optimizer checkpoint lacks param-group keys %s; keeping their current values",
                           sorted(set(missing)))
        super().load_state_dict(state_dict)


def marsm_param_group(lr: float, **optimizer_kwargs: Any) -> ParamGroupConfig:
    """A catch-all ``MARS-M`` ParamGroupConfig (embeddings/head/vectors still go to the AdamW route)."""
    return ParamGroupConfig(pattern=r".*", optimizer_name=OPTIMIZER_NAME, optimizer_kwargs={"lr": lr, **optimizer_kwargs})


def marsm_container_config(lr: float, instance_kwargs: dict | None = None,
                           **optimizer_kwargs: Any) -> MARSMOptimizersContainer.Config:
    return MARSMOptimizersContainer.Config(
        param_groups=[marsm_param_group(lr, **optimizer_kwargs)],
        optimizer_factory_kwargs_by_name={OPTIMIZER_NAME: dict(instance_kwargs or {})},
    )
