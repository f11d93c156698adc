"""Newton-Schulz orthogonalization (layer 1: tensors in, tensors out).

The quintic iteration of Muon, as used by the MARS-M reference: every iteration maps each singular
value s of the (normalized) matrix to p(s) = a s + b s^3 + c s^5 and leaves the singular vectors alone,
so a matrix G = U S V^T comes out as roughly U V^T. Works on a single matrix [A, B] or a batch
[..., A, B]; each matrix of a batch is normalized and iterated on its own, so stacking same-shape
matrices changes nothing but the number of kernel launches.

Two ways to run the same iteration (``method``):

* ``"standard"``: X <- a X + (b S + c S^2) X with S = X X^T, on the m x n matrix (m <= n after the
  transpose), 4 m^2 n + 2 m^3 FLOPs per iteration.
* ``"gram"``: every iterate is X_k = Q_k X_0 with Q_k a polynomial in X_0 X_0^T, so the loop runs on
  m x m matrices only (R = X_k X_k^T, Z = b R + c R^2, Q <- Q (a I + Z), R <- (a I + Z) R (a I + Z))
  and X_0 is multiplied once at the end. The n-sized work drops from every iteration to the first
  Gram product and the final product (plus two products per *restart*, which re-forms X = Q X and
  R = X X^T from scratch, discarding the rounding that R has accumulated). Cheaper when n is well
  above m; where it saves no FLOPs (square and near-square matrices, see ``gram_pays_off``) the
  standard iteration runs instead.

Coefficients are per iteration: ``"muon"`` is (3.4445, -4.7750, 2.0315) every time, ``"polar_express"``
the per-iteration table of Amsel, Persson, Musco and Gower (2025); any explicit list of (a, b, c)
triples is accepted too (``resolve_coefficients``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import torch

NS_EPS = 1e-7
NS_METHODS = ("standard", "gram")

MUON_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

# The Polar Express quintics for the spectrum [1e-3, 1] (arXiv:2505.16932, the coefficient list of the
# paper's code listing, also shipped in its repository): every triple except the last, which is the
# fixed point the later iterations converge to, is divided by the paper's safety factor 1.01 as
# (a / 1.01, b / 1.01^3, c / 1.01^5) so that rounding cannot push a singular value past 1.
_POLAR_EXPRESS_UNSCALED = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
_POLAR_EXPRESS_SAFETY = 1.01
POLAR_EXPRESS_COEFFICIENTS = tuple(
    (a / _POLAR_EXPRESS_SAFETY, b / _POLAR_EXPRESS_SAFETY**3, c / _POLAR_EXPRESS_SAFETY**5)
    for a, b, c in _POLAR_EXPRESS_UNSCALED[:-1]
) + (_POLAR_EXPRESS_UNSCALED[-1],)

# name -> per-iteration triples; iterations past the end of a list repeat its last triple.
NS_COEFFICIENT_SETS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "muon": (MUON_COEFFICIENTS,),
    "polar_express": POLAR_EXPRESS_COEFFICIENTS,
}

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


def resolve_coefficients(spec, steps: int) -> tuple[tuple[float, float, float], ...]:
    """The (a, b, c) triple of each of ``steps`` iterations.

    ``spec`` is a name in ``NS_COEFFICIENT_SETS`` or an explicit sequence of triples: either one
    triple per iteration, or a single triple used for every iteration.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Newton-Schulz steps must be a positive int, got {steps!r}")
    if isinstance(spec, str):
        if spec not in NS_COEFFICIENT_SETS:
            raise ValueError(
                f"unknown Newton-Schulz coefficient set {spec!r}; use one of "
                f"{sorted(NS_COEFFICIENT_SETS)} or a list of (a, b, c) triples"
            )
        table = NS_COEFFICIENT_SETS[spec]
        return tuple(table[min(i, len(table) - 1)] for i in range(steps))
    if isinstance(spec, torch.Tensor) or not isinstance(spec, Sequence) or len(spec) == 0:
        raise ValueError(
            f"Newton-Schulz coefficients must be a set name or a non-empty list of (a, b, c) triples, got {spec!r}"
        )
    triples = []
    for i, triple in enumerate(spec):
        if isinstance(triple, (str, bytes)) or not isinstance(triple, Sequence) or len(triple) != 3:
            raise ValueError(f"Newton-Schulz coefficients: entry {i} must be an (a, b, c) triple, got {triple!r}")
        for name, v in zip("abc", triple):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(
                    f"Newton-Schulz coefficients: entry {i} has {name} = {v!r}; a, b and c must be finite real numbers"
                )
        triples.append(tuple(float(v) for v in triple))
    if len(triples) == 1:
        return tuple(triples) * steps
    if len(triples) != steps:
        raise ValueError(
            f"Newton-Schulz coefficients: {len(triples)} triples given for {steps} steps; "
            "give one triple per step, or a single triple for all of them"
        )
    return tuple(triples)


def _check_method(method: str) -> None:
    if method not in NS_METHODS:
        raise ValueError(f"unknown Newton-Schulz method {method!r}; use one of {NS_METHODS}")


# ------------------------------------------------------------------------------------ FLOP model
def gram_restarts(steps: int, dtype: torch.dtype = torch.bfloat16, coefficients="muon") -> tuple[int, ...]:
    """Iterations before which the Gram form re-forms X = Q X and R = X X^T from scratch.

    R's rounding errors include small negative eigenvalues, which every iteration multiplies by about
    a^2 (positive ones saturate near 1, negative ones do not), so the restart period shrinks as the
    precision drops and the coefficients' a grows. Measured against the exact polar factor
    (docs/benchmarks.md, "Gram Newton-Schulz"): bfloat16 needs a restart every 3 iterations with
    "muon" (a = 3.4) and every 2 with "polar_express" (a up to 8.2) or explicit coefficients;
    float32 needs none within 5 iterations, so it restarts every 5.
    """
    if dtype in (torch.float32, torch.float64):
        period = 5
    else:
        period = 3 if isinstance(coefficients, str) and coefficients == "muon" else 2
    return tuple(range(period, steps, period))


def _standard_flops(m: int, n: int, steps: int) -> int:
    return steps * (4 * m * m * n + 2 * m**3)


def _gram_flops(m: int, n: int, steps: int, restarts: tuple[int, ...]) -> int:
    # X0 X0^T and the final Q X; per restart Q X and X X^T; per iteration R^2, plus Q <- Q P (not on
    # the first iteration after a start) and R <- P R P (two products; not before a restart or at the end).
    updates = steps - 1 - len(restarts)
    return (4 + 4 * len(restarts)) * m * m * n + (2 * steps + 6 * updates) * m**3


def gram_pays_off(
    rows: int, cols: int, steps: int = 5, dtype: torch.dtype = torch.bfloat16, coefficients="muon"
) -> bool:
    """Whether the Gram form needs fewer FLOPs than the standard iteration for one rows x cols matrix.
    Per m^3 with aspect n/m = t: standard 4 K t + 2 K, gram (4 + 4 r) t + 2 K + 6 (K - 1 - r) for K
    steps and r restarts, so the break-even aspect is 1.5 whatever K and r (as long as r < K - 1)."""
    m, n = min(rows, cols), max(rows, cols)
    restarts = gram_restarts(steps, dtype, coefficients)
    return _gram_flops(m, n, steps, restarts) < _standard_flops(m, n, steps)


def method_used(
    shape: tuple[int, ...],
    steps: int = 5,
    method: str = "standard",
    *,
    dtype: torch.dtype = torch.bfloat16,
    coefficients="muon",
) -> str:
    """The method ``newton_schulz`` really runs on ``shape`` (gram falls back where it saves nothing)."""
    _check_method(method)
    if method == "gram" and not gram_pays_off(shape[-2], shape[-1], steps, dtype, coefficients):
        return "standard"
    return method


def newton_schulz_flops(
    shape: tuple[int, ...],
    steps: int = 5,
    method: str = "standard",
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    coefficients="muon",
) -> int:
    """Matmul FLOPs of ``newton_schulz(matrices of shape, steps, dtype, method=..., coefficients=...)``,
    counting the method really run (after the fallback) and its restarts.

    Standard, per iteration on an m x n matrix with m <= n: 2 m^2 n (X X^T) + 2 m^3 (S S) + 2 m^2 n
    (product with X). Gram: see ``_gram_flops``.
    """
    dtype = resolve_dtype(dtype) if isinstance(dtype, str) else dtype
    *batch, rows, cols = shape
    m, n = min(rows, cols), max(rows, cols)
    count = math.prod(batch)
    if method_used(shape, steps, method, dtype=dtype, coefficients=coefficients) == "gram":
        return count * _gram_flops(m, n, steps, gram_restarts(steps, dtype, coefficients))
    return count * _standard_flops(m, n, steps)


# ------------------------------------------------------------------------------------ iteration
def newton_schulz(
    matrices: torch.Tensor,
    steps: int = 5,
    dtype: torch.dtype = torch.bfloat16,
    eps: float = NS_EPS,
    *,
    method: str = "standard",
    coefficients="muon",
    restarts: Sequence[int] | None = None,
) -> torch.Tensor:
    """Orthogonalize the last two dims of ``matrices``; returns a tensor in ``dtype``.

    X = M / (||M||_F + eps), transposed when A > B so the Gram matrix X X^T is the small one, then
    ``steps`` iterations with the (a, b, c) of ``coefficients`` (a set name or explicit triples),
    run by ``method`` ("standard" or "gram"; gram falls back to standard where it saves no FLOPs).
    ``restarts`` is a measurement hook: given, the Gram form runs with exactly those restart
    iterations (default ``gram_restarts(steps, dtype, coefficients)``) and without the fallback.
    """
    if matrices.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a batch of matrices, got shape {tuple(matrices.shape)}")
    coeffs = resolve_coefficients(coefficients, steps)
    _check_method(method)
    if restarts is None:
        method = method_used(tuple(matrices.shape), steps, method, dtype=dtype, coefficients=coefficients)
    x = matrices.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        # A contiguous copy: matrix multiplies on the transposed view run measurably slower on CPU.
        x = x.mT.contiguous()
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)
    batch_shape = x.shape[:-2]
    x = x.reshape(math.prod(batch_shape), *x.shape[-2:])  # 3-D, so every multiply-add is one fused baddbmm
    ops = _EmulatedBF16 if _emulate_bf16_matmul(x) else _Native
    if method == "gram":
        schedule = gram_restarts(steps, dtype, coefficients) if restarts is None else tuple(restarts)
        if any(not 0 < r < steps for r in schedule):
            raise ValueError(f"Gram restarts must lie in [1, {steps - 1}], got {schedule}")
        x = _gram_iteration(x, coeffs, set(schedule), ops)
    else:
        x = _standard_iteration(x, coeffs, ops)
    x = x.reshape(*batch_shape, *x.shape[-2:])
    if tall:
        x = x.mT
    return x


def _standard_iteration(x, coeffs, ops):
    for a, b, c in coeffs:
        s = ops.mm(x, x.mT)
        p = ops.addmm(s, s, s, beta=b, alpha=c)  # b S + c S^2
        x = ops.addmm(x, p, x, beta=a, alpha=1.0)  # a X + (b S + c S^2) X
    return x


def _gram_iteration(x, coeffs, restarts: set[int], ops):
    """X_K = Q_K X_0 with Q, R = X_k X_k^T kept as m x m matrices; R is re-formed at ``restarts``."""
    steps = len(coeffs)
    eye = torch.eye(x.size(-2), dtype=x.dtype, device=x.device).expand(x.size(0), -1, -1)
    r = ops.mm(x, x.mT)
    q = None
    for i, (a, b, c) in enumerate(coeffs):
        if i in restarts:
            x = ops.mm(q, x)
            r = ops.mm(x, x.mT)
            q = None
        z = ops.addmm(r, r, r, beta=b, alpha=c)  # Z = b R + c R^2; this iteration's P = a I + Z
        q = z + a * eye if q is None else ops.addmm(q, q, z, beta=a, alpha=1.0)  # Q <- Q P
        if i + 1 < steps and i + 1 not in restarts:
            rz = ops.addmm(r, r, z, beta=a, alpha=1.0)  # R P
            r = ops.addmm(rz, z, rz, beta=a, alpha=1.0)  # P R P
    return ops.mm(q, x)


class _Native:
    mm = staticmethod(torch.bmm)

    @staticmethod
    def addmm(inp, p, q, beta, alpha):
        return torch.baddbmm(inp, p, q, beta=beta, alpha=alpha)


class _EmulatedBF16:
    """bf16 values multiplied in float32, the product rounded to bf16 (see ``_emulate_bf16_matmul``)."""

    @staticmethod
    def mm(p, q):
        return torch.bmm(p.float(), q.float()).to(torch.bfloat16)

    @staticmethod
    def addmm(inp, p, q, beta, alpha):
        return torch.baddbmm(inp.float(), p.float(), q.float(), beta=beta, alpha=alpha).to(torch.bfloat16)


def _probe_native_bf16_matmul() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# Probed once at import: a constant is what torch.compile can trace, an op call per step is not.
_CPU_HAS_NATIVE_BF16_MATMUL = _probe_native_bf16_matmul()


def _emulate_bf16_matmul(x: torch.Tensor) -> bool:
    """On CPUs without bf16 matrix units (no AVX512-BF16/AMX, e.g. AVX2-only), torch's bf16 matmul is
    emulated element by element, far slower than float32 (figures in docs/benchmarks.md). There we
    multiply the bf16 values in float32 and round the product to bf16, which is what a bf16 GEMM with
    float32 accumulation computes anyway."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and not _CPU_HAS_NATIVE_BF16_MATMUL


# ------------------------------------------------------------------------------------ many matrices
def stack_pays_off(shape: tuple[int, ...], device: torch.device) -> bool:
    """Whether same-shape matrices should be orthogonalized as one batch. Stacking saves kernel
    launches (GPUs) and per-call overhead (small matrices); on CPUs it slows large matrices down
    (cache misses of the stacked copy), so there only small ones are stacked (docs/benchmarks.md,
    benchmarks/bench_single_process.py)."""
    return torch.device(device).type != "cpu" or min(shape[-2:]) <= 128


def orthogonalize_many(
    matrices: Sequence[torch.Tensor],
    steps: int = 5,
    dtype: torch.dtype = torch.bfloat16,
    eps: float = NS_EPS,
    *,
    method: str = "standard",
    coefficients="muon",
) -> list[torch.Tensor]:
    """``newton_schulz`` of every tensor in ``matrices`` (in order), batching same-shape ones where
    ``stack_pays_off``. Every result is what ``newton_schulz`` gives for that tensor alone."""
    by_shape: dict[tuple, list[int]] = defaultdict(list)
    for i, m in enumerate(matrices):
        by_shape[(tuple(m.shape), m.device)].append(i)
    out: list[torch.Tensor | None] = [None] * len(matrices)
    for (shape, device), positions in by_shape.items():
        if len(positions) > 1 and stack_pays_off(shape, device):
            result = newton_schulz(
                torch.stack([matrices[i] for i in positions]),
                steps,
                dtype,
                eps,
                method=method,
                coefficients=coefficients,
            )
            for i, r in zip(positions, result.unbind(0)):
                out[i] = r
        else:
            for i in positions:
                out[i] = newton_schulz(matrices[i], steps, dtype, eps, method=method, coefficients=coefficients)
    return out
