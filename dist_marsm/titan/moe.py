"""``debugmodel_cpu``, a deepseek_v3 flavor that 2 CPU cores train in seconds per step: the debugmodel's
structure (MLA, one dense layer, MoE layers with routed and shared experts, top-k router, expert bias) at
width 128, its experts computing in their parameters' dtype (fp32 on CPU). docs/moe.md.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.distributed.tensor import DTensor
from torchtitan.models import deepseek_v3 as dsv3
from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
from torchtitan.models.common.moe import GroupedExperts

FLAVOR = "debugmodel_cpu"


class ParamDtypeGroupedExperts(GroupedExperts):
    """torchtitan's grouped experts in the parameters' dtype, not always bf16 (CPU's grouped GEMM takes fp32)."""

    @dataclasses.dataclass(kw_only=True, slots=True)
    class Config(GroupedExperts.Config):
        pass

    def forward(self, x_RD: torch.Tensor, num_tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        w1, w2, w3 = (w.to_local() if isinstance(w, DTensor) else w for w in (self.w1_EFD, self.w2_EDF, self.w3_EFD))
        offsets = torch.cumsum(num_tokens_per_expert_E, dim=0, dtype=torch.int32)
        x = x_RD.to(w1.dtype)
        h = torch.nn.functional.silu(self._grouped_mm(A=x, B_t=w1.transpose(-2, -1), offs=offsets))
        h = h * self._grouped_mm(A=x, B_t=w3.transpose(-2, -1), offs=offsets)
        return self._grouped_mm(A=h, B_t=w2.transpose(-2, -1), offs=offsets).type_as(x_RD)


def debugmodel_cpu(
    attn_backend: str, moe_comm_backend: str, non_blocking_capacity_factor: float | None = None, num_mtp_layers: int = 0
):
    """3 layers (1 dense, 2 MoE with 8 experts of [128, 128], top 2, 1 shared), width 128, 4 MLA heads."""
    dim, vocab, rope_dim, hidden = 128, 2048, 16, 128  # CPU's grouped GEMM: widths multiples of 8 (bf16)
    layers = dsv3._build_dsv3_layers(
        n_layers=3,
        n_dense_layers=1,
        dim=dim,
        n_heads=4,
        q_lora_rank=64,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=rope_dim,
        v_head_dim=32,
        mscale=0.70,
        dense_hidden_dim=256,
        moe_hidden_dim=hidden,
        num_experts=8,
        num_shared_experts=1,
        router_top_k=2,
        router_score_func="softmax",
        attn_backend=attn_backend,
        moe_comm_backend=moe_comm_backend,
        non_blocking_capacity_factor=non_blocking_capacity_factor,
        rope=ComplexRoPE.Config(
            dim=rope_dim,
            max_seq_len=4096,
            theta=10000.0,
            scaling="yarn",
            rope_factor=40.0,
            beta_fast=32.0,
            beta_slow=1.0,
            original_seq_len=4096,
        ),
    )
    for layer in layers:
        if layer.moe is not None:
            old = layer.moe.routed_experts.inner_experts
            layer.moe.routed_experts.inner_experts = ParamDtypeGroupedExperts.Config(
                **{f.name: getattr(old, f.name) for f in dataclasses.fields(old) if f.init}
            )
    return dsv3.DeepSeekV3Model.Config(
        vocab_size=vocab,
        dim=dim,
        layers=layers,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim, param_init=dsv3._EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=dim, param_init=dsv3._NORM_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab, param_init=dsv3._output_linear_init(dim)),
        mtp_layers=dsv3._build_mtp_layers(layers[-1], dim=dim, num_mtp_layers=num_mtp_layers),
    )


def register_flavors() -> None:
    """Add ``debugmodel_cpu`` to torchtitan's deepseek_v3 flavors (idempotent)."""
    dsv3.deepseekv3_configs.setdefault(FLAVOR, debugmodel_cpu)
