"""QK-clip for torchtitan's ``GQAttention``: a forward pre-hook on each ``inner_attention`` recomputes the
per-head max logit from the q and k the kernel sees (its inputs and output untouched), training forwards
only. What is measured, masks, and what is refused (QK-norm, MLA, tensor parallel): docs/attention.md.
"""

import torch
from torch import nn
from torchtitan.components.checkpointer.utils import canonical_fqn
from torchtitan.models.common.attention import BaseAttention, FusedQKVLinear, GQAttention, QKVLinear

from dist_marsm.qk_clip import AttentionSpec, QKClip, QKClipSettings, per_head_max_logits


def attention_specs(model: nn.Module) -> list[tuple[AttentionSpec, nn.Module]]:
    """(spec, attention module) for every torchtitan ``GQAttention`` in ``model``, in module order."""
    out = []
    for name, module in ((canonical_fqn(n), m) for n, m in model.named_modules() if isinstance(m, BaseAttention)):
        lin = getattr(module, "qkv_linear", None)
        if not isinstance(module, GQAttention) or not isinstance(lin, (FusedQKVLinear, QKVLinear)):
            raise ValueError(
                f"QK-clip: attention {name} is a {type(module).__name__} projecting with "
                f"{type(lin).__name__}; supported: GQAttention with QKVLinear or FusedQKVLinear"
            )
        if module.q_norm is not None or module.k_norm is not None:
            raise ValueError(
                f"QK-clip: attention {name} normalizes q and k (qk_norm), which undoes any scaling "
                "of the projection weights; QK-clip has no effect there, turn it off"
            )
        weights = (
            {"wqkv": lin.wqkv.weight} if isinstance(lin, FusedQKVLinear) else {"wq": lin.wq.weight, "wk": lin.wk.weight}
        )
        spec = AttentionSpec(
            name=name, n_heads=module.n_heads, n_kv_heads=module.n_kv_heads, head_dim=module.head_dim, **weights
        )
        for key, _ in spec.weights():
            if getattr(getattr(lin, key), "bias", None) is not None:
                raise ValueError(f"QK-clip: {name}.qkv_linear.{key} has a bias; QK-clip scales weight rows only")
        out.append((spec, module))
    return out


def _recorder(clip: QKClip, name: str, attention: nn.Module):
    def hook(_inner, args, kwargs):
        if attention.training:
            q, k = args[0], args[1]
            if hasattr(q, "to_local") or hasattr(k, "to_local"):
                raise ValueError(f"QK-clip: {name} received DTensor q/k (tensor-parallel attention is not supported)")
            clip.record(
                name, per_head_max_logits(q, k, scale=kwargs.get("scale"), causal=kwargs.get("is_causal", True))
            )

    return hook


def install_qk_clip(
    model: nn.Module | list[nn.Module],
    settings: QKClipSettings | float | None,
    process_group=None,
    optimizer: torch.optim.Optimizer | None = None,
) -> QKClip:
    """A :class:`QKClip` fed by hooks on every attention layer of ``model`` (a module or torchtitan's
    ``model_parts``, after FSDP2 wrapping); ``settings``: :class:`QKClipSettings` or ``tau`` (None: measure
    only). ``optimizer``: run ``apply`` after each of its steps. ``remove()`` detaches the hooks."""
    found = [
        item for part in (model if isinstance(model, (list, tuple)) else [model]) for item in attention_specs(part)
    ]
    if not found:  # a pipeline stage may hold none; the whole job holding none is a mistake
        raise ValueError("QK-clip: the model has no torchtitan attention layers (GQAttention)")
    clip = QKClip([spec for spec, _ in found], settings, process_group=process_group)
    clip.handles += [
        attention.inner_attention.register_forward_pre_hook(_recorder(clip, spec.name, attention), with_kwargs=True)
        for spec, attention in found
    ]
    if optimizer is not None:
        clip.attach(optimizer)
    return clip
