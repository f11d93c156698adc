"""Our optimizer against its peers, steps interleaved on the same ranks, as paired ratios with 95% intervals.

    python benchmarks/bench_peers.py                       # default run: 2 ranks, debug, wide, llama3_8b_shape, twice
    python benchmarks/bench_peers.py --models wide --repeat 1 --rounds 20
    python benchmarks/bench_peers.py --ranks 2,4 --models debug
    python benchmarks/bench_peers.py --only-tiny            # 512 tiny matrices, MARSM vs AdamW foreach, 1 rank
    python benchmarks/bench_peers.py --models wide --profile 3   # + cProfile of each optimizer's step
    python benchmarks/bench_peers.py --only-tiny --tiny 0 --kernels 1792x512,512x512   # NS kernels alone

Why interleaved: on a shared machine, load comes and goes in bursts of seconds to minutes. Timing each
optimizer's steps as one block puts a burst on whichever block it meets; here every *round* runs one step of
every entry (A, B, C, ... in an order that rotates by one each round, so no entry always follows the
forward/backward or another entry), and each ratio is formed within a round, where all entries saw the same load.

Setup per model and rank count: every optimizer gets its own copy of the model (same seed: identical weights),
FSDP2 ``fully_shard`` per block and at the root on a 1-D "fsdp" mesh, gloo on CPU (NCCL on CUDA), built by
``bench_distributed.build_optimizer`` (so the optimizers, their settings and DistMuon's CPU path are the ones
bench_distributed.py measures). Each round, one reference copy (never stepped) runs forward and backward on that
round's batch, and its gradients are copied into every optimizer's copy: identical data, one backward per round.
Each entry's step: ``dist.barrier()``, then ``opt.step()`` timed on every rank; after all rounds the per-rank
times are gathered and a step's time is the slowest rank's (all ranks measured the same step).

Floors, timed as entries of the same interleaving (so they see the same load as the steps they bound):
- ``our_plan_floor``: every rank orthogonalizes, with the owners' own Newton-Schulz call, exactly the matrices
  it owns in the plan of the first MARS-M optimizer (random fp32 inputs of the full shapes).
- ``distmuon_plan_floor``: every rank runs DistMuon's own ``_zeropower_via_newtonschulz`` on tensors of the
  shapes its ``_compute_update`` received in a warm-up step (DistMuon's own assignment of matrices to ranks).

Statistics: per round i and pair (ours, peer), r_i = t_ours,i / t_peer,i. Reported: the geometric mean of r_i
and a 95% bootstrap percentile interval of it (10,000 resamples of the rounds with replacement, fixed seed 0),
after ``--warmup-rounds`` discarded rounds. With ``--repeat 2`` (default) the whole measurement runs twice back to
back, each model of each repetition in freshly spawned ranks, and the table says whether the two intervals
overlap.

Alongside, a CPU-time ratio of the same pairs: per round, the step's process CPU time (``time.process_time``,
gloo's threads included) summed over ranks. Other processes' load barely moves it, but it leaves out time spent
waiting on another rank, so the wall-time ratio is the verdict and the CPU-time ratio tells work from waiting.

Phases: after the timed rounds, ``--phase-rounds`` more interleaved rounds record per-phase times (not used in
the ratios, so instrumentation cannot bias them). Ours: ``opt.last_step_stats["phase_s"]`` with
``opt.record_phases = True`` when the optimizer provides it; otherwise the benchmark wraps the step's internal
functions (same phase names; skipped where a name is absent). DistMuon: the benchmark wraps its
``_prepare_local`` / ``_compute_update`` / ``_apply_update`` and the packed all_to_all runtime's stages. Each
wrapped function is charged its own time minus that of wrapped functions it calls; "unaccounted" is the step
minus the phases. Per round the slowest rank's phases are taken, then averaged over rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import io
import math
import pstats
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_distributed
from _common import (
    LLAMA3,
    MODEL_CONFIGS,
    Attention,
    LlamaLike,
    lm_loss,
    machine_info,
    make_model,
    markdown_table,
    median,
    save,
)

# ============================================================ models
# Llama 3 8B's matrix proportions at 1/8 of its width: head_dim 128, 4 query heads per KV head (GQA), FFN
# hidden 3.5 x dim; 2 layers so it runs on a small CPU. Embeddings and the output head go to AdamW in every
# optimizer, so a small vocabulary changes only the AdamW share.
_L3 = LLAMA3["8B"]
LLAMA3_8B_SHAPE = {
    "dim": _L3["dim"] // 8,
    "n_layers": 2,
    "ffn": _L3["ffn"] // 8,
    "vocab": 2048,
    "n_heads": _L3["n_heads"] // 8,
    "n_kv_heads": _L3["n_kv_heads"] // 8,
}
MODELS = {**{k: dict(v) for k, v in MODEL_CONFIGS.items()}, "llama3_8b_shape": LLAMA3_8B_SHAPE}


class GroupedQueryAttention(Attention):
    """Attention with fewer key/value heads than query heads (wk, wv are n_kv_heads x head_dim rows)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int):
        super().__init__(dim, n_heads)
        self.n_kv_heads = n_kv_heads
        kv = n_kv_heads * (dim // n_heads)
        self.wk = nn.Linear(dim, kv, bias=False)
        self.wv = nn.Linear(dim, kv, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        hd = d // self.n_heads
        q = self.wq(x).view(b, t, self.n_heads, hd).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_kv_heads, hd).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv_heads, hd).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(b, t, d))


def build_model(name: str, device) -> LlamaLike:
    if name in MODEL_CONFIGS:
        return make_model(name, seed=0, device=device)
    c = dict(MODELS[name])
    kv_heads = c.pop("n_kv_heads")
    torch.manual_seed(0)
    model = LlamaLike(**c)
    for block in model.layers:
        block.attention = GroupedQueryAttention(c["dim"], c["n_heads"], kv_heads)
        for lin in (block.attention.wq, block.attention.wk, block.attention.wv, block.attention.wo):
            nn.init.normal_(lin.weight, std=1.0 / math.sqrt(lin.weight.shape[1]))
    return model.to(device)


def fsdp_model(name: str, mesh, device):
    from torch.distributed.fsdp import fully_shard

    model = build_model(name, device)
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


# ============================================================ phase timing by wrapping functions
class PhaseClock:
    """Seconds per label, each wrapped call charged its own time minus that of wrapped calls inside it."""

    _MISSING = object()

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._children: list[float] = []

    def wrap(self, label: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self._children.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                inner = self._children.pop()
                self.seconds[label] += elapsed - inner
                if self._children:
                    self._children[-1] += elapsed

        return timed

    @contextlib.contextmanager
    def patched(self, targets):
        """targets: (object, attribute, label); absent attributes are skipped. Restored on exit."""
        saved = []
        for owner, attr, label in targets:
            if owner is None or not hasattr(owner, attr):
                continue
            raw = vars(owner).get(attr, self._MISSING) if hasattr(owner, "__dict__") else self._MISSING
            new = self.wrap(label, getattr(owner, attr))
            setattr(owner, attr, staticmethod(new) if isinstance(raw, staticmethod) else new)
            saved.append((owner, attr, raw))
        try:
            yield
        finally:
            for owner, attr, raw in reversed(saved):
                if raw is self._MISSING:
                    delattr(owner, attr)
                else:
                    setattr(owner, attr, raw)


def marsm_phase_targets(opt):
    """Our step's internal functions, for when the optimizer does not report ``phase_s`` itself."""
    from dist_marsm import collectives, mars_math
    from dist_marsm.collectives import OwnerCompute

    return [
        (opt, "_stage", "stage"),
        (opt, "_all_reduce", "all_reduce"),
        (mars_math, "momentum_updates", "momentum"),
        (mars_math, "efficient_momentum_updates", "momentum"),
        (OwnerCompute, "_start_gather", "gather"),
        (OwnerCompute, "_finish_gather", "gather"),
        (collectives, "_orthogonalize_batched", "newton_schulz"),
        (OwnerCompute, "_start_scatter", "scatter"),
        (OwnerCompute, "_finish_scatter", "scatter"),
        (opt, "_apply", "apply"),
        (opt, "_update_adamw", "adamw"),
    ]


def distmuon_phase_targets(dm):
    from torchtitan.distributed.flex_shard import _optimizer_reshard_runtime as rt

    runtime = rt._BucketedRedistributionRuntime
    return [
        (dm, "_prepare_local", "momentum"),
        (rt, "_prepare_redistributed", "pack"),
        (runtime, "_enqueue_storage_to_compute", "gather (all_to_all)"),
        (rt, "_compute_redistributed", "unpack+pack"),
        (dm, "_compute_update", "newton_schulz"),
        (runtime, "_enqueue_compute_to_storage", "scatter (all_to_all)"),
        (rt, "_finalize_redistributed", "unpack"),
        (dm, "_apply_update", "apply"),
    ]


# ============================================================ entries: what one interleaved slot runs
def sync(device):
    bench_distributed.sync(device)


class OptimizerEntry:
    def __init__(self, kind, model_name, mesh, device, args):
        self.kind, self.device = kind, device
        self.model = fsdp_model(model_name, mesh, device)
        self.opt = bench_distributed.build_optimizer(kind, self.model, args.ns_dtype, args.ns_method)
        self.params = list(self.model.parameters())
        self.reports_phases = False

    def load_grads(self, ref_params):
        for p, r in zip(self.params, ref_params):
            if r.grad is None:
                p.grad = None
            elif p.grad is None:
                p.grad = r.grad.detach().clone()
            else:
                p.grad._local_tensor.copy_(r.grad._local_tensor)

    def step(self):
        self.opt.step()

    # -- phases
    def _inner(self):
        return self.opt.optimizers if hasattr(self.opt, "optimizers") else (self.opt,)

    def phased_step(self) -> tuple[dict, str]:
        """One step with per-phase seconds; returns (phases, source)."""
        if self.kind.startswith("marsm"):
            self.opt.record_phases = True
            clock = PhaseClock()  # used only where the optimizer does not report its phases itself
            with clock.patched([] if self.reports_phases else marsm_phase_targets(self.opt)):
                self.opt.step()
            reported = (self.opt.last_step_stats or {}).get("phase_s")
            self.reports_phases = bool(reported)
            if reported:
                return dict(reported), "opt.last_step_stats['phase_s']"
            return dict(clock.seconds), "benchmark wrappers"
        if self.kind.startswith("distmuon"):
            dm, adamw = self._inner()
            clock = PhaseClock()
            with clock.patched(distmuon_phase_targets(getattr(dm, "optimizer", dm))):
                dm.step()
            start = time.perf_counter()
            adamw.step()
            clock.seconds["adamw"] += time.perf_counter() - start
            return dict(clock.seconds), "benchmark wrappers"
        return {}, "-"

    def profile(self, steps: int) -> str:
        prof = cProfile.Profile()
        for _ in range(steps):
            dist.barrier()
            prof.enable()
            self.opt.step()
            prof.disable()
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(45)
        return out.getvalue()


class OurPlanFloor:
    """Each rank orthogonalizes the matrices it owns in a MARSM's plan, with the owners' Newton-Schulz call."""

    kind = "our_plan_floor"

    def __init__(self, marsm, device):
        plans = [fg.owner_plan for fg in marsm.step_plan.flat_groups]
        gen = torch.Generator(device=device).manual_seed(1)
        self.work = [
            (
                plan,
                {
                    pos: torch.randn(e.shape, generator=gen, device=device)
                    for pos, e in enumerate(plan.entries)
                    if e.owner == plan.my_rank
                },
            )
            for plan in plans
        ]

    def step(self):
        for plan, fulls in self.work:
            if fulls:
                bench_distributed.owner_orthogonalize(fulls, plan.entries)


class DistMuonPlanFloor:
    """Each rank runs DistMuon's own Newton-Schulz on the compute tensors DistMuon gave it in one step."""

    kind = "distmuon_plan_floor"

    def __init__(self, seen: list[tuple[torch.Size, torch.dtype, dict]], device):
        gen = torch.Generator(device=device).manual_seed(2)
        self.work = [
            (torch.randn(shape, generator=gen, device=device).to(dtype), group) for shape, dtype, group in seen
        ]

    def step(self):
        from torchtitan.distributed.flex_shard.dist_muon import _zeropower_via_newtonschulz

        for x, g in self.work:
            _zeropower_via_newtonschulz(x, ns_coefficients=g["ns_coefficients"], ns_steps=g["ns_steps"], eps=g["eps"])


def record_distmuon_compute(entry: OptimizerEntry) -> list:
    """Shapes and settings of what DistMuon's _compute_update receives on this rank in one step."""
    dm = entry.opt.optimizers[0]
    dm = getattr(dm, "optimizer", dm)  # the CPU adapter wraps it; on CUDA it is DistMuon itself
    seen, original = [], dm._compute_update

    def recording(compute_layout, compute):
        if compute_layout.compute_view is not None:
            view = compute_layout.compute_view.view_as_matrix_batch(compute)
        else:
            view = compute
        g = dm._group(compute_layout)
        seen.append((view.shape, view.dtype, {k: g[k] for k in ("ns_coefficients", "ns_steps", "eps")}))
        return original(compute_layout, compute)

    dm._compute_update = recording
    try:
        entry.opt.step()
    finally:
        del dm._compute_update
    return seen


# ============================================================ statistics
def geo_mean_interval(ratios: list[float], resamples: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Geometric mean of ``ratios`` and its 95% bootstrap percentile interval (resampling rounds)."""
    logs = [math.log(r) for r in ratios]
    n = len(logs)
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(logs, k=n)) / n for _ in range(resamples))
    lo, hi = means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]
    return math.exp(sum(logs) / n), math.exp(lo), math.exp(hi)


# ============================================================ one rank
def measure_model(model_name, mesh, device, args, rank, world) -> dict:
    ref = fsdp_model(model_name, mesh, device)
    ref_params = list(ref.parameters())
    entries = [OptimizerEntry(k, model_name, mesh, device, args) for k in args.kinds]

    def backward(i):
        ref.zero_grad(set_to_none=True)
        lm_loss(ref, i, args.batch, args.seq, device).backward()
        for e in entries:
            e.load_grads(ref_params)

    # One step each builds plans and state (not timed), and tells the floors what each rank computes.
    backward(0)
    floors = []
    for e in entries:
        if e.kind.startswith("distmuon") and "distmuon_plan_floor" not in [f.kind for f in floors] and args.floors:
            floors.append(DistMuonPlanFloor(record_distmuon_compute(e), device))
        else:
            e.step()
        if e.kind.startswith("marsm") and "our_plan_floor" not in [f.kind for f in floors] and args.floors:
            floors.insert(0, OurPlanFloor(e.opt, device))
    slots = entries + floors
    times = {s.kind: [] for s in slots}
    cpu = {s.kind: [] for s in slots}
    n_rounds = args.warmup_rounds + args.rounds
    t_start = time.perf_counter()
    for i in range(n_rounds):
        backward(i + 1)
        shift = i % len(slots)
        for s in slots[shift:] + slots[:shift]:
            dist.barrier()
            sync(device)
            t, c = time.perf_counter(), time.process_time()
            s.step()
            sync(device)
            times[s.kind].append(time.perf_counter() - t)
            cpu[s.kind].append(time.process_time() - c)
        if rank == 0 and (i + 1) % 10 == 0:
            print(
                f"  [{model_name}, {world} ranks] round {i + 1}/{n_rounds} ({time.perf_counter() - t_start:.0f}s)",
                flush=True,
            )
    phases = {e.kind: [] for e in entries}
    sources = {}
    for i in range(args.phase_rounds):
        backward(n_rounds + i + 1)
        shift = i % len(entries)
        for e in entries[shift:] + entries[:shift]:
            dist.barrier()
            sync(device)
            t = time.perf_counter()
            ph, sources[e.kind] = e.phased_step()
            sync(device)
            phases[e.kind].append({"step": time.perf_counter() - t, **ph})
    profiles = {}
    for e in entries if args.profile else ():
        text = e.profile(args.profile)
        if rank == 0:
            profiles[e.kind] = text
    rec = {"times": times, "cpu": cpu, "phases": phases, "phase_sources": sources, "profiles": profiles}
    everyone = [None] * world
    dist.all_gather_object(everyone, rec)
    return everyone


def rank_main(rank, world, port, args, queue, repeat, model_name):
    device, mesh = bench_distributed.init_rank(rank, world, port, args)
    t = time.perf_counter()
    res = measure_model(model_name, mesh, device, args, rank, world)
    if rank == 0:
        queue.put(res)
        print(f"[run {repeat + 1}] {model_name}, {world} ranks: {time.perf_counter() - t:.0f}s", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def spawn(world: int, args, repeat: int, model_name: str) -> list:
    """One measurement (one model, one repetition) in freshly spawned ranks: no measurement inherits the
    allocator and cache state another left behind, which moved short steps such as AdamW's between
    back-to-back repetitions in one process (docs/peers.md)."""
    import queue as queue_mod

    import torch.multiprocessing as mp
    from torch.distributed.elastic.utils.distributed import get_free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = get_free_port()
    procs = [
        ctx.Process(target=rank_main, args=(r, world, port, args, queue, repeat, model_name)) for r in range(world)
    ]
    for p in procs:
        p.start()
    try:
        out = queue.get(timeout=args.pg_timeout)
    except queue_mod.Empty:
        for p in procs:
            p.kill()
        sys.exit(f"bench_peers: rank 0 did not report at {world} ranks (a rank died or hung)")
    for p in procs:
        p.join(timeout=60)
    return out


# ============================================================ tiny matrices, one rank
def measure_tiny(args) -> dict:
    """MARSM vs torch.optim.AdamW(foreach=True) on ``--tiny`` 16 x 16 matrices, one process, interleaved."""
    from bench_host_overhead import TinyMatrices

    from dist_marsm import MARSM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    models = {"marsm": TinyMatrices(args.tiny), "adamw": TinyMatrices(args.tiny)}
    models["adamw"].load_state_dict(models["marsm"].state_dict())
    opts = {
        "marsm": MARSM(
            [{"params": list(models["marsm"].parameters()), "use_mars": True}], lr=1e-3, ns_dtype=args.tiny_ns_dtype
        ),
        "adamw": torch.optim.AdamW(models["adamw"].parameters(), lr=1e-3, foreach=True),
    }
    params = {k: list(m.parameters()) for k, m in models.items()}
    times = {k: [] for k in opts}
    order = list(opts)
    for i in range(args.tiny_warmup + args.tiny_rounds):
        gen = torch.Generator().manual_seed(i)
        grads = [torch.randn(p.shape, generator=gen) * 0.01 for p in params["marsm"]]
        for k in order:
            for p, g in zip(params[k], grads):
                p.grad = g.clone()
        for k in order[i % 2 :] + order[: i % 2]:
            t = time.perf_counter()
            opts[k].step()
            times[k].append(time.perf_counter() - t)
    w = args.tiny_warmup
    ratios = [a / b for a, b in zip(times["marsm"][w:], times["adamw"][w:])]
    gm, lo, hi = geo_mean_interval(ratios)
    return {
        "matrices": args.tiny,
        "rounds": args.tiny_rounds,
        "ns_dtype": args.tiny_ns_dtype,
        "marsm_median_ms": median(times["marsm"][w:]) * 1e3,
        "adamw_median_ms": median(times["adamw"][w:]) * 1e3,
        "ratio": gm,
        "ci95": [lo, hi],
        "times": times,
    }


# ============================================================ Newton-Schulz kernels, one matrix, one thread
def measure_kernels(args) -> list[dict]:
    """Our ``newton_schulz`` against DistMuon's ``_zeropower_via_newtonschulz`` per shape, bf16, 5 steps,
    alternating calls; thread CPU time, so other processes' load does not enter."""
    from torchtitan.distributed.flex_shard.dist_muon import _zeropower_via_newtonschulz

    from dist_marsm.newton_schulz import MUON_COEFFICIENTS, newton_schulz

    torch.set_num_threads(1)
    rows = []
    for spec in args.kernels.split(","):
        shape = tuple(int(x) for x in spec.split("x"))
        m = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        calls = {
            "ours": lambda m=m: newton_schulz(m, 5, torch.bfloat16),
            "distmuon": lambda m=m: _zeropower_via_newtonschulz(
                m, ns_coefficients=MUON_COEFFICIENTS, ns_steps=5, eps=1e-7
            ),
        }
        times = {k: [] for k in calls}
        for i in range(args.kernel_reps + 1):
            for k in list(calls) if i % 2 else list(calls)[::-1]:
                start = time.thread_time()
                calls[k]()
                times[k].append(time.thread_time() - start)
        ratios = [a / b for a, b in zip(times["ours"][1:], times["distmuon"][1:])]
        gm, lo, hi = geo_mean_interval(ratios)
        rows.append(
            {
                "shape": spec,
                "ours_ms": median(times["ours"][1:]) * 1e3,
                "distmuon_ms": median(times["distmuon"][1:]) * 1e3,
                "ratio": gm,
                "ci95": [lo, hi],
            }
        )
    return rows


# ============================================================ report
LABELS = {
    **{k: v[0] for k, v in bench_distributed.KINDS.items()},
    "our_plan_floor": "our plan floor (NS of owned matrices only)",
    "distmuon_plan_floor": "DistMuon plan floor (its NS kernel, its assignment)",
}


FLOORS = ("our_plan_floor", "distmuon_plan_floor")
PHASE_ORDER = (
    "stage",
    "all_reduce",
    "momentum",
    "pack",
    "gather",
    "gather (all_to_all)",
    "unpack+pack",
    "newton_schulz",
    "scatter",
    "scatter (all_to_all)",
    "unpack",
    "apply",
    "adamw",
    "unaccounted",
)


def pairs_for(kinds: list[str]) -> list[tuple[str, str]]:
    """(ours, peer) for every MARS-M kind and every other optimizer; each optimizer over its own floor."""
    ours = [k for k in kinds if k.startswith("marsm")]
    peers = [k for k in kinds if not k.startswith("marsm") and k not in FLOORS]
    out = [(o, p) for o in ours for p in peers]
    out += [(o, "our_plan_floor") for o in ours if "our_plan_floor" in kinds]
    out += [(p, "distmuon_plan_floor") for p in peers if p.startswith("distmuon") and "distmuon_plan_floor" in kinds]
    return out


def summarize_model(per_rank: list[dict], args) -> dict:
    kinds = list(per_rank[0]["times"])
    n = args.warmup_rounds + args.rounds
    step = {k: [max(r["times"][k][i] for r in per_rank) for i in range(n)][args.warmup_rounds :] for k in kinds}
    medians = {k: median(v) for k, v in step.items()}
    cpu = {k: [sum(r["cpu"][k][i] for r in per_rank) for i in range(n)][args.warmup_rounds :] for k in kinds}
    ratios = {}
    for a, b in pairs_for(kinds):
        gm, lo, hi = geo_mean_interval([x / y for x, y in zip(step[a], step[b])])
        cgm, clo, chi = geo_mean_interval([x / y for x, y in zip(cpu[a], cpu[b])])
        ratios[f"{a} / {b}"] = {"ratio": gm, "ci95": [lo, hi], "cpu_ratio": cgm, "cpu_ci95": [clo, chi]}
    phases = {}
    for k, rounds in per_rank[0]["phases"].items():
        if not rounds or all(len(ph) == 1 for ph in rounds):  # nothing but the step: no phases to show
            continue
        by_rank = []
        for r in per_rank:
            acc = defaultdict(float)
            for ph in r["phases"][k]:
                for name, sec in ph.items():
                    acc[name] += sec / len(rounds)
            acc["unaccounted"] = acc["step"] - sum(v for name, v in acc.items() if name != "step")
            by_rank.append(dict(acc))
        names = sorted(
            {n for acc in by_rank for n in acc},
            key=lambda n: (PHASE_ORDER + ("step",)).index(n) if n in PHASE_ORDER + ("step",) else -1,
        )
        phases[k] = {
            "source": per_rank[0]["phase_sources"].get(k),
            "per_rank_mean_s": [{n: acc.get(n, 0.0) for n in names} for acc in by_rank],
        }
    return {
        "median_s": medians,
        "ratios": ratios,
        "phases": phases,
        "step_s": step,
        "cpu_s": cpu,
        "raw_per_rank": [{"times": r["times"], "cpu": r["cpu"], "phases": r["phases"]} for r in per_rank],
    }


def overlap(a, b) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def report(results: dict, tiny: dict | None, args, kernels: list | None = None) -> tuple[dict, str]:
    parts, data = [], {"args": dict(vars(args)), "runs": {}, "tiny": tiny, "kernels": kernels}
    stats_line = (
        f"Ratios: geometric mean over {args.rounds} interleaved rounds (after {args.warmup_rounds} "
        f"discarded) of t_ours / t_peer within a round, each step timed as its slowest rank; [95% bootstrap "
        f"percentile interval, 10,000 resamples, seed 0]. {args.threads} torch thread(s) per rank, "
        f"batch {args.batch} x seq {args.seq}, NS {args.ns_dtype} / {args.ns_method} for MARS-M."
    )
    if results:
        parts.append(stats_line)
    for (world, repeat, model), per_rank in sorted(results.items(), key=lambda x: (x[0][0], x[0][2], x[0][1])):
        data["runs"][f"{model}/{world}r/run{repeat + 1}"] = summarize_model(per_rank, args)
    summary_rows = []
    for world in sorted({w for w, _, _ in results}):
        for model in args.models:
            runs = [data["runs"].get(f"{model}/{world}r/run{r + 1}") for r in range(args.repeat)]
            runs = [r for r in runs if r]
            if not runs:
                continue
            cfg = MODELS[model]
            head = f"### {model} ({cfg}), {world} ranks"
            rows = []
            for pair in runs[0]["ratios"]:
                cells = [
                    f"{r['ratios'][pair]['ratio']:.3f} [{r['ratios'][pair]['ci95'][0]:.3f}, "
                    f"{r['ratios'][pair]['ci95'][1]:.3f}]"
                    for r in runs
                ]
                cpu_cells = [
                    f"{r['ratios'][pair]['cpu_ratio']:.3f} [{r['ratios'][pair]['cpu_ci95'][0]:.3f}, "
                    f"{r['ratios'][pair]['cpu_ci95'][1]:.3f}]"
                    for r in runs
                ]
                stable = (
                    all(overlap(runs[0]["ratios"][pair]["ci95"], r["ratios"][pair]["ci95"]) for r in runs[1:])
                    if len(runs) > 1
                    else None
                )
                a, b = pair.split(" / ")
                row = (
                    [f"{LABELS.get(a, a)} / {LABELS.get(b, b)}", *cells]
                    + (["yes" if stable else "NO"] if stable is not None else [])
                    + cpu_cells
                )
                rows.append(row)
                summary_rows.append(
                    [model, world, pair, *cells] + (["yes" if stable else "NO"] if stable is not None else [])
                )
            headers = (
                ["ratio (wall time)"]
                + [f"run {i + 1}" for i in range(len(runs))]
                + (["intervals overlap"] if len(runs) > 1 else [])
                + [f"CPU-time ratio, run {i + 1}" for i in range(len(runs))]
            )
            med_rows = [[LABELS.get(k, k)] + [r["median_s"][k] * 1e3 for r in runs] for k in runs[0]["median_s"]]
            med = markdown_table(["entry"] + [f"median ms, run {i + 1}" for i in range(len(runs))], med_rows)
            last = runs[-1]["phases"]
            columns = [
                n
                for n in PHASE_ORDER + ("step",)
                if any(n in acc for p in last.values() for acc in p["per_rank_mean_s"])
            ]
            columns += sorted({n for p in last.values() for acc in p["per_rank_mean_s"] for n in acc} - set(columns))
            ph_rows = [
                [LABELS.get(k, k), rank] + [acc[n] * 1e3 if n in acc else None for n in columns]
                for k, p in last.items()
                for rank, acc in enumerate(p["per_rank_mean_s"])
            ]
            sources = "; ".join(f"{LABELS.get(k, k)}: {p['source']}" for k, p in last.items())
            parts.append(
                head
                + "\n\n"
                + markdown_table(headers, rows)
                + "\n\n"
                + med
                + (
                    f"\n\nPer phase, ms (mean of {args.phase_rounds} extra interleaved rounds per rank, "
                    f"last run; a phase that waits on another rank includes the wait; sources: {sources}):"
                    "\n\n" + markdown_table(["optimizer", "rank", *columns], ph_rows)
                    if ph_rows
                    else ""
                )
            )
    if tiny:
        parts.append(
            f"### {tiny['matrices']} tiny 16 x 16 matrices, 1 rank (MARSM ns_dtype={tiny['ns_dtype']})\n\n"
            + markdown_table(
                ["MARSM median ms", "AdamW foreach median ms", "MARSM / AdamW [95% interval]"],
                [
                    [
                        tiny["marsm_median_ms"],
                        tiny["adamw_median_ms"],
                        f"{tiny['ratio']:.3f} [{tiny['ci95'][0]:.3f}, {tiny['ci95'][1]:.3f}]",
                    ]
                ],
            )
            + f"\n\nInterleaved, {tiny['rounds']} rounds after {args.tiny_warmup} discarded; ratio as above."
        )
    if kernels:
        parts.append(
            f"### Newton-Schulz kernel, one matrix, 1 thread, bf16, 5 steps ({args.kernel_reps} alternating "
            "calls each, thread CPU time)\n\n"
            + markdown_table(
                ["shape", "ours ms", "DistMuon ms", "ours / DistMuon [95% interval]"],
                [
                    [
                        k["shape"],
                        k["ours_ms"],
                        k["distmuon_ms"],
                        f"{k['ratio']:.3f} [{k['ci95'][0]:.3f}, {k['ci95'][1]:.3f}]",
                    ]
                    for k in kernels
                ],
            )
        )
    data["summary"] = summary_rows
    return data, "\n\n".join(parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", default="2", help="comma list of rank counts, e.g. 2,4")
    ap.add_argument("--models", default="debug,wide,llama3_8b_shape", help="comma list of " + ",".join(MODELS))
    ap.add_argument(
        "--kinds",
        default="marsm_gamma0,marsm_approx_bf16,distmuon_default,adamw",
        help="comma list of " + ",".join(bench_distributed.KINDS),
    )
    ap.add_argument("--no-floors", dest="floors", action="store_false", help="leave the plan floors out")
    ap.add_argument("--rounds", type=int, default=24)
    ap.add_argument("--warmup-rounds", type=int, default=3)
    ap.add_argument("--phase-rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=2, help="back-to-back repetitions of the whole measurement")
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="cProfile STEPS steps of each optimizer on rank 0 after the rounds (printed and saved)",
    )
    from dist_marsm.newton_schulz import NS_METHODS

    ap.add_argument("--ns-method", default="standard", choices=NS_METHODS)
    ap.add_argument("--ns-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tiny", type=int, default=512, help="tiny 16 x 16 matrices for the 1-rank comparison (0: skip)")
    ap.add_argument("--tiny-rounds", type=int, default=60)
    ap.add_argument("--tiny-warmup", type=int, default=5)
    ap.add_argument("--tiny-ns-dtype", default="float32", choices=("bfloat16", "float32"))
    ap.add_argument("--only-tiny", action="store_true", help="run only the tiny-matrices comparison")
    ap.add_argument(
        "--kernels",
        default="",
        help="comma list of AxB shapes: time each Newton-Schulz kernel alone "
        "(e.g. 1792x512,512x1792,512x512); with --only-tiny --tiny 0, only this",
    )
    ap.add_argument("--kernel-reps", type=int, default=12)
    ap.add_argument("--pg-timeout", type=float, default=1800)
    ap.add_argument(
        "--name", default=None, help="results file stem (default bench_peers; bench_peers_tiny with --only-tiny)"
    )
    args = ap.parse_args()
    # A partial run must not overwrite the full run's results, which the docs cite.
    args.name = args.name or ("bench_peers_tiny" if args.only_tiny else "bench_peers")
    args.models = args.models.split(",")
    args.kinds = args.kinds.split(",")
    unknown = [m for m in args.models if m not in MODELS] + [k for k in args.kinds if k not in bench_distributed.KINDS]
    if unknown:
        ap.error(f"unknown model or kind {unknown[0]!r}")
    results = {}
    if not args.only_tiny:
        for world in map(int, args.ranks.split(",")):
            if torch.cuda.is_available() and world > torch.cuda.device_count():
                print(f"skipping {world} ranks: {torch.cuda.device_count()} GPUs")
                continue
            for repeat in range(args.repeat):
                for model in args.models:
                    results[(world, repeat, model)] = spawn(world, args, repeat, model)
    tiny = measure_tiny(args) if args.tiny else None
    kernels = measure_kernels(args) if args.kernels else None
    data, md = report(results, tiny, args, kernels)
    print("\n" + md)
    for (world, _repeat, model), per_rank in results.items():
        for kind, text in per_rank[0]["profiles"].items():
            path = Path(__file__).resolve().parent / "results" / f"{args.name}_profile_{model}_{world}r_{kind}.txt"
            info = machine_info()
            path.write_text(
                f"cProfile of {args.profile} steps of {kind} on rank 0 of {world} ({model}), "
                f"{info['date_utc']}, {info['cpu']}, torch {info['torch']}, commit {info['commit']}\n"
                f"Command: {info['command']}\n\n{text}"
            )
            print(f"profile of {kind} ({model}, {world} ranks, rank 0): {path}")
    save(args.name, data, md)


if __name__ == "__main__":
    main()
