"""QK-clip for torchtitan models: per-head max-logit capture by forward pre-hooks (layer 4).

torchtitan 0.3.0's ``GQAttention`` (llama3, qwen3, ...) projects q/k/v, applies RoPE and hands
``q, k, v`` as ``[B, L, heads, head_dim]`` to ``inner_attention`` (SDPA, FlexAttention or varlen) with
``scale=`` in the keywords. A forward pre-hook on ``inner_attention`` sees exactly the q and k the
kernel sees and recomputes ``max q . k * scale`` per head (:func:`per_head_max_logits`) under
``no_grad``; the kernel's inputs and result are untouched, so the model computes what it computed
without QK-clip. Only training-mode forwards record (validation does not). An activation-checkpointed
block re-runs its forward in backward and records the same maxima again, which a max ignores.

Masks: the recomputation keeps causal pairs (``j <= i``). FlexAttention's document masks and varlen's
packed sequences allow fewer pairs, so there the measured maximum is an upper bound of the kernel's:
a head may be clipped slightly early, never late.

Not covered: QK-norm models (``q_norm``/``k_norm``: the norm undoes any scaling of the projection
weights, so QK-clip would have no effect; refused), MLA (DeepSeek-V3/Kimi K2 attention; refused by
name), tensor-parallel attention (q/k arrive as DTensors; refused).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dist_marsm.qk_clip import AttentionSpec, QKClip, QKClipSettings, per_head_max_logits


def _canonical(name: str) -> str:
    from torchtitan.components.checkpointer.utils import canonical_fqn

    return canonical_fqn(name)


def attention_specs(model: nn.Module, required: bool = True) -> list[tuple[AttentionSpec, nn.Module]]:
    """(spec, attention module) for every torchtitan ``GQAttention`` in ``model``, in module order."""
    from torchtitan.models.common.attention import BaseAttention, FusedQKVLinear, GQAttention, QKVLinear

    out = []
    for raw, module in model.named_modules():
        if not isinstance(module, BaseAttention):
            continue
        name = _canonical(raw)
        if not isinstance(module, GQAttention):
            raise ValueError(f"QK-clip: attention {name} is a {type(module).__name__}; only GQAttention "
                             "(separate or fused q/k/v projections) is supported")
        if module.q_norm is not None or module.k_norm is not None:
            raise ValueError(f"QK-clip: attention {name} normalizes q and k (qk_norm), which undoes any scaling "
                             "of the projection weights; QK-clip has no effect there, turn it off")
        lin = module.qkv_linear
        geometry = dict(name=name, n_heads=module.n_heads, n_kv_heads=module.n_kv_heads, head_dim=module.head_dim)
        if isinstance(lin, FusedQKVLinear):
            spec = AttentionSpec(**geometry, wqkv=lin.wqkv.weight)
        elif isinstance(lin, QKVLinear):
            spec = AttentionSpec(**geometry, wq=lin.wq.weight, wk=lin.wk.weight)
        else:
            raise ValueError(f"QK-clip: attention {name} projects q/k/v with {type(lin).__name__}; "
                             "supported: QKVLinear, FusedQKVLinear")
        for key, p in spec.weights():
            if getattr(getattr(lin, key), "bias", None) is not None:
                raise ValueError(f"QK-clip: {name}.qkv_linear.{key} has a bias; QK-clip scales weight rows only")
        out.append((spec, module))
    if required and not out:
        raise ValueError("QK-clip: the model has no torchtitan attention layers (GQAttention)")
    return out


@dataclass
class QKClipHooks:
    """A :class:`QKClip` fed by forward pre-hooks; call :meth:`apply` after each optimizer step."""

    clip: QKClip
    handles: list = field(default_factory=list)

    def apply(self) -> dict:
        return self.clip.apply()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _recorder(clip: QKClip, name: str, attention: nn.Module):
    def hook(_inner, args, kwargs):
        if not attention.training:
            return None
        q, k = args[0], args[1]
        if hasattr(q, "to_local") or hasattr(k, "to_local"):
            raise ValueError(f"QK-clip: {name} received DTensor q/k (tensor parallel attention is not supported)")
        clip.record(name, per_head_max_logits(q, k, scale=kwargs.get("scale"), causal=kwargs.get("is_causal", True)))
        return None

    return hook


def install_qk_clip(model: nn.Module | list[nn.Module], settings: QKClipSettings | float | None,
                    process_group=None, optimizer: torch.optim.Optimizer | None = None) -> QKClipHooks:
    """Hooks every attention layer of ``model`` (after FSDP2 wrapping) and returns the recorder/clipper.

    ``model``: a module, or torchtitan's ``model_parts`` (one QKClip, so still one all-reduce per
    step; a pipeline stage's parts keep the full model's layer names). ``settings``: a
    :class:`QKClipSettings` or ``tau``. With ``tau=None`` the maxima are still measured and reduced
    (``stats["max_logit"]``) but no weight is changed. ``optimizer``: run ``apply`` after each of its
    steps (a step post-hook, so e.g. torchtitan's ``OptimizersContainer`` needs no other change); the
    step's stats are then in ``hooks.clip.last_stats``.
    """
    parts = model if isinstance(model, (list, tuple)) else [model]
    found = [item for part in parts for item in attention_specs(part, required=False)]
    if not found:   # a pipeline stage may hold none; the whole job holding none is a mistake
        raise ValueError("QK-clip: the model has no torchtitan attention layers (GQAttention)")
    clip = QKClip([spec for spec, _ in found], settings, process_group=process_group)
    hooks = QKClipHooks(clip)
    for spec, attention in found:
        hooks.handles.append(attention.inner_attention.register_forward_pre_hook(
            _recorder(clip, spec.name, attention), with_kwargs=True))
    if optimizer is not None:
        hooks.handles.append(clip.attach(optimizer))
    return hooks
