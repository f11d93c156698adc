"""Which parameters MARS-M orthogonalizes and which go to AdamW (layer 3)."""

from __future__ import annotations

import re

import torch

# Token/position embeddings and the output head go to AdamW (MARS-M reference, Moonlight). An MoE
# router's gate is a small classifier head like the output layer (its rows are per-expert logit
# directions fed to a softmax/top-k, and the load-balancing bias acts on those logits), so it goes to
# AdamW too; routed experts ([E, out, in], a batch of E matrices), shared experts and MLA's low-rank
# projections are matrices and go to MARS-M. Reasons and sources: docs/moe.md.
MOE_ROUTER_PATTERN = r"(^|\.)(router\.gate|gate)\.weight$"
DEFAULT_ADAMW_PATTERNS = (
    r"(^|\.)(tok_embeddings|embed_tokens|embeddings?|wte|wpe)\.",
    r"(^|\.)(output|lm_head)\.weight$",
    MOE_ROUTER_PATTERN,
)
# Attention projections whose rows are heads ([heads * head_dim, dim]): query, key, value, fused QKV.
DEFAULT_HEAD_PATTERNS = (r"(^|\.)(wq|wk|wv|wqkv|q_proj|k_proj|v_proj|qkv_proj)\.weight$",)


def build_param_groups(
    model: torch.nn.Module,
    adamw_patterns: tuple[str, ...] = DEFAULT_ADAMW_PATTERNS,
    adamw_lr: float | None = None,
    adamw_weight_decay: float | None = None,
    head_dim: int | None = None,
    head_patterns: tuple[str, ...] = DEFAULT_HEAD_PATTERNS,
) -> list[dict]:
    """Two param groups: matrices for MARS-M (``use_mars=True``) and the rest for AdamW.

    A parameter goes to AdamW if it has ndim < 2, belongs to an ``nn.Embedding``, or its name
    matches one of ``adamw_patterns`` (regular expressions, searched in the full name): by default
    embeddings, the output head and an MoE router's gate. Everything else with ndim >= 2 is a
    matrix or a batch of matrices (MoE expert stacks [E, out, in] are E matrices). Buffers (an MoE
    layer's expert bias and token counts) are not parameters: no optimizer updates them (torchtitan's
    load-balancing hook does). Names are kept in ``param_names`` so errors and plans can name parameters.

    With ``head_dim``, the MARS-M matrices whose names match ``head_patterns`` (attention q/k/v) form a
    third group with ``ns_head_dim=head_dim``: each head's rows are orthogonalized on their own.
    """
    for arg, patterns in (("adamw_patterns", adamw_patterns), ("head_patterns", head_patterns)):
        if isinstance(patterns, (str, bytes)) or not all(isinstance(p, str) for p in patterns):
            raise TypeError(
                f"build_param_groups: {arg} must be a tuple of regular-expression strings, "
                f"got {patterns!r} (a single pattern needs a 1-tuple: ({patterns!r},))"
            )
    compiled = [re.compile(p) for p in adamw_patterns]
    heads = [re.compile(p) for p in head_patterns] if head_dim is not None else []
    embedding_params = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    mars, per_head, adamw = ([], []), ([], []), ([], [])
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        to_adamw = p.ndim < 2 or id(p) in embedding_params or any(c.search(name) for c in compiled)
        target = adamw if to_adamw else per_head if any(c.search(name) for c in heads) else mars
        target[0].append(p)
        target[1].append(name)
    groups = []
    if mars[0]:
        groups.append({"params": mars[0], "param_names": mars[1], "use_mars": True})
    if per_head[0]:
        groups.append({"params": per_head[0], "param_names": per_head[1], "use_mars": True, "ns_head_dim": head_dim})
    if adamw[0]:
        group = {"params": adamw[0], "param_names": adamw[1], "use_mars": False}
        if adamw_lr is not None:
            group["lr"] = adamw_lr
        if adamw_weight_decay is not None:
            group["weight_decay"] = adamw_weight_decay
        groups.append(group)
    return groups
