"""The GPU check (issue 17): one command that proves the CUDA path and measures Newton-Schulz on tensor cores.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out DIR          # one CUDA GPU; stops starting work at 420 s
    PYTHONPATH=. python3 benchmarks/gpu_check.py --cpu-smoke --out DIR   # same code paths, tiny shapes, CPU, gloo

Six parts, each with its own time budget; a part that runs out of budget skips its remaining sizes and says
which, and a part that raises is recorded (status "error" with the traceback's tail) while the next part runs:

1. environment: torch / CUDA / GPU / NCCL versions; whether dist_marsm imports on this torch and whether every
   torch API the core calls exists here; whether torchtitan imports.
2. correctness: MARSM on the device against the tests' CPU float64 reference, tests/references.py (approx,
   efficient, gamma 0, NorMuon; bf16 and fp32 Newton-Schulz); an FSDP2 model on a 1-rank process group (NCCL on
   CUDA) against the plain single process; bf16 parameters keep float32 optimizer state.
3. newton_schulz: time per call and achieved TFLOP/s as a fraction of a bf16 GEMM rate measured in the same run,
   on Llama 3 8B / 70B shapes and MoE expert stacks; eager vs torch.compile; the standard iteration vs the Gram
   method when ``newton_schulz`` offers ``method="gram"``.
4. optimizer_step: one step on 4 layers of Llama 3 8B shapes: MARSM vs torch.optim.Muon (+AdamW) vs fused AdamW,
   and torchtitan's DistMuon when torchtitan imports; step time, state bytes (counted) and peak memory.
5. training: a small Llama-like model in a plain loop, MARS-M vs AdamW: tokens/s and the optimizer's share.
6. owner_engine: the owner plan's bucketing on device buffers through the 1-rank group (results independent of
   bucket size, step statistics), the backend's all_to_all_single, and 2 gloo ranks sharing the device, which
   take the all_to_all path with several buckets, against one process.

Writes DIR/gpu_check.json (everything, rewritten after every part) and DIR/gpu_check.md (the tables), prints the
tables, and exits 1 when any part is not "ok". Reads only the public API of dist_marsm; the float64 reference
and the spawning of ranks are the tests' own (tests/references.py, tests/_spawn.py).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import faulthandler
import gc
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(REPO))

from _common import LlamaLike, markdown_table, state_bytes, sync  # noqa: E402
from torch.distributed.elastic.utils.distributed import get_free_port as free_port  # noqa: E402

from dist_marsm.newton_schulz import newton_schulz_flops  # noqa: E402
from tests._spawn import scenario  # noqa: E402
from tests.references import marsm_steps  # noqa: E402

LR, WD, BETA, GAMMA = 0.02, 0.1, 0.95, 0.025

# Tolerances, with their reasons (relative Frobenius error of the total parameter change over the run):
# - fp32 Newton-Schulz vs the float64 reference: fp32 rounding (~6e-8) grows ~10x through 5 quintic iterations
#   and with the matrix size through the sums (~sqrt(k)), about 1e-6 here; 1e-4 leaves room and still catches
#   any formula error (dropping the MARS correction alone changes the update by tens of percent).
# - bf16 Newton-Schulz: bf16 keeps 8 significant bits (2^-8 = 4e-3 relative); 5 iterations amplify that to a
#   few 1e-2 per entry of O(1/sqrt(n)), partly averaging out in the Frobenius norm: 6e-2.
# - FSDP2 on one rank vs one process, fp32 wire and Newton-Schulz: the same kernels on the same values;
#   only the order of gradient sums may differ: 1e-5.
# - bf16 parameters (run at lr 0.2 so that a step moves W by >= ~10 bf16 ulps even on the smoke's tiny shapes):
#   the library rounds up to three times per step (update, decay, sum), the reference once; each rounding is
#   <= 0.5 ulp, a few percent of a step, and they partly cancel over the steps: 5e-2.
TOL = {
    "fp32": 1e-4,
    "bf16": 6e-2,
    "fsdp_fp32": 1e-5,
    "bf16_params": 5e-2,
    "fp32_state": 1e-5,
    "bucket_fp32": 1e-5,
    "ranks_fp32_wire": 1e-5,
    "ranks_bf16_wire": 6e-2,
}


# ============================================================================ configuration
@dataclass
class Config:
    smoke: bool
    device: torch.device
    backend: str
    compile_backend: str
    budgets: dict
    total_s: float
    corr_shapes: dict
    corr_steps: int
    fsdp_model: dict
    gemm_n: int
    ns_shapes: list
    opt_model: dict
    opt_steps: int
    train_model: dict
    train_batch: int
    train_seq: int
    train_steps: int
    engine_shapes: list
    engine_steps: int


def make_config(args) -> Config:
    if args.cpu_smoke:
        return Config(
            smoke=True,
            device=torch.device("cpu"),
            backend="gloo",
            compile_backend="eager",
            # Ceilings, not targets (the smoke takes ~45 s): wide enough that a loaded CI machine skips nothing.
            budgets=dict(
                environment=30, correctness=60, newton_schulz=60, optimizer_step=60, training=40, owner_engine=120
            ),
            total_s=args.total_s or 400,
            corr_shapes={"wide": (6, 10), "tall": (10, 6), "square": (8, 8), "experts": (3, 4, 6)},
            corr_steps=3,
            fsdp_model=dict(dim=32, n_layers=2, ffn=64, vocab=128, n_heads=4),
            gemm_n=256,
            ns_shapes=[
                ("Llama-like square", (64, 64)),
                ("Llama-like wide", (32, 96)),
                ("Llama-like tall", (96, 32)),
                ("expert stack", (4, 16, 48)),
            ],
            opt_model=dict(n_layers=2, dim=64, kv=16, ffn=160),
            opt_steps=2,
            train_model=dict(dim=32, n_layers=2, ffn=64, vocab=128, n_heads=4),
            train_batch=4,
            train_seq=32,
            train_steps=30,
            engine_shapes=[
                ("a", (9, 6), 0),
                ("b", (6, 10), 0),
                ("c", (7, 7), 0),
                ("experts", (3, 5, 4), 0),
                ("rowwise", (8, 11), 1),
            ],
            engine_steps=2,
        )
    return Config(
        smoke=False,
        device=torch.device("cuda", 0),
        backend="nccl",
        compile_backend=args.compile_backend,
        budgets=dict(
            environment=25, correctness=50, newton_schulz=140, optimizer_step=70, training=60, owner_engine=50
        ),
        total_s=args.total_s or 420,
        corr_shapes={"wide": (256, 512), "tall": (512, 256), "square": (384, 384), "experts": (4, 128, 320)},
        corr_steps=5,
        fsdp_model=dict(dim=256, n_layers=4, ffn=688, vocab=2048, n_heads=8),
        gemm_n=8192,
        # Llama 3 8B: wq/wo 4096x4096, wk/wv 1024x4096, w1/w3 14336x4096, w2 4096x14336; 70B: 8192x8192 (wq/wo),
        # 8192x28672 (w2); MoE: Qwen3-30B-A3B's 128 experts [768, 2048] and 32 of DeepSeek-V3's [2048, 7168].
        ns_shapes=[
            ("8B wq/wo", (4096, 4096)),
            ("8B w2", (4096, 14336)),
            ("8B w1/w3", (14336, 4096)),
            ("8B wk/wv", (1024, 4096)),
            ("70B wq/wo", (8192, 8192)),
            ("70B w2", (8192, 28672)),
            ("Qwen3-30B-A3B experts", (128, 768, 2048)),
            ("DeepSeek-V3 experts (32)", (32, 2048, 7168)),
        ],
        opt_model=dict(n_layers=4, dim=4096, kv=1024, ffn=14336),
        opt_steps=3,
        train_model=dict(dim=1024, n_layers=8, ffn=2816, vocab=8192, n_heads=16),
        train_batch=16,
        train_seq=512,
        train_steps=300,
        engine_shapes=[
            ("a", (1023, 512), 0),
            ("b", (512, 1536), 0),
            ("c", (777, 777), 0),
            ("experts", (6, 257, 384), 0),
            ("rowwise", (640, 1001), 1),
        ],
        engine_steps=3,
    )


# ============================================================================ small helpers
class Budget:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.perf_counter()

    def used(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.used()

    def expired(self) -> bool:
        return self.left() <= 0


class Part:
    """What one part records: data, checks (value within stated bounds) and what it skipped."""

    def __init__(self, name: str, budget: Budget):
        self.name, self.budget = name, budget
        self.data: dict = {}
        self.checks: list[dict] = []
        self.skipped: list[str] = []
        self.tables: list[str] = []

    def check(self, name: str, value, max_value=None, min_value=None, why: str = "") -> bool:
        value = float(value)
        ok = (
            math.isfinite(value)
            and (max_value is None or value <= max_value)
            and (min_value is None or value >= min_value)
        )
        self.checks.append({"name": name, "value": value, "max": max_value, "min": min_value, "ok": ok, "why": why})
        print(
            f"  [{'ok' if ok else 'MISMATCH'}] {name}: {value:.3g}"
            + (f" (max {max_value:g})" if max_value is not None else "")
            + (f" (min {min_value:g})" if min_value is not None else ""),
            flush=True,
        )
        return ok

    def skip(self, what: str) -> None:
        self.skipped.append(what)
        print(f"  skipped: {what}", flush=True)

    def out_of_time(self, what: str) -> bool:
        if self.budget.expired():
            self.skip(f"{what} (part budget of {self.budget.seconds:.0f} s used up)")
            return True
        return False


def time_calls(fn, device: torch.device, reps: int, warmup: int = 1) -> float:
    """Median seconds per call; CUDA events on a GPU, the wall clock on CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def update_rel_err(got, want, init) -> float:
    """Relative Frobenius error of the total change of a list of parameters: ||dGot - dWant|| / ||dWant||."""
    return rel_err(
        torch.cat([(g.detach().cpu().double() - i.double().cpu()).flatten() for g, i in zip(got, init)]),
        torch.cat([(w.detach().cpu().double() - i.double().cpu()).flatten() for w, i in zip(want, init)]),
    )


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def tail(tb: str, lines: int = 12) -> str:
    return "\n".join(tb.strip().splitlines()[-lines:])


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ============================================================================ inputs
def make_grads(shapes, steps: int, seed: int) -> list[list[torch.Tensor]]:
    """Fixed random gradients (CPU float32); even-numbered matrices get ||g|| ~ 3 (clipping acts), odd ~ 0.5."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        grads = []
        for i, s in enumerate(shapes):
            size = 3.0 if i % 2 == 0 else 0.5
            grads.append(torch.randn(s, generator=gen) * size / math.sqrt(s[-1] * s[-2]))
        out.append(grads)
    return out


# ============================================================================ part 1: environment
TORCH_APIS = [
    # (what the core uses, module, attribute, keyword argument that must exist or None)
    ("DTensor", "torch.distributed.tensor", "DTensor", None),
    ("Shard", "torch.distributed.tensor", "Shard", None),
    ("Replicate", "torch.distributed.tensor", "Replicate", None),
    ("_StridedShard", "torch.distributed.tensor.placement_types", "_StridedShard", None),
    (
        "Shard._split_tensor(with_padding=)",
        "torch.distributed.tensor.placement_types",
        "Shard._split_tensor",
        "with_padding",
    ),
    ("DTensor.from_local(shape=, stride=)", "torch.distributed.tensor", "DTensor.from_local", "stride"),
    ("new_group(use_local_synchronization=)", "torch.distributed", "new_group", "use_local_synchronization"),
    ("all_to_all_single", "torch.distributed", "all_to_all_single", None),
    ("fully_shard", "torch.distributed.fsdp", "fully_shard", None),
    ("init_device_mesh", "torch.distributed.device_mesh", "init_device_mesh", None),
    ("torch._foreach_copy_", "torch", "_foreach_copy_", None),
    ("torch.optim.adamw.adamw (functional, foreach)", "torch.optim.adamw", "adamw", "foreach"),
    ("torch.optim.Muon", "torch.optim", "Muon", None),
]


def probe_api(module: str, attr: str, kwarg) -> str:
    import importlib

    try:
        obj = importlib.import_module(module)
        for a in attr.split("."):
            obj = getattr(obj, a)
    except Exception as e:  # noqa: BLE001 - the probe reports any failure
        return f"missing: {type(e).__name__}: {e}"
    if kwarg:
        try:
            if kwarg not in inspect.signature(obj).parameters:
                return f"present, but without the {kwarg}= argument"
        except (TypeError, ValueError):
            return "present (signature not inspectable)"
    return "ok"


def _nccl_version() -> str | None:
    try:
        v = torch.cuda.nccl.version()
    except Exception as e:  # noqa: BLE001
        return f"unknown: {type(e).__name__}"
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def ensure_process_group(cfg: Config) -> dict:
    """The one-rank process group the distributed parts use (NCCL on CUDA, gloo on CPU), created once."""
    if not dist.is_initialized():
        if cfg.device.type == "cuda":
            torch.cuda.set_device(cfg.device)
        t = time.perf_counter()
        dist.init_process_group(
            cfg.backend,
            init_method=f"tcp://127.0.0.1:{free_port()}",
            rank=0,
            world_size=1,
            timeout=datetime.timedelta(seconds=120),
        )
        one = torch.ones(1, device=cfg.device)
        dist.all_reduce(one)  # NCCL builds its communicator lazily: make a failure show here, first
        sync(cfg.device)
        if float(one) != 1.0:
            raise RuntimeError(f"all_reduce over one rank changed 1.0 to {float(one)}")
        ensure_process_group.init_s = round(time.perf_counter() - t, 2)
    return {
        "backend": dist.get_backend(),
        "world_size": dist.get_world_size(),
        "init_s": getattr(ensure_process_group, "init_s", None),
    }


def part_environment(cfg: Config, part: Part, ctx: dict) -> None:
    d = part.data
    d.update(
        python=platform.python_version(),
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        cuda_available=torch.cuda.is_available(),
        cpu_count=os.cpu_count(),
        smoke=cfg.smoke,
        float32_matmul_precision=torch.get_float32_matmul_precision(),
    )
    for mod in ("numpy", "triton"):
        try:
            d[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            d[mod] = f"not importable: {type(e).__name__}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        d.update(
            gpu=props.name,
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_sms=props.multi_processor_count,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cudnn=torch.backends.cudnn.version(),
            nccl=_nccl_version(),
        )
        try:
            d["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            d["driver"] = f"nvidia-smi failed: {e}"
    elif not cfg.smoke:
        raise RuntimeError("CUDA is not available to torch; the GPU parts cannot run (use --cpu-smoke on CPU)")
    d["torch_apis_used_by_dist_marsm"] = {name: probe_api(m, a, k) for name, m, a, k in TORCH_APIS}
    missing = [n for n, s in d["torch_apis_used_by_dist_marsm"].items() if s != "ok" and n != "torch.optim.Muon"]
    part.check(
        "core torch APIs missing on this torch",
        len(missing),
        max_value=0,
        why="every torch API dist_marsm's core calls must exist here: " + (", ".join(missing) or "all present"),
    )
    try:
        import dist_marsm
        from dist_marsm import MARSM, build_param_groups, newton_schulz  # noqa: F401

        d["dist_marsm"] = {
            "version": getattr(dist_marsm, "__version__", "?"),
            "file": dist_marsm.__file__,
            "from_this_tree": str(Path(dist_marsm.__file__).resolve()).startswith(str(REPO)),
        }
        d["newton_schulz_signature"] = str(inspect.signature(newton_schulz))
        d["gram_method_available"] = "method" in inspect.signature(newton_schulz).parameters
    except Exception:  # noqa: BLE001
        d["dist_marsm"] = {"import_error": tail(traceback.format_exc())}
        raise
    try:
        import torchtitan

        d["torchtitan"] = getattr(torchtitan, "__version__", "importable (no __version__)")
        ctx["torchtitan"] = True
    except Exception as e:  # noqa: BLE001 - torchtitan is optional here
        d["torchtitan"] = f"not importable: {type(e).__name__}: {e}"
        ctx["torchtitan"] = False
    d["process_group"] = ensure_process_group(cfg)
    part.tables.append(
        markdown_table(
            ["item", "value"],
            [
                ["torch", d["torch"]],
                ["CUDA (torch build)", d["torch_cuda"]],
                [
                    "GPU",
                    f"{d['gpu']}, sm {d['gpu_capability']}, {d['gpu_sms']} SMs, {d['gpu_memory_gib']} GiB"
                    if "gpu" in d
                    else "none (CPU smoke)",
                ],
                ["driver", d.get("driver", "-")],
                ["NCCL", d.get("nccl", "-")],
                ["triton", d["triton"]],
                ["dist_marsm imports", "yes" if "file" in d["dist_marsm"] else "NO"],
                ["core torch APIs", "all present" if not missing else "missing: " + ", ".join(missing)],
                ["torch.optim.Muon", d["torch_apis_used_by_dist_marsm"]["torch.optim.Muon"]],
                ["Gram Newton-Schulz (method=)", "yes" if d["gram_method_available"] else "not in this tree"],
                ["torchtitan", d["torchtitan"]],
                ["process group", f"{d['process_group']['backend']}, 1 rank"],
            ],
        )
    )


# ============================================================================ part 2: correctness
def part_correctness(cfg: Config, part: Part, ctx: dict) -> None:
    from dist_marsm import MARSM

    dev = cfg.device
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here; TF32 would be a 1e-3 error
    shapes = list(cfg.corr_shapes.values())
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) / math.sqrt(s[-1]) for s in shapes]
    grads = make_grads(shapes, cfg.corr_steps, seed=1)
    rows = []
    configs = [
        ("approx", dict(variant="approx"), {}),
        ("efficient", dict(variant="efficient"), dict(variant="efficient", clip=False)),
        ("gamma 0 (Muon)", dict(gamma=0.0), dict(gamma=0.0)),
        ("NorMuon", dict(normalize="neuron"), dict(normalize="neuron")),
    ]
    references = {}
    for label, kwargs, ref_kwargs in configs:
        for ns_dtype in ("float32", "bfloat16"):
            if part.out_of_time(f"correctness {label} {ns_dtype}"):
                continue
            if label not in references:
                hyper = dict(wd=WD, beta=BETA, gamma=GAMMA)
                references[label] = marsm_steps(init, grads, lr=LR, **{**hyper, **ref_kwargs})[0]
            params = [p.clone().to(dev).requires_grad_() for p in init]
            opt = MARSM(params, lr=LR, weight_decay=WD, momentum=BETA, ns_dtype=ns_dtype, **kwargs)
            for step_grads in grads:
                for p, g in zip(params, step_grads):
                    p.grad = g.to(dev)
                opt.step()
            want = references[label]
            err = update_rel_err(params, want, init)
            key = "fp32" if ns_dtype == "float32" else "bf16"
            ok = part.check(f"{label}, NS {ns_dtype}: rel. error of the update vs float64", err, max_value=TOL[key])
            rows.append([label, ns_dtype, f"{err:.2e}", TOL[key], "ok" if ok else "MISMATCH"])
    part.data["marsm_vs_float64"] = rows
    part.tables.append(
        "MARSM on the device vs the CPU float64 reference ("
        + str(cfg.corr_steps)
        + " steps, shapes "
        + ", ".join(str(s) for s in shapes)
        + ")\n\n"
        + markdown_table(["variant", "NS dtype", "rel. error", "tolerance", ""], rows)
    )

    if not part.out_of_time("bf16 parameters with fp32 state"):
        _check_bf16_params(cfg, part, init, grads)
    if not part.out_of_time("FSDP2 on the 1-rank group vs one process"):
        _check_fsdp_one_rank(cfg, part, ctx)


def _check_bf16_params(cfg, part, init, grads):
    from dist_marsm import MARSM

    dev = cfg.device
    init16 = [p.bfloat16() for p in init]
    grads16 = [[g.bfloat16() for g in step] for step in grads]
    params = [p.clone().to(dev).requires_grad_() for p in init16]
    lr = 10 * LR
    opt = MARSM(params, lr=lr, weight_decay=WD, momentum=BETA, ns_dtype="float32")
    for step_grads in grads16:
        for p, g in zip(params, step_grads):
            p.grad = g.to(dev)
        opt.step()
    dtypes = sorted(
        {
            str(v.dtype)
            for s in opt.state.values()
            for k, v in s.items()
            if torch.is_tensor(v) and v.is_floating_point() and k != "step"
        }
    )
    part.data["bf16_params_state_dtypes"] = dtypes
    part.check(
        "bf16 params: optimizer-state tensors not in float32",
        sum(d != "torch.float32" for d in dtypes),
        max_value=0,
        why=f"state dtypes {dtypes}",
    )
    want, want_m = marsm_steps(
        init16, grads16, lr=lr, wd=WD, beta=BETA, gamma=GAMMA, round_params=lambda w: w.bfloat16().double()
    )
    got_m = [opt.state[p].get("momentum") for p in params]
    if any(m is None for m in got_m):
        raise KeyError("MARSM state has no 'momentum' entry; the check of its precision needs it")
    m_err = rel_err(torch.cat([m.flatten() for m in got_m]), torch.cat([m.flatten() for m in want_m]))
    part.check(
        "bf16 params: momentum rel. error vs float64 (fp32 state)",
        m_err,
        max_value=TOL["fp32_state"],
        why="bf16-stored momentum would be ~4e-3 off",
    )
    err = update_rel_err(params, want, init16)
    part.check("bf16 params: update rel. error vs float64 rounded to bf16 each step", err, max_value=TOL["bf16_params"])
    part.data["bf16_params"] = {"momentum_rel_err": m_err, "update_rel_err": err}


def _fsdp_llama(cfg, seed):
    torch.manual_seed(seed)
    return LlamaLike(**cfg.fsdp_model).to(cfg.device)


def _train_steps(model, opt, cfg, steps, batch=4, seq=32, seed=0):
    losses = []
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.randint(0, model.vocab, (batch, seq + 1), generator=gen).to(cfg.device)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


def _check_fsdp_one_rank(cfg, part, ctx):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from dist_marsm import MARSM, build_param_groups

    ensure_process_group(cfg)
    plain = _fsdp_llama(cfg, seed=3)
    sharded = copy.deepcopy(plain)
    mesh = init_device_mesh(cfg.device.type, (1,), mesh_dim_names=("fsdp",))
    for block in sharded.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    kw = dict(lr=LR, weight_decay=WD, ns_dtype="float32", wire_dtype="float32")
    opt_plain = MARSM(build_param_groups(plain), **kw)
    opt_fsdp = MARSM(build_param_groups(sharded), bucket_mb=0.01, **kw)  # 10 KiB: about one matrix per bucket
    init = [p.detach().clone() for p in plain.parameters()]
    losses_plain = _train_steps(plain, opt_plain, cfg, 3)
    losses_fsdp = _train_steps(sharded, opt_fsdp, cfg, 3)
    names = [n for n, _ in plain.named_parameters()]
    first = plain.layers[0].attention.wq.weight
    err = update_rel_err([full(p) for p in sharded.parameters()], list(plain.parameters()), init)
    part.check("FSDP2 (1 rank) vs one process: rel. difference of the update", err, max_value=TOL["fsdp_fp32"])
    part.check(
        "FSDP2 (1 rank) vs one process: max loss difference",
        max(abs(a - b) for a, b in zip(losses_plain, losses_fsdp)),
        max_value=1e-4,
    )
    placements = str(getattr(next(sharded.parameters()), "placements", "plain tensor"))
    part.data["fsdp_one_rank"] = {
        "params": len(names),
        "rel_err": err,
        "losses_plain": losses_plain,
        "losses_fsdp": losses_fsdp,
        "placements": placements,
        "last_step_stats": opt_fsdp.last_step_stats,
        "first_shape": list(first.shape),
    }


# ============================================================================ part 3: Newton-Schulz
def part_newton_schulz(cfg: Config, part: Part, ctx: dict) -> None:
    from dist_marsm import newton_schulz

    dev = cfg.device
    n = cfg.gemm_n
    for size in (n, n // 2):  # the reference rate is the largest; the half size shows how much smaller GEMMs lose
        a = torch.randn(size, size, device=dev, dtype=torch.bfloat16)
        b = torch.randn(size, size, device=dev, dtype=torch.bfloat16)
        t = time_calls(lambda a=a, b=b: a @ b, dev, reps=10, warmup=3)
        part.data["gemm_bf16" if size == n else "gemm_bf16_half"] = {
            "n": size,
            "s": t,
            "tflops": 2 * size**3 / t / 1e12,
        }
        print(f"  bf16 GEMM {size}^3: {t * 1e3:.3f} ms, {2 * size**3 / t / 1e12:.1f} TFLOP/s", flush=True)
        del a, b
    gemm = part.data["gemm_bf16"]["tflops"]
    ctx["gemm_tflops"] = gemm
    has_gram = "method" in inspect.signature(newton_schulz).parameters
    part.data["gram_method"] = (
        "available"
        if has_gram
        else "absent: newton_schulz has no method= argument in this tree " + str(inspect.signature(newton_schulz))
    )
    methods = {"standard": {}}
    if has_gram:
        methods["gram"] = {"method": "gram"}
    else:
        part.skip("Gram method: newton_schulz has no method= argument in this tree")

    def eager(method):
        return lambda x: newton_schulz(x, steps=5, dtype=torch.bfloat16, **methods[method])

    # Both methods' wrappers share one code object, and each new shape family (2-D wide, tall, batched) adds a
    # compiled entry: raise dynamo's per-code-object limit so no shape silently falls back to eager.
    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
    compiled = {m: torch.compile(eager(m), backend=cfg.compile_backend) for m in methods}
    results = {label: {} for label, _ in cfg.ns_shapes}
    inputs = {}

    def measure(label, shape, key, fn):
        x = inputs[label]
        t0 = time.perf_counter()
        out = fn(x)
        sync(dev)
        first = time.perf_counter() - t0
        reps = max(3, min(20, int(0.25 / max(first, 1e-4))))
        t = time_calls(lambda: fn(x), dev, reps=reps, warmup=1)
        tflops = newton_schulz_flops(shape) / t / 1e12
        results[label][key] = {
            "s": t,
            "tflops": tflops,
            "frac_gemm": tflops / gemm,
            "first_call_s": first,
            "reps": reps,
            "finite": bool(torch.isfinite(out).all()),
        }
        print(
            f"  NS {label} {shape} {key}: {t * 1e3:.3f} ms, {tflops:.1f} TFLOP/s, {tflops / gemm:.0%} of GEMM"
            f" (first call {first:.2f} s)",
            flush=True,
        )
        return out

    # Pass 1: eager for every shape (cheap); pass 2: torch.compile, as far as the budget goes.
    for label, shape in cfg.ns_shapes:
        if part.out_of_time(f"NS {label} {shape} (all variants)"):
            continue
        gen = torch.Generator(device=dev).manual_seed(0)
        inputs[label] = torch.randn(shape, device=dev, generator=gen)  # fp32, as the optimizer's momentum is
        ref = measure(label, shape, "eager standard", eager("standard"))
        if has_gram:
            try:
                out = measure(label, shape, "eager gram", eager("gram"))
                results[label]["gram_vs_standard_max_abs"] = float((out.float() - ref.float()).abs().max())
            except Exception:  # noqa: BLE001 - a Gram failure must not hide the standard numbers
                results[label]["eager gram"] = {"error": tail(traceback.format_exc(), 4)}
        del ref
        free_memory(dev)
    for label, shape in cfg.ns_shapes:
        if label not in inputs:
            continue
        for method in methods:
            key = f"compiled {method}"
            if part.out_of_time(f"NS {label} {shape} {key}"):
                continue
            try:
                out = measure(label, shape, key, compiled[method])
                want = eager(method)(inputs[label])
                results[label][f"{key}_vs_eager_max_abs"] = float((out.float() - want.float()).abs().max())
                del out, want
            except Exception:  # noqa: BLE001
                results[label][key] = {"error": tail(traceback.format_exc(), 4)}
                print(f"  NS {label} {key} failed: {tail(traceback.format_exc(), 1)}", flush=True)
        del inputs[label]
        free_memory(dev)
    part.data["shapes"] = {label: list(shape) for label, shape in cfg.ns_shapes}
    part.data["results"] = results
    part.data["compile_backend"] = cfg.compile_backend
    measured = [r["eager standard"] for r in results.values() if "eager standard" in r]
    part.check("NS shapes measured (eager standard)", len(measured), min_value=1)
    part.check(
        "NS outputs not finite",
        sum(not v["finite"] for r in results.values() for v in r.values() if isinstance(v, dict) and "finite" in v),
        max_value=0,
    )
    keys = ["eager standard", "compiled standard"] + (["eager gram", "compiled gram"] if has_gram else [])

    def cell(r, k):
        v = r.get(k)
        if v is None:
            return "-"
        if "error" in v:
            return "error"
        return f"{v['s'] * 1e3:.2f} ms / {v['frac_gemm']:.0%}"

    rows = [
        [
            label,
            "x".join(map(str, shape)),
            f"{newton_schulz_flops(shape) / 1e9:.1f}",
            *[cell(results[label], k) for k in keys],
        ]
        for label, shape in cfg.ns_shapes
    ]
    part.tables.append(
        f"bf16 GEMM {n}x{n}x{n}: {gemm:.1f} TFLOP/s (median of 10; {n // 2}^3: "
        f"{part.data['gemm_bf16_half']['tflops']:.1f}). Newton-Schulz, 5 quintic steps in bf16 from an "
        f"fp32 input; each cell: median time per call / achieved TFLOP/s (standard-iteration FLOPs / time) as a "
        f"fraction of that GEMM rate; goal >= 70%. torch.compile backend: {cfg.compile_backend}.\n\n"
        + markdown_table(["shape", "size", "GFLOP", *keys], rows)
    )


# ============================================================================ part 4: optimizer step
class _Layer(nn.Module):
    def __init__(self, dim, kv, ffn):
        super().__init__()
        self.attention_norm = nn.Parameter(torch.ones(dim))
        self.attention = nn.ModuleDict(
            {
                "wq": nn.Linear(dim, dim, bias=False),
                "wk": nn.Linear(dim, kv, bias=False),
                "wv": nn.Linear(dim, kv, bias=False),
                "wo": nn.Linear(dim, dim, bias=False),
            }
        )
        self.ffn_norm = nn.Parameter(torch.ones(dim))
        self.feed_forward = nn.ModuleDict(
            {
                "w1": nn.Linear(dim, ffn, bias=False),
                "w2": nn.Linear(ffn, dim, bias=False),
                "w3": nn.Linear(dim, ffn, bias=False),
            }
        )


class LlamaLayers(nn.Module):
    """Transformer layers with Llama 3's matrix shapes and torchtitan's names (no forward: gradients are set)."""

    def __init__(self, n_layers, dim, kv, ffn):
        super().__init__()
        self.layers = nn.ModuleList(_Layer(dim, kv, ffn) for _ in range(n_layers))


def part_optimizer_step(cfg: Config, part: Part, ctx: dict) -> None:
    from _common import Combined

    from dist_marsm import MARSM, build_param_groups

    dev = cfg.device
    with torch.device(dev):
        torch.manual_seed(0)
        model = LlamaLayers(**cfg.opt_model)
    mats = [p for p in model.parameters() if p.ndim == 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    gen = torch.Generator(device=dev).manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, device=dev, generator=gen) * 1e-3
    n_params = sum(p.numel() for p in model.parameters())
    ns_total = sum(newton_schulz_flops(tuple(p.shape)) for p in mats)
    fused = dev.type == "cuda"

    def adamw(params):
        return torch.optim.AdamW(
            params, lr=3e-3, betas=(0.9, 0.95), weight_decay=WD, **({"fused": True} if fused else {"foreach": True})
        )

    builders = {
        "MARSM approx (bf16 NS)": lambda: MARSM(build_param_groups(model), lr=3e-3, weight_decay=WD),
        "MARSM efficient (bf16 NS)": lambda: MARSM(
            build_param_groups(model), lr=3e-3, weight_decay=WD, variant="efficient"
        ),
        "torch.optim.Muon (nesterov=False, match_rms_adamw) + AdamW": lambda: Combined(
            torch.optim.Muon(mats, lr=3e-3, weight_decay=WD, nesterov=False, adjust_lr_fn="match_rms_adamw"),
            adamw(rest),
        ),
        f"torch.optim.AdamW ({'fused' if fused else 'foreach'})": lambda: adamw(model.parameters()),
    }
    rows, results = [], {}
    for name, build in builders.items():
        if part.out_of_time(name):
            continue
        try:
            results[name] = _time_optimizer(build, cfg, part, name)
        except Exception:  # noqa: BLE001 - one optimizer's failure is recorded, the others still run
            results[name] = {"error": tail(traceback.format_exc(), 6)}
            print(f"  {name} failed: {tail(traceback.format_exc(), 1)}", flush=True)
        free_memory(dev)
    titan = ctx.get("torchtitan")
    if titan is None:
        try:
            import torchtitan  # noqa: F401

            titan = True
        except Exception:  # noqa: BLE001
            titan = False
    if titan and not part.out_of_time("DistMuon"):
        name = "torchtitan DistMuon (nesterov=False, match_rms_adamw) + AdamW, FSDP2 1 rank"
        try:
            results[name] = _time_distmuon(cfg, part, model, adamw)
        except Exception:  # noqa: BLE001
            results[name] = {"error": tail(traceback.format_exc(), 6)}
            print(f"  DistMuon failed: {tail(traceback.format_exc(), 1)}", flush=True)
    elif not titan:
        part.skip("torchtitan DistMuon: torchtitan does not import here")
    gemm = ctx.get("gemm_tflops")
    for name, r in results.items():
        if "error" in r:
            rows.append([name, "error", "-", "-", "-", "-"])
            continue
        orthogonalizes = "Muon" in name or "MARSM" in name
        frac = ns_total / r["step_s"] / 1e12 / gemm if gemm and orthogonalizes else None
        rows.append(
            [
                name,
                r["step_s"] * 1e3,
                r["state_bytes"] / 2**20,
                r["peak_extra_bytes"] / 2**20 if r["peak_extra_bytes"] is not None else None,
                f"{frac:.0%}" if frac else "-",
                r.get("ns_matrices", "-"),
            ]
        )
    part.data.update(
        model=cfg.opt_model, n_params=n_params, matrices=len(mats), ns_tflop_per_step=ns_total / 1e12, results=results
    )
    part.check("optimizers that ran", sum("error" not in r for r in results.values()), min_value=1)
    errors = [n for n, r in results.items() if "error" in r and "DistMuon" not in n]
    part.check("dist_marsm / torch optimizers that raised", len(errors), max_value=0, why=", ".join(errors))
    part.tables.append(
        f"{cfg.opt_model['n_layers']} layers of Llama 3 shapes {cfg.opt_model} ({n_params / 1e6:.0f} M fp32 parameters, "
        f"{len(mats)} matrices, {ns_total / 1e12:.1f} TFLOP of Newton-Schulz per step), one process, random "
        f"gradients; median of {cfg.opt_steps} steps after one warm-up step. 'NS share of GEMM rate' = "
        f"Newton-Schulz FLOPs / step time / the bf16 GEMM rate of part 3.\n\n"
        + markdown_table(
            [
                "optimizer",
                "step ms",
                "state MiB (counted)",
                "peak MiB above params+grads",
                "NS share of GEMM rate",
                "NS matrices",
            ],
            rows,
        )
    )


def _time_optimizer(build, cfg, part, label):
    dev = cfg.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    opt = build()
    t = time_calls(opt.step, dev, reps=cfg.opt_steps, warmup=1)
    out = {
        "step_s": t,
        "state_bytes": state_bytes(opt),
        "peak_extra_bytes": torch.cuda.max_memory_allocated(dev) - base if dev.type == "cuda" else None,
    }
    stats = getattr(opt, "last_step_stats", None)
    if stats:
        out["last_step_stats"] = stats
        out["ns_matrices"] = stats.get("ns_matrices")
    print(f"  {label}: {t * 1e3:.1f} ms per step, state {out['state_bytes'] / 2**20:.0f} MiB", flush=True)
    del opt
    return out


def _time_distmuon(cfg, part, model, adamw):
    from _common import Combined
    from distmuon_cpu import build_dist_muon_cpu
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torchtitan.distributed.flex_shard import BucketConfig, ComputeLayout, Owned

    dev = cfg.device
    sharded = copy.deepcopy(model)
    mesh = init_device_mesh(dev.type, (1,), mesh_dim_names=("fsdp",))
    for layer in sharded.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    gen = torch.Generator(device=dev).manual_seed(0)
    for p in sharded.parameters():
        p.grad = DTensor.from_local(
            torch.randn(local(p).shape, device=dev, generator=gen) * 1e-3, p.device_mesh, p.placements, run_check=False
        )
    named = [(n, p) for n, p in sharded.named_parameters() if p.ndim == 2]
    rest = [p for p in sharded.parameters() if p.ndim < 2]
    layouts = {n: ComputeLayout(shardings_by_mesh_axis={"fsdp": Owned()}) for n, _ in named}

    def build():
        muon = build_dist_muon_cpu(
            [{"params": [p for _, p in named], "param_names": [n for n, _ in named]}],
            compute_sharding_by_fqn=layouts,
            bucket_configs=[BucketConfig(patterns=("*",))],
            lr=3e-3,
            weight_decay=WD,
            nesterov=False,
            adjust_lr_fn="match_rms_adamw",
        )
        return Combined(muon, adamw(rest))

    try:
        return _time_optimizer(build, cfg, part, "DistMuon")
    finally:
        del sharded


# ============================================================================ part 5: training
def markov_batches(vocab, batch, seq, count, device, seed=0):
    """Token sequences from a fixed random chain: the next token is perm[token] with probability 0.9, else
    uniform. A model can learn it (the loss falls from ln(vocab) toward ~0.6 nats), so the loss is a sanity check."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(vocab, generator=gen)
    x = torch.empty(count * batch, seq + 1, dtype=torch.long)
    x[:, 0] = torch.randint(0, vocab, (count * batch,), generator=gen)
    for t in range(seq):
        follow = torch.rand(count * batch, generator=gen) < 0.9
        x[:, t + 1] = torch.where(follow, perm[x[:, t]], torch.randint(0, vocab, (count * batch,), generator=gen))
    return x.view(count, batch, seq + 1).to(device)


def part_training(cfg: Config, part: Part, ctx: dict) -> None:
    from dist_marsm import MARSM, build_param_groups

    dev = cfg.device
    c = cfg.train_model
    batches = markov_batches(c["vocab"], cfg.train_batch, cfg.train_seq, 32, dev)
    fused = dev.type == "cuda"
    builders = {
        "MARS-M approx (lr 0.012)": lambda m: MARSM(build_param_groups(m), lr=0.012, weight_decay=WD),
        f"AdamW {'fused' if fused else 'foreach'} (lr 3e-3)": lambda m: torch.optim.AdamW(
            m.parameters(),
            lr=3e-3,
            betas=(0.9, 0.95),
            weight_decay=WD,
            **({"fused": True} if fused else {"foreach": True}),
        ),
    }
    rows, results = [], {}
    per_opt_s = part.budget.left() / len(builders)
    for name, build in builders.items():
        if part.out_of_time(name):
            continue
        torch.manual_seed(0)
        model = LlamaLike(**c).to(dev)
        opt = build(model)
        r = _train(model, opt, batches, cfg, deadline=time.perf_counter() + per_opt_s)
        results[name] = r
        if r["steps"] < cfg.train_steps:
            part.skip(f"{name}: stopped after {r['steps']} of {cfg.train_steps} steps (its share of the part budget)")
        rows.append(
            [
                name,
                r["steps"],
                r["loss_first"],
                r["loss_last"],
                r["tokens_per_s"],
                r["step_ms"],
                r["optimizer_ms"],
                f"{r['optimizer_share']:.0%}",
            ]
        )
        part.check(
            f"{name}: last / first loss",
            r["loss_last"] / r["loss_first"],
            max_value=0.9,
            why="the chain is learnable; a loss that does not fall means a broken step",
        )
        del model, opt
        free_memory(dev)
    part.data.update(model=c, batch=cfg.train_batch, seq=cfg.train_seq, results=results)
    part.tables.append(
        f"Llama-like {c}, batch {cfg.train_batch} x {cfg.train_seq} tokens, "
        f"{'bf16 autocast, ' if dev.type == 'cuda' else ''}plain loop, synthetic Markov-chain tokens; "
        "times are medians over the steps after the first 10; the optimizer's share includes zero_grad.\n\n"
        + markdown_table(
            [
                "optimizer",
                "steps",
                "loss first 10",
                "loss last 10",
                "tokens/s",
                "step ms",
                "optimizer ms",
                "optimizer share",
            ],
            rows,
        )
    )


def _train(model, opt, batches, cfg, deadline):
    dev = cfg.device
    cuda = dev.type == "cuda"
    losses, marks = [], []
    for step in range(cfg.train_steps):
        if time.perf_counter() > deadline and step >= 12:
            break
        tokens = batches[step % batches.size(0)]
        if cuda:
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            ev[0].record()
        else:
            t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), tokens[:, 1:].reshape(-1))
        loss.backward()
        if cuda:
            ev[1].record()
        else:
            t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            ev[2].record()
            marks.append(ev)
        else:
            marks.append((t0, t1, time.perf_counter()))
        losses.append(loss.detach())
    sync(dev)
    if cuda:
        spans = [(a.elapsed_time(c) / 1e3, b.elapsed_time(c) / 1e3) for a, b, c in marks]
    else:
        spans = [(c - a, c - b) for a, b, c in marks]
    spans = spans[10:] or spans
    steps_s = sorted(s for s, _ in spans)
    opt_s = sorted(o for _, o in spans)
    losses = [float(x) for x in losses]
    k = min(10, len(losses) // 2)
    step_med = steps_s[len(steps_s) // 2]
    tokens = batches.size(1) * (batches.size(2) - 1)
    return {
        "steps": len(losses),
        "loss_first": sum(losses[:k]) / k,
        "loss_last": sum(losses[-k:]) / k,
        "losses_every_10": losses[::10],
        "step_ms": step_med * 1e3,
        "optimizer_ms": opt_s[len(opt_s) // 2] * 1e3,
        "optimizer_share": sum(o for _, o in spans) / sum(s for s, _ in spans),
        "tokens_per_s": tokens / step_med,
    }


# ============================================================================ part 6: owner engine
def engine_params(cfg: Config):
    gen = torch.Generator().manual_seed(5)
    return [
        (name, torch.randn(shape, generator=gen) / math.sqrt(shape[-1]), dim) for name, shape, dim in cfg.engine_shapes
    ]


def engine_run(cfg: Config, params, steps, wire_dtype, bucket_mb, device, shard=None):
    """MARSM over ``params`` [(name, full tensor, shard dim)] for ``steps`` steps of fixed gradients.

    ``shard`` = (rank, world, mesh): each parameter becomes a DTensor holding this rank's torch.chunk of the shard
    dim (uneven chunks included). Returns (final local tensors, last_step_stats, plan_report, all_to_all calls/step).
    """
    from dist_marsm import MARSM

    grads = make_grads([tuple(t.shape) for _, t, _ in params], steps, seed=6)

    def place(t, dim):
        t = t.to(device, copy=True)  # never a view of the caller's tensor: the optimizer updates in place
        if shard is None:
            return t
        from torch.distributed.tensor import DTensor, Shard

        rank, world, mesh = shard
        return DTensor.from_local(
            t.chunk(world, dim=dim)[rank].clone(), mesh, [Shard(dim)], run_check=False, shape=t.shape, stride=t.stride()
        )

    ps = [place(t, d).requires_grad_() for _, t, d in params]
    opt = MARSM(
        [{"params": ps, "param_names": [n for n, _, _ in params]}],
        lr=LR,
        weight_decay=WD,
        ns_dtype="float32",
        wire_dtype=wire_dtype,
        bucket_mb=bucket_mb,
    )
    calls = {"n": 0}
    original = dist.all_to_all_single

    def counting(*a, **k):
        calls["n"] += 1
        return original(*a, **k)

    dist.all_to_all_single = counting
    try:
        for step_grads in grads:
            calls["n"] = 0
            for p, g, (_, _, d) in zip(ps, step_grads, params):
                p.grad = place(g, d)
            opt.step()
    finally:
        dist.all_to_all_single = original
    return [local(p).detach().cpu() for p in ps], opt.last_step_stats, opt.plan_report(), calls["n"]


def part_owner_engine(cfg: Config, part: Part, ctx: dict) -> None:
    dev = cfg.device
    ensure_process_group(cfg)
    params = engine_params(cfg)
    # (a) the backend's all_to_all_single on device buffers, 1 rank, bf16 and fp32.
    for dtype in (torch.bfloat16, torch.float32):
        send = torch.arange(1000, device=dev, dtype=dtype)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, [1000], [1000])
        sync(dev)
        part.check(
            f"{dist.get_backend()} all_to_all_single, 1 rank, {dtype}: max |recv - send|",
            float((recv.float() - send.float()).abs().max()),
            max_value=0,
        )
    # (b) bucketing on device buffers: one matrix per bucket vs everything in one bucket.
    tiny, _, _, _ = engine_run(cfg, params, cfg.engine_steps, "float32", 1e-6, dev)
    big, stats, report, _ = engine_run(cfg, params, cfg.engine_steps, "float32", 1024.0, dev)
    err = update_rel_err(tiny, big, [t for _, t, _ in params])
    part.check(
        "1 rank: one matrix per bucket vs one bucket, rel. difference",
        err,
        max_value=TOL["bucket_fp32"],
        why="bucketing regroups same-shape matrices into other batched calls; the math is the same",
    )
    part.check(
        "1 rank: matrices orthogonalized per step",
        stats.get("ns_matrices", -1),
        min_value=sum(math.prod(t.shape[:-2]) for _, t, _ in params),
        max_value=sum(math.prod(t.shape[:-2]) for _, t, _ in params),
    )
    part.data["one_rank"] = {"last_step_stats": stats, "plan_report": report, "rel_err_buckets": err}
    # (c) two gloo ranks sharing this device: the all_to_all path, several buckets, uneven shards, vs one process.
    if part.out_of_time("2 gloo ranks on one device"):
        return
    want, _, _, _ = engine_run(cfg, params, cfg.engine_steps, "float32", 1024.0, dev)
    world = 2
    rank_results = _spawn_engine_ranks(cfg, world, part.budget.left())
    rows = []
    for wire in ("float32", "bfloat16"):
        per_rank = [r[wire] for r in rank_results]
        failed = [f"rank {r}: {x['error']}" for r, x in enumerate(per_rank) if "error" in x]
        if failed:  # the other wire dtype's results still count
            part.check(f"2 ranks, {wire} wire: ranks that raised", len(failed), max_value=0, why=" | ".join(failed))
            rows.append([wire, "error", "-", "-", "-", "-", "-", "-", "-"])
            continue
        got = [torch.cat([per_rank[r]["params"][i] for r in range(world)], dim=d) for i, (_, _, d) in enumerate(params)]
        err = update_rel_err(got, want, [t for _, t, _ in params])
        part.data[f"two_ranks_{wire}_rel_err_per_param"] = {
            n: update_rel_err([g], [w], [t]) for (n, t, _), g, w in zip(params, got, want)
        }
        key = "ranks_fp32_wire" if wire == "float32" else "ranks_bf16_wire"
        part.check(f"2 ranks, {wire} wire vs one process: rel. difference of the update", err, max_value=TOL[key])
        for r in range(world):
            part.check(
                f"2 ranks, {wire} wire: rank {r} bytes sent per step", per_rank[r]["stats"]["bytes_sent"], min_value=1
            )
            part.check(
                f"2 ranks, {wire} wire: rank {r} all_to_all_single calls per step",
                per_rank[r]["a2a_calls"],
                min_value=4,
                why="2 per bucket (gather + scatter); >= 2 buckets",
            )
        rows.append(
            [
                wire,
                f"{err:.2e}",
                TOL[key],
                *[per_rank[r]["stats"]["bytes_sent"] for r in range(world)],
                *[per_rank[r]["a2a_calls"] // 2 for r in range(world)],
                *[per_rank[r]["stats"].get("ns_matrices") for r in range(world)],
            ]
        )
    part.data["two_ranks"] = [{w: {k: v for k, v in r[w].items() if k != "params"} for w in r} for r in rank_results]
    part.check("2 ranks: wire dtypes that ran", len(rows) - sum(row[1] == "error" for row in rows), min_value=2)
    part.tables.append(
        f"The 1-rank {dist.get_backend()} group: all_to_all_single round trip exact; one matrix per bucket equals one "
        f"bucket (rel. {part.data['one_rank']['rel_err_buckets']:.1e}). Two gloo ranks on one "
        f"{'GPU (CUDA buffers, gloo stages them through the host)' if dev.type == 'cuda' else 'CPU'}, parameters "
        f"{[tuple(t.shape) for _, t, _ in params]} sharded unevenly (last one on dim 1), one matrix per bucket, "
        f"{cfg.engine_steps} steps, vs one process:\n\n"
        + markdown_table(
            [
                "wire",
                "rel. difference",
                "tolerance",
                "bytes sent r0",
                "bytes sent r1",
                "buckets r0",
                "buckets r1",
                "NS matrices r0",
                "NS matrices r1",
            ],
            rows,
        )
    )


ENGINE_ENV = "GPU_CHECK_ENGINE"  # JSON {"dir", "smoke"} for the ranks that part 6 spawns


def _spawn_engine_ranks(cfg: Config, world: int, timeout_s: float) -> list[dict]:
    import tempfile

    from tests._spawn import run_scenarios

    with tempfile.TemporaryDirectory() as tmp:
        os.environ[ENGINE_ENV] = json.dumps({"dir": tmp, "smoke": cfg.smoke})
        try:
            errors = run_scenarios("gpu_check", ["engine_rank"], world, timeout=max(timeout_s, 30), pg_timeout_s=120)
        finally:
            del os.environ[ENGINE_ENV]
        for r, err in enumerate(errors["engine_rank"]):
            if err is not None:
                raise RuntimeError(f"engine rank {r}:\n{tail(err, 15)}")
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world)]


@scenario(2)
def engine_rank(rank: int, world: int) -> None:
    """One of the gloo ranks of part 6 (spawned by run_scenarios, which made the process group)."""
    job = json.loads(os.environ[ENGINE_ENV])
    cfg = make_config(argparse.Namespace(cpu_smoke=job["smoke"], total_s=None, compile_backend="eager"))
    dev = cfg.device
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    from torch.distributed.device_mesh import DeviceMesh

    mesh = DeviceMesh(dev.type, list(range(world)))
    params = engine_params(cfg)
    out = {}
    for wire in ("float32", "bfloat16"):
        try:
            tensors, stats, report, calls = engine_run(
                cfg, params, cfg.engine_steps, wire, 1e-6, dev, shard=(rank, world, mesh)
            )
            out[wire] = {"params": tensors, "stats": stats, "a2a_calls": calls, "plan_report": report}
        except Exception:  # noqa: BLE001 - reported to the parent, which records it
            out[wire] = {"error": tail(traceback.format_exc(), 6)}
    torch.save(out, Path(job["dir"]) / f"rank{rank}.pt")


# ============================================================================ driver
PARTS = [
    ("environment", part_environment),
    ("correctness", part_correctness),
    ("newton_schulz", part_newton_schulz),
    ("optimizer_step", part_optimizer_step),
    ("training", part_training),
    ("owner_engine", part_owner_engine),
]


def jsonable(x):
    """Plain JSON types all the way down (dict keys as strings, tensors and other objects as numbers or text)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if torch.is_tensor(x):
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


def write(out_dir: Path, report: dict) -> str:
    parts = report["parts"]
    rows = [
        [
            name,
            p["status"],
            f"{p['wall_s']:.1f}",
            p["budget_s"],
            f"{sum(c['ok'] for c in p['checks'])}/{len(p['checks'])}",
            len(p["skipped"]),
            (p.get("error") or "").strip().splitlines()[-1][:80] if p.get("error") else "",
        ]
        for name, p in parts.items()
    ]
    env = parts.get("environment", {}).get("data", {})
    head = (
        f"# GPU check ({'CPU smoke' if report['smoke'] else 'GPU'})\n\n"
        f"{report['date_utc']}; {env.get('gpu', 'no GPU')}; torch {torch.__version__}; "
        f"command `{report['command']}`; total {report['total_wall_s']:.0f} s.\n\n"
    )
    md = head + markdown_table(["part", "status", "wall s", "budget s", "checks ok", "skipped", "error"], rows)
    for name, p in parts.items():
        md += f"\n\n## {name}\n\n" + "\n\n".join(p["tables"])
        bad = [c for c in p["checks"] if not c["ok"]]
        if bad:
            md += "\n\nChecks outside their bounds:\n" + "\n".join(
                f"- {c['name']}: {c['value']:.3g} (max {c['max']}, min {c['min']}) {c['why']}" for c in bad
            )
        if p["skipped"]:
            md += "\n\nSkipped:\n" + "\n".join(f"- {s}" for s in p["skipped"])
        if p.get("error"):
            md += f"\n\nError:\n\n```\n{p['error']}\n```"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(jsonable(report), indent=2) + "\n")
    (out_dir / "gpu_check.md").write_text(md + "\n")
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--out",
        default=None,
        help="folder for gpu_check.json/.md (default benchmarks/results/gpu_check; "
        "with --cpu-smoke outputs/gpu_check_smoke, which git ignores: smoke numbers are no results)",
    )
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, CPU, gloo: the CI check of the code paths")
    ap.add_argument("--parts", default=",".join(n for n, _ in PARTS), help="comma-separated subset of the parts")
    ap.add_argument("--total-s", type=float, default=None, help="overall budget; later parts are skipped past it")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend on the GPU")
    args = ap.parse_args(argv)
    cfg = make_config(args)
    if cfg.smoke:
        torch.set_num_threads(1)
    # A hang (a collective that never completes, say) prints every thread's stack and ends the run; the JSON of
    # the parts done so far is already written.
    faulthandler.dump_traceback_later(cfg.total_s + 50, exit=True)
    wanted = args.parts.split(",")
    unknown = [w for w in wanted if w not in dict(PARTS)]
    if unknown:
        ap.error(f"unknown part(s) {unknown}; the parts are {[n for n, _ in PARTS]}")
    out_dir = (
        Path(args.out)
        if args.out
        else (REPO / "outputs" / "gpu_check_smoke" if cfg.smoke else HERE / "results" / "gpu_check")
    )
    start = time.perf_counter()
    report = {
        "smoke": cfg.smoke,
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "tolerances": TOL,
        "device": str(cfg.device),
        "total_budget_s": cfg.total_s,
        "parts": {},
    }
    ctx: dict = {}
    for name, fn in PARTS:
        if name not in wanted:
            continue
        remaining = cfg.total_s - (time.perf_counter() - start)
        budget = Budget(min(cfg.budgets[name], max(remaining, 0.0)))
        part = Part(name, budget)
        print(f"\n== {name} (budget {budget.seconds:.0f} s)", flush=True)
        error = None
        if remaining < 5:
            status = "skipped"
            part.skip(f"whole part: the overall budget of {cfg.total_s:.0f} s is used up")
        else:
            try:
                fn(cfg, part, ctx)
                status = "ok" if all(c["ok"] for c in part.checks) else "mismatch"
            except Exception:  # noqa: BLE001 - recorded; the next part runs
                error = tail(traceback.format_exc(), 15)
                status = "error"
                print(error, flush=True)
        free_memory(cfg.device)
        report["parts"][name] = {
            "status": status,
            "wall_s": budget.used(),
            "budget_s": budget.seconds,
            "data": part.data,
            "checks": part.checks,
            "skipped": part.skipped,
            "tables": part.tables,
            "error": error,
        }
        report["total_wall_s"] = time.perf_counter() - start
        write(out_dir, report)
        print(f"== {name}: {status} in {budget.used():.1f} s", flush=True)
    report["total_wall_s"] = time.perf_counter() - start
    md = write(out_dir, report)
    print("\n" + md)
    print(f"\nwrote {out_dir / 'gpu_check.json'} and {out_dir / 'gpu_check.md'}")
    if dist.is_initialized():
        dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()
    return 0 if all(p["status"] == "ok" for p in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
