"""Shared pieces of the benchmark scripts: Llama-like models and shapes, timing, and result files.

Nothing here is imported by the library. Every script prints its table and writes
benchmarks/results/<name>.json and benchmarks/results/<name>.md.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"

# Llama-like configurations: (dim, n_layers, ffn_hidden, vocab, n_heads).
# "debug" is a small Llama-like shape set (6 layers, d 256, MLP 688: 42 matrices, 31.3 GFLOP of NS per step);
# "wide" doubles the width so Newton-Schulz dominates harder, and still fits a 2-core machine.
MODEL_CONFIGS = {
    "debug": dict(dim=256, n_layers=6, ffn=688, vocab=2048, n_heads=8),
    "wide": dict(dim=512, n_layers=3, ffn=1376, vocab=2048, n_heads=8),
}

# Real Llama 3 shapes (Meta's model card / torchtitan's llama3 configs): dim, layers, heads, kv heads,
# FFN hidden (after ffn_dim_multiplier and multiple_of rounding), vocab.
LLAMA3 = {
    "8B": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn=14336, vocab=128256),
    "70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn=28672, vocab=128256),
}


def llama3_matrix_shapes(name: str) -> list[tuple[int, int]]:
    """[out, in] of every matrix MARS-M/Muon orthogonalizes (embeddings and output head go to AdamW)."""
    c = LLAMA3[name]
    head_dim = c["dim"] // c["n_heads"]
    kv = c["n_kv_heads"] * head_dim
    per_layer = [
        (c["dim"], c["dim"]),
        (kv, c["dim"]),
        (kv, c["dim"]),
        (c["dim"], c["dim"]),  # wq wk wv wo
        (c["ffn"], c["dim"]),
        (c["dim"], c["ffn"]),
        (c["ffn"], c["dim"]),
    ]  # w1 w2 w3
    return per_layer * c["n_layers"]


def llama3_params(name: str) -> int:
    """All parameters: the matrices above, embeddings and output head, and the RMSNorm weights."""
    c = LLAMA3[name]
    matrices = sum(math.prod(s) for s in llama3_matrix_shapes(name))
    return matrices + 2 * c["vocab"] * c["dim"] + (2 * c["n_layers"] + 1) * c["dim"]


# One GPU's bf16 dense matmul numbers. "gemm_tflops" is the rate Newton-Schulz is costed at; "peak_tflops" is the
# datasheet peak that MFU is quoted against (H100 SXM and H200 SXM are the same GH100 compute die: both 989).
GPUS = {
    "H100": dict(
        gemm_tflops=989.0,
        peak_tflops=989.0,
        hbm_tbs=3.35,
        source="H100 SXM datasheet peak, dense bf16 (1979 with sparsity); not measured, so its ms are optimistic",
    ),
    "H200": dict(
        gemm_tflops=790.0,
        peak_tflops=989.0,
        hbm_tbs=4.8,
        source="bf16 dense GEMM measured at about 790 TFLOP/s on one H200 in an earlier session of this "
        "project (80% of the 989 datasheet peak; no result file in this repository)",
    ),
}
TOKENS_PER_STEP = 4 * 2**20  # 4M tokens per optimizer step (e.g. 1024 sequences of 4096)
MFU = 0.40  # model FLOPs utilization of the forward + backward, against the datasheet peak


def train_step_seconds(model: str, world: int, gpu: str, tokens: int = TOKENS_PER_STEP, mfu: float = MFU) -> float:
    """Forward + backward time of one step: 6 x parameters x tokens FLOPs (attention FLOPs left out),
    split evenly over ``world`` GPUs running at ``mfu`` of the datasheet peak."""
    return 6 * llama3_params(model) * tokens / (world * mfu * GPUS[gpu]["peak_tflops"] * 1e12)


# ---------------------------------------------------------------- model
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (
            w(x).view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for w in (self.wq, self.wk, self.wv)
        )
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, dim: int, n_heads: int, ffn: int):
        super().__init__()
        self.attention_norm = RMSNorm(dim)
        self.attention = Attention(dim, n_heads)
        self.ffn_norm = RMSNorm(dim)
        self.feed_forward = FeedForward(dim, ffn)

    def forward(self, x):
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class LlamaLike(nn.Module):
    """Llama-style decoder with torchtitan's parameter names (tok_embeddings, layers.N..., norm, output)."""

    def __init__(self, dim: int, n_layers: int, ffn: int, vocab: int, n_heads: int):
        super().__init__()
        self.vocab = vocab
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, n_heads, ffn) for _ in range(n_layers))
        self.norm = RMSNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)
        for name, p in self.named_parameters():
            if p.ndim == 2:
                nn.init.normal_(p, std=0.02 if "tok_embeddings" in name else 1.0 / math.sqrt(p.shape[1]))

    def forward(self, tokens):
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h))


def make_model(config: str, seed: int = 0, device="cpu") -> LlamaLike:
    torch.manual_seed(seed)
    return LlamaLike(**MODEL_CONFIGS[config]).to(device)


def lm_loss(model: LlamaLike, step: int, batch: int, seq: int, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 + step)
    tokens = torch.randint(0, model.vocab, (batch, seq + 1), generator=g).to(device)
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), tokens[:, 1:].reshape(-1))


def matrix_shapes(model: nn.Module) -> list[tuple[int, ...]]:
    """Shapes of the parameters MARS-M orthogonalizes (same rule as build_param_groups)."""
    from dist_marsm import build_param_groups

    groups = build_param_groups(model)
    return [tuple(p.shape) for g in groups if g["use_mars"] for p in g["params"]]


# ---------------------------------------------------------------- devices and optimizers
def sync(device) -> None:
    """Waits for the kernels queued on a CUDA device (nothing to wait for on CPU), so wall-clock spans cover them."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def state_bytes(optimizer) -> int:
    """Bytes of the optimizer's state tensors as this process stores them (a DTensor's local shard), counted;
    0-d step counters left out."""
    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.ndim > 0:
                v = v.to_local() if hasattr(v, "to_local") else v
                total += v.numel() * v.element_size()
    return total


# ---------------------------------------------------------------- numbers and files
def median(xs):
    return statistics.median(xs) if xs else float("nan")


def machine_info() -> dict:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        commit = ""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": commit,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def fmt(x, digits=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.{max(digits - 1, 1)}f}" if abs(x) < 100 else f"{x:.1f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def save(name: str, data: dict, markdown: str) -> None:
    """Write results/<name>.json and results/<name>.md (the markdown starts with machine and command)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = data.setdefault("machine", machine_info())
    header = (
        f"Measured {info['date_utc']} on {info['cpu']} ({info['cores']} cores"
        f"{', GPU ' + info['gpu'] if info.get('gpu') else ', no GPU'}), torch {info['torch']}, "
        f"commit {info['commit']}.\nCommand: `{info['command']}`\n\n"
    )
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    (RESULTS / f"{name}.md").write_text(header + markdown + "\n")
    print(f"\nsaved {RESULTS / (name + '.json')} and {RESULTS / (name + '.md')}")


class Combined:
    """Several optimizers stepped together (a Muon for matrices + AdamW for the rest)."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    @property
    def state(self):
        merged = {}
        for o in self.optimizers:
            merged.update(o.state)
        return merged
