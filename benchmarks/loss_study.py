"""Loss study: AdamW, Muon, MARS-M (approx / efficient / exact) and NorMuon-style at equal steps.

Single process, CPU. A tiny torchtitan llama3 (``torchtitan.models.llama3.Llama3Model``, built from a
config in this file with causal ``ScaledDotProductAttention`` as the inner attention: torchtitan 0.3.0's
language-model configs only offer FlexAttention/varlen, which need torch.compile, so the SDPA module is
put in directly) trained byte-level on the text of Python's own ``pydoc_data.topics`` (about 465 KB,
embedded in every CPython install): the first 90 % trains, the last 10 % is the held-out validation split.

Protocol (the benchmarking literature's point: tune every baseline):
  1. learning-rate sweep, one seed, per optimizer (a grid around the published 6e-3; extended by one
     point when the best is at the edge of the grid);
  2. three seeds (seed = init + data order, shared across optimizers) at each optimizer's best lr;
  3. MARS-M's gamma and the schedule (cosine vs WSD) at the approx variant's best lr.
Warm-up then cosine decay to 1 % of the peak, weight decay 0.1 everywhere, global grad-norm clip 1.0.

One command regenerates everything, running only the runs whose cached result is missing:
    python benchmarks/loss_study.py            # full study -> docs/loss_study.md, docs/loss_study.png
    python benchmarks/loss_study.py --quick    # tiny smoke version -> benchmarks/results/loss_study/quick/
    python benchmarks/loss_study.py --no-run   # aggregate the cached runs only
Each training run is a separate process under ``flock /tmp/dist_marsm_cpu.lock`` (one run per lock
acquisition) and caches its result in ``benchmarks/results/loss_study/<name>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "loss_study"
LOCK = "/tmp/dist_marsm_cpu.lock"
THREADS = 2


# ----------------------------------------------------------------------------- configuration
@dataclasses.dataclass(frozen=True)
class ModelCfg:
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    ffn_multiple_of: int = 64
    vocab: int = 256  # bytes
    rope_theta: float = 10000.0


@dataclasses.dataclass(frozen=True)
class TrainCfg:
    steps: int = 200
    batch: int = 16
    seq: int = 128
    warmup: int = 20
    min_lr_frac: float = 0.01
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 20
    eval_seqs: int = 96  # fixed validation subset for the curves
    val_frac: float = 0.1


# Optimizers: name -> (kind, fixed kwargs). lr, weight decay and gamma overrides come per run.
OPTIMIZERS = {
    "adamw": ("adamw", {}),
    "muon": ("marsm", {"variant": "approx", "gamma": 0.0}),
    "marsm_approx": ("marsm", {"variant": "approx", "gamma": 0.025}),
    "marsm_efficient": ("marsm", {"variant": "efficient", "gamma": 0.025}),
    "marsm_exact": ("marsm", {"variant": "exact", "gamma": 0.025}),
    "normuon": ("marsm", {"variant": "approx", "gamma": 0.0, "normalize": "neuron"}),
    "marsm_neuron": ("marsm", {"variant": "approx", "gamma": 0.025, "normalize": "neuron"}),
    # --ns-study: Newton-Schulz method and coefficients at MARS-M approx's lr ("marsm_standard" is
    # marsm_approx rerun with the same code as the other two, so the comparison is paired).
    "marsm_standard": ("marsm", {"variant": "approx", "gamma": 0.025}),
    "marsm_gram": ("marsm", {"variant": "approx", "gamma": 0.025, "ns_method": "gram"}),
    "marsm_polar_express": ("marsm", {"variant": "approx", "gamma": 0.025, "ns_coefficients": "polar_express"}),
}
LABELS = {
    "adamw": "AdamW (torch)",
    "muon": "Muon (MARSM gamma=0)",
    "marsm_approx": "MARS-M approx",
    "marsm_efficient": "MARS-M efficient",
    "marsm_exact": "MARS-M exact",
    "normuon": "NorMuon-style (gamma=0, normalize=neuron)",
    "marsm_neuron": "MARS-M approx + normalize=neuron",
    "marsm_standard": "MARS-M approx, standard Newton-Schulz (muon coefficients)",
    "marsm_gram": "MARS-M approx, ns_method=gram",
    "marsm_polar_express": "MARS-M approx, ns_coefficients=polar_express (5 steps)",
}
NS_STUDY = ("marsm_standard", "marsm_gram", "marsm_polar_express")

# Learning-rate grids. The published peak lr is 6e-3 for both MARS-M and Moonlight-Muon (GPT-2 small,
# docs/../shared reference-hyperparameters.md). A smoke run showed the Muon family needing a larger lr
# than AdamW on this tiny model (Moonlight scaling gives matrices an update RMS of 0.2 * lr, while Adam's
# early updates are closer to lr), so its grid is one octave higher; both grids contain 6e-3 and 1.2e-2.
ADAMW_LRS = (3e-3, 6e-3, 1.2e-2)
MUON_LRS = (6e-3, 1.2e-2, 2.4e-2)
# CPU time on the shared 2-core machine bounded the study: the full grid is swept for AdamW, Muon and MARS-M
# approx; the other MARS-M variants and NorMuon-style only at the grid's upper two points (the lower one lost
# by far for Muon and MARS-M approx). Edges are extended as usual. The gamma/schedule investigation
# (investigate=True) did not run.
SWEPT = ("adamw", "muon", "marsm_approx")
FULL = dict(
    model=ModelCfg(),
    train=TrainCfg(),
    lrs={o: (ADAMW_LRS if o == "adamw" else MUON_LRS if o in SWEPT else MUON_LRS[1:]) for o in OPTIMIZERS},
    seeds=(0, 1, 2),
    gammas=(0.01, 0.05, 0.1),
    optimizers=("adamw", "muon", "marsm_approx", "marsm_efficient", "marsm_exact", "normuon"),
    extend_edges=True,
    investigate=False,
)
QUICK = dict(
    model=ModelCfg(dim=64, n_layers=2, n_heads=2),
    train=TrainCfg(steps=30, batch=8, seq=64, warmup=5, eval_every=10, eval_seqs=16),
    lrs={o: (6e-3,) for o in OPTIMIZERS},
    seeds=(0,),
    gammas=(),
    optimizers=tuple(OPTIMIZERS),
    extend_edges=False,
    investigate=False,
)


def lr_key(lr: float) -> str:
    """lr in cache file names (one significant digit: names only; the cache checks the exact lr)."""
    return f"{lr:.0e}".replace("e-0", "e-").replace("+0", "")


def lr_name(lr: float) -> str:
    """lr for tables and legends."""
    return f"{lr:g}"


def run_name(opt: str, lr: float, seed: int, gamma: float | None = None, schedule: str = "cosine") -> str:
    name = f"{opt}_lr{lr_key(lr)}_s{seed}"
    if gamma is not None:
        name += f"_g{gamma:g}"
    if schedule != "cosine":
        name += f"_{schedule}"
    return name


def run_spec(study: dict, opt: str, lr: float, seed: int, gamma: float | None = None, schedule: str = "cosine") -> dict:
    return {
        "name": run_name(opt, lr, seed, gamma, schedule),
        "optimizer": opt,
        "lr": lr,
        "seed": seed,
        "gamma": gamma,
        "schedule": schedule,
        "model": dataclasses.asdict(study["model"]),
        "train": dataclasses.asdict(study["train"]),
    }


# ----------------------------------------------------------------------------- data
def corpus_bytes() -> bytes:
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    return text.encode("utf-8")


def splits(val_frac: float):
    import torch

    data = torch.frombuffer(bytearray(corpus_bytes()), dtype=torch.uint8).long()
    n_val = int(len(data) * val_frac)
    return data[:-n_val], data[-n_val:]


# ----------------------------------------------------------------------------- model
def build_model(cfg: ModelCfg):
    """torchtitan 0.3.0's Llama3Model with a tiny config and causal SDPA inner attention."""
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm, compute_ffn_hidden_dim
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.common.config_utils import make_ffn_config, make_gqa_config
    from torchtitan.models.llama3 import (
        _EMBEDDING_INIT,
        _LINEAR_INIT,
        _NORM_INIT,
        Llama3Model,
        Llama3TransformerBlock,
        _depth_init,
        _output_linear_init,
    )

    dim, heads = cfg.dim, cfg.n_heads
    hidden = compute_ffn_hidden_dim(dim, multiple_of=cfg.ffn_multiple_of)
    rope = ComplexRoPE.Config(dim=dim // heads, max_seq_len=4096, theta=cfg.rope_theta, scaling="none")
    layers = []
    for i in range(cfg.n_layers):
        layers.append(
            Llama3TransformerBlock.Config(
                attention_norm=RMSNorm.Config(normalized_shape=dim, param_init=_NORM_INIT),
                ffn_norm=RMSNorm.Config(normalized_shape=dim, param_init=_NORM_INIT),
                attention=make_gqa_config(
                    dim=dim,
                    n_heads=heads,
                    wqkv_param_init=_LINEAR_INIT,
                    wo_param_init=_depth_init(i),
                    inner_attention=ScaledDotProductAttention.Config(),
                    fuse_qkv=False,
                    rope=rope,
                ),
                feed_forward=make_ffn_config(
                    dim=dim, hidden_dim=hidden, w1_param_init=_LINEAR_INIT, w2w3_param_init=_depth_init(i)
                ),
            )
        )
    config = Llama3Model.Config(
        dim=dim,
        vocab_size=cfg.vocab,
        tok_embeddings=Embedding.Config(num_embeddings=cfg.vocab, embedding_dim=dim, param_init=_EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=dim, param_init=_NORM_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=cfg.vocab, param_init=_output_linear_init(dim)),
        layers=layers,
    )
    model = config.build()
    model.init_states()
    return model


# ----------------------------------------------------------------------------- one run
def lr_multiplier(step: int, t: TrainCfg, schedule: str) -> float:
    """step is 0-based. Linear warm-up, then cosine (or WSD: flat, last 20 % linear) down to min_lr_frac."""
    if step < t.warmup:
        return (step + 1) / t.warmup
    if schedule == "wsd":
        decay_start = int(0.8 * t.steps)
        if step < decay_start:
            return 1.0
        frac = (step - decay_start) / max(1, t.steps - 1 - decay_start)
        return 1.0 - (1.0 - t.min_lr_frac) * frac
    frac = (step - t.warmup) / max(1, t.steps - 1 - t.warmup)
    return t.min_lr_frac + (1.0 - t.min_lr_frac) * 0.5 * (1.0 + math.cos(math.pi * frac))


def make_optimizer(model, spec: dict, weight_decay: float):
    import torch

    kind, kwargs = OPTIMIZERS[spec["optimizer"]]
    if kind == "adamw":
        return torch.optim.AdamW(
            model.parameters(), lr=spec["lr"], betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay, foreach=True
        )
    from dist_marsm import MARSM, build_param_groups

    kwargs = dict(kwargs)
    if spec["gamma"] is not None:
        kwargs["gamma"] = spec["gamma"]
    return MARSM(
        build_param_groups(model),
        lr=spec["lr"],
        momentum=0.95,
        weight_decay=weight_decay,
        adamw_betas=(0.9, 0.95),
        adamw_eps=1e-8,
        lr_adjust="moonlight",
        ns_steps=5,
        ns_dtype="bfloat16",
        **kwargs,
    )


def train_one(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(THREADS)
    mcfg, t = ModelCfg(**spec["model"]), TrainCfg(**spec["train"])
    train, val = splits(t.val_frac)
    torch.manual_seed(spec["seed"])
    model = build_model(mcfg)
    n_params = sum(p.numel() for p in model.parameters())
    opt = make_optimizer(model, spec, t.weight_decay)
    exact = OPTIMIZERS[spec["optimizer"]][1].get("variant") == "exact"

    gen = torch.Generator().manual_seed(1000 + spec["seed"])  # data order: same for every optimizer
    n_windows = len(val) // (t.seq + 1)
    val_windows = val[: n_windows * (t.seq + 1)].view(n_windows, t.seq + 1)
    val_curve_windows = val_windows[torch.linspace(0, n_windows - 1, min(t.eval_seqs, n_windows)).long()]

    def loss_of(batch):
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())

    @torch.no_grad()
    def evaluate(windows):
        total, count = 0.0, 0
        for i in range(0, len(windows), 32):
            b = windows[i : i + 32]
            total += float(loss_of(b)) * len(b)
            count += len(b)
        return total / count

    curve_steps, curve_val, train_losses = [0], [evaluate(val_curve_windows)], []
    grad_evals = 0
    start = time.perf_counter()
    for step in range(t.steps):
        mult = lr_multiplier(step, t, spec["schedule"])
        for g in opt.param_groups:
            g["lr"] = spec["lr"] * mult
        starts = torch.randint(0, len(train) - t.seq - 1, (t.batch,), generator=gen)
        batch = torch.stack([train[s : s + t.seq + 1] for s in starts.tolist()])

        def closure():
            nonlocal grad_evals
            model.zero_grad(set_to_none=True)
            loss = loss_of(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            grad_evals += 1
            return loss

        if exact:
            loss = opt.step(closure)
        else:
            loss = closure()
            opt.step()
        loss = float(loss.detach())
        if not math.isfinite(loss):
            train_losses.append(loss)
            break
        train_losses.append(loss)
        if (step + 1) % t.eval_every == 0 or step + 1 == t.steps:
            curve_steps.append(step + 1)
            curve_val.append(evaluate(val_curve_windows))
    train_time = time.perf_counter() - start
    final_full = evaluate(val_windows) if math.isfinite(train_losses[-1]) else float("nan")
    return {
        **spec,
        "n_params": n_params,
        "curve_steps": curve_steps,
        "curve_val": curve_val,
        "train_losses": train_losses,
        "final_val_subset": curve_val[-1],
        "final_val": final_full,
        "val_tokens": int(n_windows * t.seq),
        "grad_evals": grad_evals,
        "train_time_s": train_time,
        "threads": THREADS,
        "torch": torch.__version__,
        "host": platform.node(),
        "finished_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------- orchestration
def cache_path(out: Path, name: str) -> Path:
    return out / f"{name}.json"


def load_cached(out: Path, spec: dict) -> dict | None:
    path = cache_path(out, spec["name"])
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    keys = ("optimizer", "lr", "seed", "gamma", "schedule", "model", "train")
    if any(result.get(k) != spec[k] for k in keys):
        print(f"  stale cache {path.name} (config changed); rerunning", flush=True)
        return None
    return result


def ensure(out: Path, spec: dict, allow_run: bool) -> dict | None:
    cached = load_cached(out, spec)
    if cached is not None or not allow_run:
        return cached
    print(f"[{time.strftime('%H:%M:%S')}] run {spec['name']} (waiting for {LOCK})", flush=True)
    cmd = [
        "flock",
        LOCK,
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        json.dumps(spec),
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode != 0:
        print(f"  run {spec['name']} failed with exit code {proc.returncode}", flush=True)
        return None
    result = load_cached(out, spec)
    if result:
        print(f"  {spec['name']}: final val {result['final_val']:.4f} in {result['train_time_s']:.0f} s", flush=True)
    return result


def score(r: dict | None) -> float:
    v = r["final_val"] if r else float("nan")
    return v if math.isfinite(v) else float("inf")


def study_runs(study: dict, out: Path, allow_run: bool) -> dict:
    """Runs the protocol, phase by phase (cheap and essential first); returns every result by name."""
    results = {}

    def get(opt, lr, seed, gamma=None, schedule="cosine"):
        spec = run_spec(study, opt, lr, seed, gamma, schedule)
        r = ensure(out, spec, allow_run)
        if r:
            results[spec["name"]] = r
        return r

    seed0 = study["seeds"][0]
    sweep, best = {}, {}
    # 1. lr sweep at seed 0
    # grid points interleaved across optimizers (middle, then high, then low) so that a partial study
    # (the CPU is shared) already compares every optimizer
    sweep = {opt: {} for opt in study["optimizers"]}
    n_grid = max(len(v) for v in study["lrs"].values())
    for idx in sorted(range(n_grid), key=lambda i: (i != n_grid // 2, -i)):
        for opt in study["optimizers"]:
            lrs = study["lrs"][opt]
            if idx < len(lrs):
                sweep[opt][lrs[idx]] = get(opt, lrs[idx], seed0)
    # 1b. extend the grid by one point (x2 or /2) where the best lr sits on its edge
    if study["extend_edges"]:
        for opt in study["optimizers"]:
            lrs = sorted(lr for lr, r in sweep[opt].items() if r)
            if len(lrs) < 2:
                continue
            b = min(lrs, key=lambda lr: score(sweep[opt][lr]))
            if b == lrs[-1]:
                sweep[opt][b * 2] = get(opt, b * 2, seed0)
            elif b == lrs[0]:
                sweep[opt][b / 2] = get(opt, b / 2, seed0)
    for opt in study["optimizers"]:
        done = {lr: r for lr, r in sweep[opt].items() if r}
        if done:
            best[opt] = min(done, key=lambda lr: score(done[lr]))
    # 2. seeds at the best lr
    for seed in study["seeds"][1:]:
        for opt in study["optimizers"]:
            if opt in best:
                get(opt, best[opt], seed)
    # 3. gamma and schedule at MARS-M approx's best lr (seed 0; gamma 0 is Muon at that lr)
    investigation = {}
    if study["investigate"] and "marsm_approx" in best:
        lr = best["marsm_approx"]
        investigation = {"lr": lr, "gamma": {}, "schedule": {}}
        investigation["gamma"][0.0] = get("marsm_approx", lr, seed0, gamma=0.0)
        investigation["gamma"][0.025] = sweep["marsm_approx"].get(lr)
        for gamma in study["gammas"]:
            investigation["gamma"][gamma] = get("marsm_approx", lr, seed0, gamma=gamma)
        for opt in ("muon", "marsm_approx"):
            if opt in best:
                investigation["schedule"][opt] = {
                    "lr": best[opt],
                    "cosine": sweep[opt].get(best[opt]),
                    "wsd": get(opt, best[opt], seed0, schedule="wsd"),
                }
    return {"results": results, "sweep": sweep, "best": best, "investigation": investigation}


# ----------------------------------------------------------------------------- aggregation
def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return float("nan"), float("nan"), 0
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd, len(xs)


def first_step_below(steps, values, target):
    """First step (linearly interpolated between evaluations) at which the curve reaches target."""
    for i in range(1, len(values)):
        if values[i] <= target:
            v0, v1, s0, s1 = values[i - 1], values[i], steps[i - 1], steps[i]
            return s0 + (s1 - s0) * ((v0 - target) / (v0 - v1) if v0 != v1 else 1.0)
    return None


def aggregate(study: dict, state: dict, out: Path, doc_md: Path, doc_png: Path, command: str) -> dict:
    results, sweep, best = state["results"], state["sweep"], state["best"]
    seeds = study["seeds"]
    rows = {}
    for opt in study["optimizers"]:
        if opt not in best:
            continue
        runs = [results.get(run_name(opt, best[opt], s)) for s in seeds]
        runs = [r for r in runs if r]
        finals = [r["final_val"] for r in runs]
        m, sd, n = mean_std(finals)
        steps = runs[0]["curve_steps"]
        curves = [r["curve_val"] for r in runs if len(r["curve_val"]) == len(steps)]
        mean_curve = [sum(c[i] for c in curves) / len(curves) for i in range(len(steps))] if curves else []
        rows[opt] = {
            "lr": best[opt],
            "final_val_mean": m,
            "final_val_std": sd,
            "n_seeds": n,
            "final_val_per_seed": {r["seed"]: r["final_val"] for r in runs},
            "final_val_min": min(finals) if finals else None,
            "final_val_max": max(finals) if finals else None,
            "curve_steps": steps,
            "mean_curve": mean_curve,
            "train_time_s_mean": mean_std([r["train_time_s"] for r in runs])[0],
            "grad_evals_per_step": runs[0]["grad_evals"] / max(1, len(runs[0]["train_losses"])),
        }
    # steps to reach AdamW's final validation loss (on the curve subset, seed-mean curves)
    target = rows["adamw"]["mean_curve"][-1] if "adamw" in rows and rows["adamw"]["mean_curve"] else None
    for row in rows.values():
        row["steps_to_adamw"] = (
            first_step_below(row["curve_steps"], row["mean_curve"], target)
            if target is not None and row["mean_curve"]
            else None
        )
    # paired differences (same seeds = same init and data) against Muon and AdamW
    for ref in ("muon", "adamw"):
        if ref not in rows:
            continue
        for row in rows.values():
            diffs = [
                row["final_val_per_seed"][s] - rows[ref]["final_val_per_seed"][s]
                for s in row["final_val_per_seed"]
                if s in rows[ref]["final_val_per_seed"]
            ]
            m, sd, n = mean_std(diffs)
            row[f"paired_diff_vs_{ref}"] = {"mean": m, "std": sd, "n": n}
    any_run = next(iter(results.values()), None)
    summary = {
        "study": {
            "model": dataclasses.asdict(study["model"]),
            "train": dataclasses.asdict(study["train"]),
            "lrs": {o: list(v) for o, v in study["lrs"].items()},
            "seeds": list(seeds),
            "optimizers": list(study["optimizers"]),
            "optimizer_settings": {k: v[1] for k, v in OPTIMIZERS.items()},
        },
        "machine": machine_info(results),
        "n_params": any_run["n_params"] if any_run else None,
        "val_tokens": any_run["val_tokens"] if any_run else None,
        "adamw_target_subset": target,
        "rows": rows,
        "sweep": {
            opt: {
                lr_name(lr): (None if r is None else r["final_val"] if math.isfinite(r["final_val"]) else "diverged")
                for lr, r in sorted(s.items())
            }
            for opt, s in sweep.items()
        },
        "investigation": _investigation_summary(state["investigation"]),
        "command": command,
        "generated_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    plot(study, rows, results, state, doc_png)
    write_markdown(summary, doc_md, doc_png)
    return summary


def _investigation_summary(inv: dict) -> dict:
    if not inv:
        return {}
    return {
        "lr": inv["lr"],
        "gamma": {f"{g:g}": (r["final_val"] if r else None) for g, r in sorted(inv["gamma"].items())},
        "schedule": {
            opt: {"lr": d["lr"], **{k: (d[k]["final_val"] if d[k] else None) for k in ("cosine", "wsd")}}
            for opt, d in inv["schedule"].items()
        },
    }


def machine_info(results: dict) -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    dates = sorted(r["finished_utc"] for r in results.values())
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "threads_per_run": THREADS,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "runs_finished_between": [dates[0], dates[-1]] if dates else None,
    }


def plot(study, rows, results, state, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    ax = axes[0]
    for opt, row in rows.items():
        if not row["mean_curve"]:
            continue
        (line,) = ax.plot(
            row["curve_steps"],
            row["mean_curve"],
            label=f"{LABELS[opt]} lr={lr_name(row['lr'])} ({row['n_seeds']} seeds)",
        )
        for s in study["seeds"]:
            r = results.get(run_name(opt, row["lr"], s))
            if r and len(r["curve_val"]) == len(row["curve_steps"]):
                ax.plot(r["curve_steps"], r["curve_val"], color=line.get_color(), alpha=0.2, lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte, curve subset)")
    ax.set_title("Validation loss, best lr per optimizer (thin: seeds)")
    finals = [row["mean_curve"][-1] for row in rows.values() if row["mean_curve"]]
    if finals:
        ax.set_ylim(min(finals) - 0.05, min(finals) + 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1]
    for opt, s in state["sweep"].items():
        pts = sorted((lr, r["final_val"]) for lr, r in s.items() if r and math.isfinite(r["final_val"]))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=LABELS[opt])
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss (seed 0)")
    ax.set_title("Learning-rate sweep")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(x, nd=4):
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def write_markdown(summary: dict, path: Path, png: Path) -> None:
    """The generated part: tables. The verdict section is kept from the existing file if present."""
    rows, st = summary["rows"], summary["study"]
    t, m = st["train"], st["model"]
    lines = [
        "<!-- GENERATED by benchmarks/loss_study.py: tables between the markers are rewritten on every run -->",
        "<!-- BEGIN GENERATED -->",
        f"Command: `{summary['command']}`  ",
        f"Generated: {summary['generated_utc']}; machine: {summary['machine']['cpu']}, "
        f"{summary['machine']['logical_cpus']} logical CPUs (shared), {summary['machine']['threads_per_run']} "
        f"threads per run, torch {summary['machine']['torch']}, Python {summary['machine']['python']}; runs "
        f"finished between {summary['machine']['runs_finished_between']}.",
        "",
        f"Model: torchtitan 0.3.0 `Llama3Model`, dim {m['dim']}, {m['n_layers']} layers, {m['n_heads']} heads, "
        f"SwiGLU (hidden multiple of {m['ffn_multiple_of']}), RoPE theta {m['rope_theta']:g}, byte vocabulary "
        f"{m['vocab']}, causal SDPA, separate wq/wk/wv; {summary['n_params']:,} parameters. "
        f"Data: `pydoc_data.topics` bytes, last {t['val_frac']:.0%} held out ({summary['val_tokens']:,} "
        f"validation tokens). Training: {t['steps']} steps x {t['batch']} x {t['seq']} tokens, warm-up "
        f"{t['warmup']} steps then cosine to {t['min_lr_frac']:.0%} of the peak, weight decay "
        f"{t['weight_decay']}, global grad-norm clip {t['grad_clip']}.",
        "",
        "| optimizer | lr (best of the sweep points run so far) | final val loss, mean ± std | seeds (min..max) | Δ vs Muon (paired) | Δ vs AdamW (paired) | steps to AdamW's final loss | grad evals/step | s/run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(rows, key=lambda o: rows[o]["final_val_mean"])
    for opt in order:
        r = rows[opt]
        dm, da = r.get("paired_diff_vs_muon"), r.get("paired_diff_vs_adamw")
        pd = lambda d: (
            "—" if not d or d["n"] == 0 else f"{d['mean']:+.4f}" + (f" ± {d['std']:.4f}" if d["n"] > 1 else " (1 seed)")
        )
        stp = r["steps_to_adamw"]
        stp_txt = "not reached" if stp is None else f"{stp:.0f} / {t['steps']}"
        lines.append(
            f"| {LABELS[opt]} | {lr_name(r['lr'])} | {fmt(r['final_val_mean'])} ± {fmt(r['final_val_std']) if r['n_seeds'] > 1 else 'n/a (1 seed)'} "
            f"| {r['n_seeds']} ({fmt(r['final_val_min'])}..{fmt(r['final_val_max'])}) | {pd(dm)} | {pd(da)} "
            f"| {stp_txt} "
            f"| {r['grad_evals_per_step']:.0f} | {r['train_time_s_mean']:.0f} |"
        )
    lines += [
        "",
        f"Final validation loss is on the whole held-out split; the curves and the steps-to-AdamW column "
        f"use a fixed subset of {t['eval_seqs']} validation sequences evaluated every {t['eval_every']} steps "
        f"(AdamW's seed-mean final value there: {fmt(summary['adamw_target_subset'])}), on seed-mean curves, "
        "linearly interpolated between evaluations. Paired Δ: per-seed difference (same seed = same init and "
        "data order), mean ± std over seeds; negative is better.",
        "",
        "Learning-rate sweep (seed 0, final validation loss; best in bold):",
        "",
    ]
    sweep = summary["sweep"]
    all_lrs = sorted({lr for s in sweep.values() for lr in s}, key=float)
    lines.append("| optimizer | " + " | ".join(all_lrs) + " |")
    lines.append("|---|" + "---|" * len(all_lrs))
    for opt, s in sweep.items():
        bestv = min((v for v in s.values() if isinstance(v, float)), default=None)
        cells = []
        for lr in all_lrs:
            v = s.get(lr)
            cells.append(
                ""
                if lr not in s
                else "not run yet"
                if v is None
                else "diverged"
                if v == "diverged"
                else (f"**{v:.4f}**" if v == bestv else f"{v:.4f}")
            )
        lines.append(f"| {LABELS[opt]} | " + " | ".join(cells) + " |")
    inv = summary["investigation"]
    if inv:
        lines += [
            "",
            f"MARS-M approx, gamma sweep at lr {lr_name(inv['lr'])}, seed 0 (gamma 0 = Muon at this lr):",
            "",
            "| gamma | " + " | ".join(inv["gamma"]) + " |",
            "|---|" + "---|" * len(inv["gamma"]),
            "| final val loss | " + " | ".join(fmt(v) for v in inv["gamma"].values()) + " |",
        ]
        if inv["schedule"]:
            lines += [
                "",
                "Schedule, seed 0 at each optimizer's best lr (WSD: warm-up, flat, linear decay over the last "
                "20 % to 1 %):",
                "",
                "| optimizer | lr | cosine | WSD |",
                "|---|---|---|---|",
            ]
            for opt, d in inv["schedule"].items():
                lines.append(f"| {LABELS[opt]} | {lr_name(d['lr'])} | {fmt(d['cosine'])} | {fmt(d['wsd'])} |")
    lines += ["", f"![loss curves]({png.name})", "<!-- END GENERATED -->"]
    generated = "\n".join(lines)
    header = (
        "# Loss study: MARS-M vs Muon vs AdamW at small scale\n\n"
        "Regenerate: `python benchmarks/loss_study.py` (runs only missing runs; `--no-run` aggregates only, "
        "`--quick` is a smoke version).\n\n"
    )
    footer = "\n\n## Verdict\n\n(not written yet)\n"
    if path.exists():
        old = path.read_text()
        if "<!-- BEGIN GENERATED -->" in old and "<!-- END GENERATED -->" in old:
            before = old.split("<!-- GENERATED by")[0]
            after = old.split("<!-- END GENERATED -->", 1)[1]
            header, footer = before, after
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + generated + footer)


# ----------------------------------------------------------------------------- main
def ns_study(n_seeds: int, allow_run: bool = True) -> int:
    """Paired runs of NS_STUDY at MARS-M approx's best lr of the full study, seeds 0..n_seeds-1."""
    lr = json.loads((RESULTS / "summary.json").read_text())["rows"]["marsm_approx"]["lr"]
    finals = {opt: {} for opt in NS_STUDY}
    times = {opt: [] for opt in NS_STUDY}
    runs = {}
    for seed in range(n_seeds):
        for opt in NS_STUDY:
            r = ensure(RESULTS, run_spec(FULL, opt, lr, seed), allow_run=allow_run)
            if r:
                runs[r["name"]] = r
                finals[opt][seed] = r["final_val"]
                times[opt].append(r["train_time_s"])
    base = finals["marsm_standard"]
    lines = [
        f"MARS-M approx, lr {lr_name(lr)}, {FULL['train'].steps} steps, seeds "
        f"{list(range(n_seeds))}; final validation loss (nats/byte), paired difference against the standard "
        "row (same seed = same init and data). Command: `python benchmarks/loss_study.py --ns-study "
        f"--seeds {n_seeds}`\n",
        "| run | final val (mean +- std) | per seed | paired vs standard | train s / run |",
        "|---|---|---|---|---|",
    ]
    rows = {}
    for opt in NS_STUDY:
        m, sd, n = mean_std(list(finals[opt].values()))
        d = mean_std([finals[opt][s] - base[s] for s in finals[opt] if s in base])
        rows[opt] = {
            "final_val_mean": m,
            "final_val_std": sd,
            "n_seeds": n,
            "per_seed": finals[opt],
            "paired_vs_standard": {"mean": d[0], "std": d[1], "n": d[2]},
            "train_time_s_mean": mean_std(times[opt])[0],
        }
        lines.append(
            f"| {LABELS[opt]} | {fmt(m)} +- {fmt(sd)} | "
            + ", ".join(fmt(finals[opt][s]) for s in sorted(finals[opt]))
            + f" | {d[0]:+.4f} +- {d[1]:.4f} | {mean_std(times[opt])[0]:.0f} |"
        )
    missing = [f"{opt} seed {s}" for s in range(n_seeds) for opt in NS_STUDY if s not in finals[opt]]
    if missing:
        lines.append(f"\nNot run (CPU time): {', '.join(missing)}.")
    md = "\n".join(lines) + "\n"
    (RESULTS / "ns_study.json").write_text(
        json.dumps({"lr": lr, "rows": rows, "machine": machine_info(runs)}, indent=1, default=str) + "\n"
    )
    (RESULTS / "ns_study.md").write_text(md)
    print(md)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke version (separate cache and outputs)")
    ap.add_argument("--no-run", action="store_true", help="aggregate cached runs only")
    ap.add_argument(
        "--ns-study",
        action="store_true",
        help="only the Newton-Schulz rows (standard / gram / polar_express at MARS-M approx's best lr, "
        "--seeds seeds) -> benchmarks/results/loss_study/ns_study.{json,md}",
    )
    ap.add_argument("--seeds", type=int, default=3, help="seeds of --ns-study")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        result = train_one(spec)
        tmp = cache_path(out, spec["name"]).with_suffix(".tmp")
        tmp.write_text(json.dumps(result) + "\n")
        tmp.replace(cache_path(out, spec["name"]))
        return 0
    if args.ns_study:
        return ns_study(args.seeds, allow_run=not args.no_run)
    study = QUICK if args.quick else FULL
    out = RESULTS / "quick" if args.quick else RESULTS
    doc_md = out / "loss_study.md" if args.quick else ROOT / "docs" / "loss_study.md"
    doc_png = out / "loss_study.png" if args.quick else ROOT / "docs" / "loss_study.png"
    command = "python benchmarks/loss_study.py" + (" --quick" if args.quick else "")
    state = study_runs(study, out, allow_run=not args.no_run)
    if not state["results"]:
        print("no results yet")
        return 1
    summary = aggregate(study, state, out, doc_md, doc_png, command)
    for opt in sorted(summary["rows"], key=lambda o: summary["rows"][o]["final_val_mean"]):
        r = summary["rows"][opt]
        print(
            f"{LABELS[opt]:45s} lr {lr_name(r['lr']):6s} val {fmt(r['final_val_mean'])} ± {fmt(r['final_val_std']) if r['n_seeds'] > 1 else 'n/a (1 seed)'} "
            f"(n={r['n_seeds']}) steps->AdamW {r['steps_to_adamw']}"
        )
    print(f"wrote {out / 'summary.json'}, {doc_md}, {doc_png}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
