"""Newton-Schulz orthogonalization (layer 1: tensors in, tensors out).

The quintic iteration of Keller Jordan's Muon, as used by the MARS-M reference: it maps a matrix
G = U S V^T to roughly U S' V^T with S' in about [0.5, 1.5]. Works on a single matrix [A, B] or a
batch [..., A, B]; each matrix in a batch is normalized and iterated on its own, so stacking
same-shape matrices changes nothing but the number of kernel launches.
"""

from __future__ import annotations

import functools

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """'bfloat16'/'float32' (or the torch dtype itself) -> torch dtype."""
    if isinstance(name, torch.dtype):
        if name in _DTYPES.values():
            return name
        raise ValueError(f"unsupported dtype {name}; use one of {sorted(_DTYPES)}")
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; use one of {sorted(_DTYPES)}") from None


def newton_schulz(
    matrices: torch.Tensor,
    steps: int = 5,
    dtype: torch.dtype = torch.bfloat16,
    eps: float = NS_EPS,
) -> torch.Tensor:
    """Orthogonalize the last two dims of ``matrices``; returns a tensor in ``dtype``.

    X = M / (||M||_F + eps), transposed when A > B so the Gram matrix X X^T is the small one;
    then ``steps`` times: S = X X^T; X = a X + (b S + c S S) X.
    """
    if matrices.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a batch of matrices, got shape {tuple(matrices.shape)}")
    a, b, c = NS_COEFFICIENTS
    x = matrices.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)
    mm = _bf16_matmul_via_fp32 if _emulate_bf16_matmul(x) else torch.matmul
    for _ in range(steps):
        s = mm(x, x.mT)
        x = a * x + mm(b * s + c * mm(s, s), x)
    if tall:
        x = x.mT
    return x


@functools.cache
def _cpu_has_native_bf16_matmul() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _emulate_bf16_matmul(x: torch.Tensor) -> bool:
    """On CPUs without bf16 matrix units (no AVX512-BF16/AMX, e.g. AVX2-only), torch's bf16 matmul
    is emulated element by element and runs ~90x slower than float32 (measured: 2.6 s vs 28 ms for
    1024^3 on one thread). There we multiply the bf16 values in float32 and round the product to
    bf16, which is what a bf16 GEMM with float32 accumulation computes anyway."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and not _cpu_has_native_bf16_matmul()


def _bf16_matmul_via_fp32(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return torch.matmul(p.float(), q.float()).to(torch.bfloat16)


def newton_schulz_flops(shape: tuple[int, ...], steps: int = 5) -> int:
    """Matmul FLOPs of ``newton_schulz`` on a matrix (or batch) of ``shape``.

    Per iteration on an m x n matrix with m <= n: 2 m^2 n (X X^T) + 2 m^3 (S S) + 2 m^2 n (product with X).
    """
    *batch, rows, cols = shape
    m, n = min(rows, cols), max(rows, cols)
    count = 1
    for d in batch:
        count *= d
    return count * steps * (4 * m * m * n + 2 * m * m * m)
