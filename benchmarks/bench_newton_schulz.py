"""Newton-Schulz alone: standard vs Gram form, coefficient sets, and how orthogonal the result is.

    python benchmarks/bench_newton_schulz.py --part speed        # -> results/bench_newton_schulz_speed.*
    python benchmarks/bench_newton_schulz.py --part accuracy     # -> results/bench_newton_schulz_accuracy.*
    python benchmarks/bench_newton_schulz.py --part plan         # -> results/bench_newton_schulz_plan.*

speed: seconds per matrix (one call, one thread, median of --repeats after a warm-up call) for Llama 3
8B's proportions scaled down (1024 x 1024, 1024 x 3584, 3584 x 1024, 2048 x 7168) and the debug model's
shapes, standard vs gram, float32 and bfloat16, with the FLOPs each method really runs
(``newton_schulz_flops``) and the achieved GFLOP/s. Alongside, the rate of the three matmul shapes the
iterations are made of (m x n by n x m, m x m by m x m, m x m by m x n), so a ratio that differs from
the FLOP ratio can be explained by the kernels' speeds.

accuracy: the result's singular values (min and max; the quintic is not meant to converge to 1) and
its distance to the exact polar factor U V^T of the input (float64 SVD), relative Frobenius norm, after
3, 4 and 5 steps, per method, restart schedule and coefficient set, in float32 and bfloat16. Inputs:
real MARS-M momenta from the debug model after a few steps, Gaussian 1024 x 3584 matrices, and ones
with a log-uniform spectrum (1 down to 1e-4) or a 1/i spectrum (the hard cases: small singular values);
``--large`` adds a 2048 x 7168 one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import llama3_matrix_shapes, lm_loss, make_model, markdown_table, median, save  # noqa: E402

from dist_marsm.newton_schulz import gram_restarts, method_used, newton_schulz, newton_schulz_flops  # noqa: E402

SPEED_SHAPES = [
    (1024, 1024),
    (1024, 3584),
    (3584, 1024),
    (2048, 7168),  # Llama 3 8B proportions, scaled
    (256, 256),
    (256, 688),
    (688, 256),
]  # debug model (wq/wk/wv/wo, w2, w1/w3)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return median(times)


def matmul_rates(m: int, n: int, dtype, repeats: int) -> dict:
    """GFLOP/s of the three product shapes in the iterations, as batched 1 x ... bmm like the code runs them."""
    x = torch.randn(1, m, n, dtype=dtype)
    s = torch.randn(1, m, m, dtype=dtype)
    cases = {
        "XXt": (lambda: torch.bmm(x, x.mT), 2 * m * m * n),
        "SS": (lambda: torch.bmm(s, s), 2 * m**3),
        "SX": (lambda: torch.bmm(s, x), 2 * m * m * n),
    }
    return {k: flops / timed(fn, repeats) / 1e9 for k, (fn, flops) in cases.items()}


def speed(args) -> None:
    rows, records = [], []
    for shape in SPEED_SHAPES:
        reps = min(3, args.repeats) if shape[0] * shape[1] > 4_000_000 else args.repeats
        m, n = min(shape), max(shape)
        g = torch.Generator().manual_seed(0)
        mat = torch.randn(*shape, generator=g)
        for dname, dtype in DTYPES.items():
            rates = matmul_rates(m, n, dtype, reps)
            for coeffs in ("muon", "polar_express"):
                if coeffs == "polar_express" and dname == "float32":
                    continue  # same FLOPs as muon in float32 (no restarts within 5 steps)
                res = {}
                for method in ("standard", "gram"):
                    res[method] = (
                        newton_schulz_flops(shape, 5, method, dtype=dtype, coefficients=coeffs),
                        method_used(shape, 5, method, dtype=dtype, coefficients=coeffs),
                    )
                    newton_schulz(mat, 5, dtype, method=method, coefficients=coeffs)  # warm-up
                times = {"standard": [], "gram": []}
                for rep in range(reps):  # alternating, so load drift on the shared machine hits both alike
                    for method in ("standard", "gram") if rep % 2 == 0 else ("gram", "standard"):
                        t = time.perf_counter()
                        newton_schulz(mat, 5, dtype, method=method, coefficients=coeffs)
                        times[method].append(time.perf_counter() - t)
                paired = median([a / b for a, b in zip(times["standard"], times["gram"])])
                res = {m: (median(times[m]), *res[m]) for m in res}
                (ts, fs, _), (tg, fg, used) = res["standard"], res["gram"]
                restarts = gram_restarts(5, dtype, coeffs) if used == "gram" else "-"
                rec = dict(
                    shape=shape,
                    dtype=dname,
                    coefficients=coeffs,
                    gram_used=used,
                    restarts=restarts,
                    standard_s=ts,
                    gram_s=tg,
                    standard_gflop=fs / 1e9,
                    gram_gflop=fg / 1e9,
                    speedup=ts / tg,
                    paired_speedup=paired,
                    times=times,
                    flop_ratio=fs / fg,
                    standard_gflops=fs / ts / 1e9,
                    gram_gflops=fg / tg / 1e9,
                    matmul_gflops=rates,
                )
                records.append(rec)
                rows.append(
                    [
                        f"{shape[0]} x {shape[1]}",
                        dname,
                        coeffs,
                        f"{used} {restarts}",
                        ts * 1e3,
                        tg * 1e3,
                        ts / tg,
                        paired,
                        fs / fg,
                        fs / 1e9,
                        fg / 1e9,
                        fs / ts / 1e9,
                        fg / tg / 1e9,
                        f"{rates['XXt']:.0f} / {rates['SS']:.0f} / {rates['SX']:.0f}",
                    ]
                )
                print(rows[-1], flush=True)
    headers = [
        "shape",
        "dtype",
        "coefficients",
        "gram runs (restarts)",
        "standard ms",
        "gram ms",
        "speed-up",
        "median paired speed-up",
        "FLOP ratio",
        "standard GFLOP",
        "gram GFLOP",
        "standard GFLOP/s",
        "gram GFLOP/s",
        "matmul GFLOP/s XX^T / SS / SX",
    ]
    md = (
        f"Newton-Schulz, 5 steps, one call per matrix, one thread (torch.set_num_threads(1)), median of "
        f"{args.repeats} calls (2048 x 7168: 3) after a warm-up call, standard and gram alternating; "
        "'paired' is the median of the per-round ratios. Machine shared with other jobs.\n\n"
        + markdown_table(headers, rows)
    )
    print(md)
    save("bench_newton_schulz_speed", {"records": records, "repeats": args.repeats}, md)


# ------------------------------------------------------------------------------------ accuracy
def synthetic(m: int, n: int, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(m, n, generator=g, dtype=torch.float64)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = (
        torch.logspace(0, -4, k, dtype=torch.float64)
        if kind == "log-uniform"
        else 1.0 / torch.arange(1, k + 1, dtype=torch.float64)
    )
    return (u * s) @ v.T


def real_momenta(steps: int) -> dict[str, torch.Tensor]:
    """MARS-M momenta (what Newton-Schulz sees) of the debug model after ``steps`` steps."""
    from dist_marsm import MARSM, build_param_groups

    model = make_model("debug", seed=0)
    opt = MARSM(build_param_groups(model), lr=3e-3, ns_dtype="float32")
    for step in range(steps):
        opt.zero_grad()
        lm_loss(model, step, batch=4, seq=64).backward()
        opt.step()
    named = dict(model.named_parameters())
    return {
        f"debug {name} ({'x'.join(map(str, named[name].shape))})": opt.state[named[name]]["momentum"].double()
        for name in (
            "layers.0.attention.wq.weight",
            "layers.0.feed_forward.w1.weight",
            "layers.0.feed_forward.w2.weight",
            "layers.3.feed_forward.w2.weight",
        )
    }


def measure(mat: torch.Tensor, polar: torch.Tensor, **kw) -> dict:
    y = newton_schulz(mat, **kw).double()
    s = torch.linalg.svdvals(y)
    return {
        "y": y,
        "sv_min": s.min().item(),
        "sv_max": s.max().item(),
        "polar_err": ((y - polar).norm() / polar.norm()).item(),
    }


def accuracy(args) -> None:
    synthetic_inputs = [
        (1024, 3584, "gaussian"),
        (1024, 3584, "log-uniform"),
        (1024, 3584, "1/i"),
        (3584, 1024, "1/i"),
        (256, 1024, "1/i"),
    ] + ([(2048, 7168, "1/i")] if args.large else [])
    inputs = real_momenta(args.momentum_steps)
    inputs.update({f"{k} {m}x{n}": synthetic(m, n, k, seed=i) for i, (m, n, k) in enumerate(synthetic_inputs)})
    rows, records = [], []
    headers = [
        "input",
        "dtype",
        "coefficients",
        "steps",
        "variant",
        "sv min",
        "sv max",
        "||Y - UV^T|| / ||UV^T||",
        "||Y - Y_standard|| / ||Y_standard||",
    ]
    for name, mat in inputs.items():
        u, _, vh = torch.linalg.svd(mat, full_matrices=False)
        polar = u @ vh
        big = mat.numel() > 4_000_000
        for dname, dtype in DTYPES.items():
            for coeffs in ("muon", "polar_express"):
                for steps in (5,) if big else (3, 4, 5):
                    std = measure(mat, polar, steps=steps, dtype=dtype, coefficients=coeffs)
                    variants = [("gram default", None)]
                    if steps == 5:
                        variants += [
                            (f"gram restarts {r}", r)
                            for r in ((), (3,), (2, 4), (2,), (1, 2, 3, 4))
                            if r != gram_restarts(5, dtype, coeffs)
                        ]
                        if dtype == torch.float32:
                            variants = variants[:2]
                    results = [("standard", std)]
                    for label, restarts in variants:
                        r = measure(
                            mat, polar, steps=steps, dtype=dtype, coefficients=coeffs, method="gram", restarts=restarts
                        )
                        if restarts is None:
                            label = f"gram default {gram_restarts(steps, dtype, coeffs)}"
                            if (
                                method_used(tuple(mat.shape), steps, "gram", dtype=dtype, coefficients=coeffs)
                                == "standard"
                            ):
                                label += " (falls back to standard)"
                        r["vs_standard"] = ((r["y"] - std["y"]).norm() / std["y"].norm()).item()
                        results.append((label, r))
                    for label, r in results:
                        rec = dict(
                            input=name,
                            dtype=dname,
                            coefficients=coeffs,
                            steps=steps,
                            variant=label,
                            sv_min=r["sv_min"],
                            sv_max=r["sv_max"],
                            polar_err=r["polar_err"],
                            vs_standard=r.get("vs_standard"),
                        )
                        records.append(rec)
                        rows.append(
                            [
                                name,
                                dname,
                                coeffs,
                                steps,
                                label,
                                r["sv_min"],
                                r["sv_max"],
                                r["polar_err"],
                                r.get("vs_standard"),
                            ]
                        )
                        print(rows[-1], flush=True)
        # saved after every input: on the shared machine a full run takes long
        md = (
            "Singular values of the Newton-Schulz result Y and its distance to the exact polar factor U V^T of "
            "the input (float64 SVD). 'gram default' uses `gram_restarts(steps, dtype, coefficients)`.\n\n"
            + markdown_table(headers, rows)
        )
        save("bench_newton_schulz_accuracy", {"records": records}, md)


# ------------------------------------------------------------------------------------ plan
def plan(args) -> None:
    """Newton-Schulz FLOPs per step of real Llama 3 shapes and the owner plan's balance, per method."""
    from dist_marsm.owner_plan import balance_ratio

    rows, records = [], []
    for model in ("8B", "70B"):
        shapes = llama3_matrix_shapes(model)
        for dname in DTYPES:
            for coeffs in ("muon", "polar_express"):
                total = {
                    m: sum(newton_schulz_flops(s, 5, m, dtype=dname, coefficients=coeffs) for s in shapes)
                    for m in ("standard", "gram")
                }
                gram_share = sum(
                    1 for s in shapes if method_used(s, 5, "gram", dtype=DTYPES[dname], coefficients=coeffs) == "gram"
                ) / len(shapes)
                balance = {w: balance_ratio(shapes, w, "largest_first", 5, "gram", dname, coeffs) for w in (8, 64, 512)}
                rec = dict(
                    model=model,
                    dtype=dname,
                    coefficients=coeffs,
                    standard_tflop=total["standard"] / 1e12,
                    gram_tflop=total["gram"] / 1e12,
                    flop_ratio=total["standard"] / total["gram"],
                    matrices_on_gram=gram_share,
                    gram_balance=balance,
                )
                records.append(rec)
                rows.append(
                    [
                        f"Llama 3 {model}",
                        dname,
                        coeffs,
                        total["standard"] / 1e12,
                        total["gram"] / 1e12,
                        total["standard"] / total["gram"],
                        f"{gram_share:.0%}",
                        " / ".join(f"{balance[w]:.3f}" for w in (8, 64, 512)),
                    ]
                )
    md = (
        "Newton-Schulz FLOPs per optimizer step (5 steps, every matrix of the model once) and the owner plan's "
        "balance with ns_method='gram' (busiest rank over max(total / W, largest matrix), largest-first).\n\n"
        + markdown_table(
            [
                "model",
                "dtype",
                "coefficients",
                "standard TFLOP",
                "gram TFLOP",
                "FLOP ratio",
                "matrices on gram",
                "gram balance 8 / 64 / 512 ranks",
            ],
            rows,
        )
    )
    print(md)
    save("bench_newton_schulz_plan", {"records": records}, md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("speed", "accuracy", "plan"), required=True)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--momentum-steps", type=int, default=10)
    ap.add_argument("--large", action="store_true", help="accuracy: also a 2048 x 7168 input (slow SVDs)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    {"speed": speed, "accuracy": accuracy, "plan": plan}[args.part](args)


if __name__ == "__main__":
    main()
