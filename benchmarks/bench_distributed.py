"""Distributed optimizer step time on one FSDP2 model, every optimizer side by side in one run.

    python benchmarks/bench_distributed.py                      # 4 ranks, debug model
    python benchmarks/bench_distributed.py --ranks 2 --models debug,wide

CPU: gloo, spawned ranks, ``--threads`` torch threads per rank (1). CUDA: NCCL, one GPU per rank,
the same code (DistMuon then runs without the CPU adapter). Per optimizer: a fresh model (same seed,
same data), FSDP2 ``fully_shard`` per block and at the root on a 1-D mesh named "fsdp"; ``--warmup``
steps, then ``--steps`` measured steps. Per step, each rank times ``opt.step()`` and the whole train
step (zero_grad + forward + backward + step) after a barrier; the step's time is the slowest rank's;
the table shows the median over measured steps.

Also per optimizer: optimizer-state bytes per rank (all state tensors' local storage), bytes each rank
sends per optimizer step (counted by wrapping torch.distributed's collectives during ``step()`` only:
all_to_all_single = the input minus this rank's own split; all_gather_into_tensor = input x (W-1);
all_reduce = 2 (W-1)/W x tensor, ring), and the per-model configuration each optimizer needed.

Two Newton-Schulz floors, both timed with the function the MARS-M owners call on their full matrices
(``owner_orthogonalize`` below: the library's own stacking rule and method, never a policy of this script),
on the owner plan of a MARSM built for the model (default owner policy), fp32 inputs as the momentum is:
- plan floor: per repetition, every rank at once (as in a step) orthogonalizes exactly the matrices it owns
  in that plan; the repetition's time is the slowest rank's; median over ``--ns-reps``. A floor for every
  MARS-M row: each step is the slowest rank's, and each rank's step contains that same call on those same
  matrices, plus the communication and element-wise math the floor leaves out.
- perfect-split floor: rank 0 alone orthogonalizes all matrices in one call, divided by W. A floor for any
  one-owner-per-matrix plan when the call's time is additive over matrices (it is, up to the per-call
  overhead that grouping more matrices in one call can only save): the busiest rank owns at least 1/W of
  the work.
Each MARS-M row's floors are timed on that optimizer's own plan right after its measured steps, so floor and
step see the same machine load; the floors of a fresh plan, timed before the first optimizer, are in the
table header and serve the naive Muon row.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import inspect
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (  # noqa: E402
    MODEL_CONFIGS,
    Combined,
    human_bytes,
    lm_loss,
    make_model,
    markdown_table,
    matrix_shapes,
    median,
    save,
    state_bytes,
    sync,
)

# ============================================================ per-model configuration, one function each
# The table reports how many source lines of each function were needed (the optimizer's constructor call
# and the hyperparameters are not counted as configuration: only what describes *this model* is).


def configure_marsm(model):
    from dist_marsm import build_param_groups

    return build_param_groups(model)


def configure_distmuon(model):
    from torchtitan.distributed.flex_shard import BucketConfig, ComputeLayout, Owned

    from dist_marsm import build_param_groups

    muon, rest = build_param_groups(model)  # DistMuon takes matrices only; the rest needs its own AdamW
    layouts = {name: ComputeLayout(shardings_by_mesh_axis={"fsdp": Owned()}) for name in muon["param_names"]}
    buckets = [BucketConfig(patterns=("*",))]
    return muon, rest, layouts, buckets


def configure_naive(model):
    from dist_marsm import build_param_groups

    return build_param_groups(model)


def configure_adamw(model):
    return model.parameters()


def config_lines(fn) -> int:
    """Source lines of a configure_* function's body, without the def line, imports, comments and blanks."""
    body = inspect.getsource(fn).splitlines()[1:]
    return sum(1 for line in body if line.strip() and not line.strip().startswith(("#", "from ", "import ")))


# ============================================================ the naive FSDP Muon (written here, not a library)
class NaiveFSDPMuon(torch.optim.Optimizer):
    """Muon as many FSDP ports do it: every rank all-gathers every full momentum and orthogonalizes all of them.

    Same math as MARSM(gamma=0, clip=False): m = beta m + (1 - beta) g; O = NewtonSchulz(m);
    W *= 1 - lr wd; W -= lr 0.2 sqrt(max(A, B)) O. Not a straw man: one all_gather for the whole model
    (momenta in the wire dtype, padded to equal shards), and same-shape matrices stacked for Newton-Schulz.
    Parameters are FSDP2 DTensors sharded Shard(0) on a 1-D mesh.
    """

    def __init__(
        self,
        params,
        lr=3e-3,
        momentum=0.95,
        weight_decay=0.1,
        ns_dtype=torch.bfloat16,
        wire_dtype=torch.bfloat16,
        ns_method="standard",
    ):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.ns_dtype, self.wire_dtype, self.ns_method = ns_dtype, wire_dtype, ns_method

    @torch.no_grad()
    def step(self, closure=None):
        from dist_marsm.newton_schulz import newton_schulz

        items = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                local = p._local_tensor
                state = self.state[p]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(local, dtype=torch.float32)
                state["momentum"].lerp_(p.grad._local_tensor.float(), 1 - group["momentum"])
                items.append((p, group))
        if not items:
            return None
        group_pg = items[0][0].device_mesh.get_group()
        world = dist.get_world_size(group_pg)
        me = dist.get_rank(group_pg)
        chunk = [math.ceil(p.shape[0] / world) for p, _ in items]  # FSDP2 shards dim 0 like torch.chunk
        width = [math.prod(p.shape[1:]) for p, _ in items]
        sizes = [c * w for c, w in zip(chunk, width)]
        send = torch.zeros(sum(sizes), dtype=self.wire_dtype, device=items[0][0]._local_tensor.device)
        offset = 0
        for (p, _), n in zip(items, sizes):
            m = self.state[p]["momentum"].reshape(-1)
            send[offset : offset + m.numel()].copy_(m)
            offset += n
        recv = torch.empty(world * send.numel(), dtype=self.wire_dtype, device=send.device)
        dist.all_gather_into_tensor(recv, send, group=group_pg)
        recv = recv.view(world, -1)
        fulls, offset = [], 0
        for (p, _), c, w, n in zip(items, chunk, width, sizes):
            rows = [max(0, min(c, p.shape[0] - r * c)) for r in range(world)]
            parts = [recv[r, offset : offset + rows[r] * w].view(rows[r], w) for r in range(world)]
            fulls.append(torch.cat(parts).view(p.shape))
            offset += n
        by_shape = defaultdict(list)
        for i, f in enumerate(fulls):
            by_shape[tuple(f.shape)].append(i)
        for shape, idx in by_shape.items():
            out = newton_schulz(torch.stack([fulls[i] for i in idx]), 5, self.ns_dtype, method=self.ns_method)
            for k, i in enumerate(idx):
                p, group = items[i]
                start = me * chunk[i]
                mine = out[k][start : start + p._local_tensor.shape[0]]
                local = p._local_tensor
                local.mul_(1 - group["lr"] * group["weight_decay"])
                local.add_(mine.to(local.dtype), alpha=-group["lr"] * 0.2 * math.sqrt(max(shape[-2], shape[-1])))
        return None


# ============================================================ the optimizers compared
LR, WD = 3e-3, 0.1


def build_optimizer(kind: str, model, ns_dtype: str, ns_method: str = "standard"):
    ns = getattr(torch, ns_dtype)
    if kind.startswith("marsm"):
        from dist_marsm import MARSM

        kw = dict(lr=LR, weight_decay=WD, ns_dtype=ns_dtype, ns_method=ns_method)
        kw.update(
            {
                "marsm_approx_bf16": dict(variant="approx", wire_dtype="bfloat16"),
                "marsm_approx_fp32": dict(variant="approx", wire_dtype="float32"),
                "marsm_efficient_bf16": dict(variant="efficient", wire_dtype="bfloat16"),
                "marsm_efficient_fp32": dict(variant="efficient", wire_dtype="float32"),
                "marsm_gamma0": dict(gamma=0.0, clip=False, wire_dtype="bfloat16"),
            }[kind]
        )
        return MARSM(configure_marsm(model), **kw)
    if kind == "naive_muon":
        muon, rest = configure_naive(model)
        return Combined(
            NaiveFSDPMuon(muon["params"], lr=LR, weight_decay=WD, ns_dtype=ns, ns_method=ns_method),
            torch.optim.AdamW(rest["params"], lr=LR, betas=(0.9, 0.95), weight_decay=WD, foreach=True),
        )
    if kind == "adamw":
        return torch.optim.AdamW(configure_adamw(model), lr=LR, betas=(0.9, 0.95), weight_decay=WD, foreach=True)
    if kind.startswith("distmuon"):
        from distmuon_cpu import build_dist_muon_cpu

        muon, rest, layouts, buckets = configure_distmuon(model)
        extra = dict(nesterov=False, adjust_lr_fn="match_rms_adamw") if kind == "distmuon_l4l" else {}
        opt = build_dist_muon_cpu(
            [{"params": muon["params"], "param_names": muon["param_names"]}],
            compute_sharding_by_fqn=layouts,
            bucket_configs=buckets,
            lr=LR,
            weight_decay=WD,
            **extra,
        )
        return Combined(opt, torch.optim.AdamW(rest["params"], lr=LR, betas=(0.9, 0.95), weight_decay=WD, foreach=True))
    raise ValueError(kind)


KINDS = {
    "marsm_approx_bf16": ("MARS-M approx, bf16 wire", configure_marsm),
    "marsm_approx_fp32": ("MARS-M approx, fp32 wire", configure_marsm),
    "marsm_efficient_bf16": ("MARS-M efficient, bf16 wire", configure_marsm),
    "marsm_efficient_fp32": ("MARS-M efficient, fp32 wire", configure_marsm),
    "marsm_gamma0": ("MARS-M gamma=0 (our Muon), bf16 wire", configure_marsm),
    "distmuon_l4l": ("DistMuon nesterov=False, match_rms_adamw (+AdamW)", configure_distmuon),
    "distmuon_default": ("DistMuon default: Nesterov, original (+AdamW)", configure_distmuon),
    "naive_muon": ("naive FSDP Muon: all ranks gather+NS all (+AdamW)", configure_naive),
    "adamw": ("torch.optim.AdamW foreach", configure_adamw),
}


# ============================================================ counting what goes on the wire
@contextlib.contextmanager
def count_collectives(counter: dict):
    """Adds to counter['bytes'] what this rank sends in torch.distributed collectives inside the block."""
    saved = {n: getattr(dist, n) for n in ("all_to_all_single", "all_gather_into_tensor", "all_reduce")}

    def a2a(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        w, me = dist.get_world_size(group), dist.get_rank(group)
        per = input.numel() // w if input_split_sizes is None else None
        own = per if per is not None else input_split_sizes[me]
        counter["bytes"] += (input.numel() - own) * input.element_size()
        return saved["all_to_all_single"](
            output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op
        )

    def agit(output, input, group=None, async_op=False):
        counter["bytes"] += input.numel() * input.element_size() * (dist.get_world_size(group) - 1)
        return saved["all_gather_into_tensor"](output, input, group=group, async_op=async_op)

    def ar(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        w = dist.get_world_size(group)
        counter["bytes"] += 2 * (w - 1) / w * tensor.numel() * tensor.element_size()
        return saved["all_reduce"](tensor, op=op, group=group, async_op=async_op)

    dist.all_to_all_single, dist.all_gather_into_tensor, dist.all_reduce = a2a, agit, ar
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(dist, n, f)


# ============================================================ the floors
def owner_orthogonalize(fulls: dict, entries: list) -> dict:
    """What ``dist_marsm.collectives.OwnerCompute.run`` calls on the full matrices a rank owns (position ->
    full matrix in, position -> Newton-Schulz result out). Looked up at call time so the floors take the
    owners' kernel path; when the library's choice moves, this line moves with it."""
    from dist_marsm import collectives

    return collectives._orthogonalize_batched(fulls, entries)


def _timed(run, device, reps: int, barrier: bool) -> list[float]:
    """Seconds of ``run()`` per repetition after one untimed warm-up."""
    times = []
    for _ in range(reps + 1):
        if barrier:
            dist.barrier()
        sync(device)
        t = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - t)
    return times[1:]


def owner_floors(opt, device, reps: int, rank: int, world: int) -> dict:
    """The plan floor and the perfect-split floor of the module docstring, on the owner plan of ``opt``
    (a MARSM that has stepped once, so its plan is built)."""
    plans = [fg.owner_plan for fg in opt.step_plan.flat_groups]
    gen = torch.Generator(device=device).manual_seed(1)
    fulls = [
        {pos: torch.randn(e.shape, generator=gen, device=device) for pos, e in enumerate(plan.entries)}
        for plan in plans
    ]
    mine = [
        {pos: f for pos, f in fs.items() if plan.entries[pos].owner == plan.my_rank} for plan, fs in zip(plans, fulls)
    ]

    def run(selected):
        for plan, fs in zip(plans, selected):
            if fs:
                owner_orthogonalize(fs, plan.entries)

    own = _timed(lambda: run(mine), device, reps, barrier=True)
    everyone = [None] * world
    dist.all_gather_object(everyone, own)
    whole = _timed(lambda: run(fulls), device, reps, barrier=False) if rank == 0 else None
    dist.barrier()
    owned_flops = [sum(e.flops for plan in plans for e in plan.entries if e.owner == r) for r in range(world)]
    return {
        "plan_floor_s": median([max(r[i] for r in everyone) for i in range(reps)]),
        "plan_floor_per_rank_s": everyone,
        "ns_single_process_s": median(whole) if whole else None,
        "max_rank_ns_gflop": max(owned_flops) / 1e9,
    }


def model_floors(config, mesh, device, args, rank, world) -> dict:
    """Both floors on a fresh MARSM's plan for ``config`` (built by one step, as in the timed runs)."""
    from dist_marsm import MARSM

    model = fsdp_model(config, mesh, device)
    opt = MARSM(configure_marsm(model), ns_dtype=args.ns_dtype, ns_method=args.ns_method)
    lm_loss(model, 0, args.batch, args.seq, device).backward()
    opt.step()
    floors = owner_floors(opt, device, args.ns_reps, rank, world)
    del opt, model
    gc.collect()
    return floors


def ns_single_process_distmuon(shapes, device, reps: int) -> float:
    """Median seconds of DistMuon's own _zeropower_via_newtonschulz, one call per matrix (its Owned layout)."""
    from torchtitan.distributed.flex_shard.dist_muon import _zeropower_via_newtonschulz as distmuon_ns

    mats = [torch.randn(*s, device=device) for s in shapes]
    return median(
        _timed(
            lambda: [distmuon_ns(m, ns_coefficients=(3.4445, -4.7750, 2.0315), ns_steps=5, eps=1e-7) for m in mats],
            device,
            reps,
            barrier=False,
        )
    )


def fsdp_model(config, mesh, device):
    from torch.distributed.fsdp import fully_shard

    model = make_model(config, seed=0, device=device)
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def run_one(kind, config, mesh, device, args, world):
    model = fsdp_model(config, mesh, device)
    opt = build_optimizer(kind, model, args.ns_dtype, args.ns_method)
    opt_times, step_times, counter = [], [], {"bytes": 0}
    for step in range(args.warmup + args.steps):
        dist.barrier()
        sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model, step, args.batch, args.seq, device)
        loss.backward()
        sync(device)
        t1 = time.perf_counter()
        counter["bytes"] = 0
        with count_collectives(counter):
            opt.step()
        sync(device)
        t2 = time.perf_counter()
        if step >= args.warmup:
            opt_times.append(t2 - t1)
            step_times.append(t2 - t0)
    rec = {
        "opt": opt_times,
        "step": step_times,
        "bytes_sent": counter["bytes"],
        "state_bytes": state_bytes(opt),
        "loss": float(loss.detach()),
    }
    if kind.startswith("marsm"):  # this optimizer's own plan, timed right after its steps (same load)
        rec["floors"] = owner_floors(opt, device, args.ns_reps, dist.get_rank(), world)
    inner = opt.optimizer if hasattr(opt, "optimizer") else opt
    if hasattr(inner, "last_step_stats"):
        s = inner.last_step_stats
        rec["marsm_stats"] = {k: s.get(k) for k in ("ns_matrices", "bytes_sent", "allreduce_bytes")}
    del opt, model
    gc.collect()
    return rec


def init_rank(rank: int, world: int, port: int, args):
    """This spawned rank's process group (NCCL on CUDA, else gloo), device and 1-D "fsdp" mesh."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=args.pg_timeout)
    )
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("fsdp",))
    return device, mesh


def rank_main(rank, world, port, args, queue):
    device, mesh = init_rank(rank, world, port, args)
    out = {}
    for config in args.models:
        shapes = matrix_shapes(make_model(config))
        floors = model_floors(config, mesh, device, args, rank, world)
        floor_dm = None
        if rank == 0 and any(k.startswith("distmuon") for k in args.kinds):
            floor_dm = ns_single_process_distmuon(shapes, device, 1)
        dist.barrier()
        res = {}
        for kind in args.kinds:
            t = time.perf_counter()
            try:
                rec = run_one(kind, config, mesh, device, args, world)
            except Exception as e:  # noqa: BLE001 - recorded in the table (e.g. a GPU-only failure)
                rec = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            everyone = [None] * world
            dist.all_gather_object(everyone, rec)
            res[kind] = everyone
            if rank == 0:
                print(f"[{config}] {kind}: {time.perf_counter() - t:.1f}s", flush=True)
        out[config] = {"shapes": shapes, **floors, "ns_single_process_distmuon_s": floor_dm, "results": res}
    if rank == 0:
        queue.put(out)
    dist.barrier()
    dist.destroy_process_group()


# ============================================================ report
def summarize(out, args, world):
    from dist_marsm.newton_schulz import newton_schulz_flops

    tables, data = [], {"args": vars(args), "world": world, "models": {}}
    for config, o in out.items():
        shapes = o["shapes"]
        ns_flops = sum(newton_schulz_flops(s, 5, args.ns_method, dtype=args.ns_dtype) for s in shapes)
        split = o["ns_single_process_s"] / world
        plan_floor = o["plan_floor_s"]
        floor_dm = o["ns_single_process_distmuon_s"] / world if o.get("ns_single_process_distmuon_s") else None
        rows, recs = [], {}
        adamw_opt = adamw_step = None
        for kind in args.kinds:
            per_rank = o["results"][kind]
            if any("error" in r for r in per_rank):
                recs[kind] = {"error": next(r["error"] for r in per_rank if "error" in r)}
                continue
            opt = median([max(r["opt"][i] for r in per_rank) for i in range(args.steps)])
            step = median([max(r["step"][i] for r in per_rank) for i in range(args.steps)])
            recs[kind] = dict(
                opt_s=opt,
                step_s=step,
                state_bytes=max(r["state_bytes"] for r in per_rank),
                bytes_sent=max(r["bytes_sent"] for r in per_rank),
                config_lines=config_lines(KINDS[kind][1]),
                per_rank=per_rank,
            )
            if kind == "adamw":
                adamw_opt, adamw_step = opt, step
        headers = (
            [
                "optimizer",
                "opt step ms",
                "train step ms",
                "opt / AdamW",
                "train / AdamW",
                "plan floor ms",
                "opt / plan floor",
                "perfect-split floor ms",
                "opt / perfect-split floor",
            ]
            + (["opt / own-kernel floor"] if floor_dm else [])
            + ["state bytes/rank", "sent bytes/rank/step", "config lines"]
        )
        for kind in args.kinds:
            r = recs[kind]
            label = KINDS[kind][0]
            if "error" in r:
                rows.append([label, r["error"][:80]] + ["-"] * (len(headers) - 2))
                continue
            r["opt_over_adamw"] = r["opt_s"] / adamw_opt if adamw_opt else None
            r["step_over_adamw"] = r["step_s"] / adamw_step if adamw_step else None
            own = r["per_rank"][0].get("floors")  # MARS-M rows: floors on its own plan, right after its steps
            r["plan_floor_s"] = own["plan_floor_s"] if own else None
            r["perfect_split_floor_s"] = own["ns_single_process_s"] / world if own else split
            r["opt_over_plan_floor"] = r["opt_s"] / r["plan_floor_s"] if own else None
            r["opt_over_split_floor"] = r["opt_s"] / r["perfect_split_floor_s"] if kind != "adamw" else None
            r["opt_over_own_kernel_floor"] = r["opt_s"] / floor_dm if kind.startswith("distmuon") and floor_dm else None
            rows.append(
                [
                    label,
                    r["opt_s"] * 1e3,
                    r["step_s"] * 1e3,
                    r["opt_over_adamw"],
                    r["step_over_adamw"],
                    r["plan_floor_s"] * 1e3 if own else None,
                    r["opt_over_plan_floor"],
                    r["perfect_split_floor_s"] * 1e3 if kind != "adamw" else None,
                    r["opt_over_split_floor"],
                ]
                + ([r["opt_over_own_kernel_floor"]] if floor_dm else [])
                + [human_bytes(r["state_bytes"]), human_bytes(r["bytes_sent"]), r["config_lines"]]
            )
        head = (
            f"### {config} model ({MODEL_CONFIGS[config]}), {world} ranks, {args.threads} thread(s)/rank, "
            f"NS in {args.ns_dtype}, method {args.ns_method} (DistMuon: always bf16, its own kernel)"
            "\n\n"
            f"{len(shapes)} matrices, {ns_flops / 1e9:.1f} GFLOP of Newton-Schulz per step; busiest owner "
            f"{o['max_rank_ns_gflop']:.2f} GFLOP. Floors are timed with the owners' own Newton-Schulz call "
            f"on the owner plan: plan floor = the slowest rank orthogonalizing the matrices it owns (all ranks "
            f"at once); perfect-split floor = all matrices in one process / W. Each MARS-M row's floors are "
            f"measured on its own optimizer's plan right after its steps; before the first optimizer, on a "
            f"fresh plan: plan floor {plan_floor * 1e3:.1f} ms, single-process NS "
            f"{o['ns_single_process_s'] * 1e3:.1f} ms -> perfect-split floor {split * 1e3:.1f} ms (used for the "
            "naive Muon row)"
            + (
                f"; DistMuon's own NS kernel (one bf16 addmm-based call per matrix) single-process "
                f"{o['ns_single_process_distmuon_s'] * 1e3:.1f} ms -> its floor {floor_dm * 1e3:.1f} ms"
                if floor_dm
                else ""
            )
            + f". Median of {args.steps} steps after {args.warmup} warm-up; each step = slowest rank; "
            f"floors: median of {args.ns_reps} repetitions after one warm-up.\n\n"
        )
        tables.append(head + markdown_table(headers, rows))
        data["models"][config] = {
            "shapes": shapes,
            "ns_gflop": ns_flops / 1e9,
            "ns_single_process_s": o["ns_single_process_s"],
            "perfect_split_floor_s": split,
            "plan_floor_s": plan_floor,
            "plan_floor_per_rank_s": o["plan_floor_per_rank_s"],
            "max_rank_ns_gflop": o["max_rank_ns_gflop"],
            "distmuon_kernel_floor_s": floor_dm,
            "results": recs,
        }
    return data, "\n\n".join(tables)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--models", default="debug", help="comma list of " + ",".join(MODEL_CONFIGS))
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma list of " + ",".join(KINDS))
    from dist_marsm.newton_schulz import NS_METHODS

    ap.add_argument(
        "--ns-method",
        default="standard",
        choices=NS_METHODS,
        help="Newton-Schulz method for MARS-M, naive and the floors (DistMuon: its own kernel)",
    )
    ap.add_argument(
        "--ns-dtype",
        default="bfloat16",
        choices=("bfloat16", "float32"),
        help="Newton-Schulz dtype for MARS-M, naive and the floors (DistMuon hard-codes bf16)",
    )
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ns-reps", type=int, default=3)
    ap.add_argument("--pg-timeout", type=float, default=1800)
    ap.add_argument("--name", default=None, help="results file stem (default bench_distributed_<ranks>r)")
    args = ap.parse_args()
    args.models = args.models.split(",")
    args.kinds = args.kinds.split(",")
    world = args.ranks
    if torch.cuda.is_available():
        world = min(world, torch.cuda.device_count())
    import torch.multiprocessing as mp
    from torch.distributed.elastic.utils.distributed import get_free_port as free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=rank_main, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    import queue as queue_mod

    try:
        out = queue.get(timeout=args.pg_timeout)
    except queue_mod.Empty:
        sys.exit("bench_distributed: rank 0 did not report (a rank died or hung)")
    for p in procs:
        p.join(timeout=60)
    data, md = summarize(out, args, world)
    print("\n" + md)
    name = args.name or (
        f"bench_distributed_{world}r{'_' + args.ns_dtype if args.ns_dtype != 'bfloat16' else ''}"
        f"{'_' + args.ns_method if args.ns_method != 'standard' else ''}"
    )
    save(name, data, md)


if __name__ == "__main__":
    main()
