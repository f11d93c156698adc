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

The perfect-split floor is the single-process Newton-Schulz time of all the model's matrices
(measured on rank 0 with the same thread count, same dtype, stacked same-shape batches) divided by W.
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

from _common import (Combined, MODEL_CONFIGS, fmt, human_bytes, lm_loss, make_model, markdown_table, matrix_shapes,  # noqa: E402
                     median, save)

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

    def __init__(self, params, lr=3e-3, momentum=0.95, weight_decay=0.1, ns_dtype=torch.bfloat16,
                 wire_dtype=torch.bfloat16):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.ns_dtype, self.wire_dtype = ns_dtype, wire_dtype

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
        chunk = [math.ceil(p.shape[0] / world) for p, _ in items]        # FSDP2 shards dim 0 like torch.chunk
        width = [math.prod(p.shape[1:]) for p, _ in items]
        sizes = [c * w for c, w in zip(chunk, width)]
        send = torch.zeros(sum(sizes), dtype=self.wire_dtype, device=items[0][0]._local_tensor.device)
        offset = 0
        for (p, _), n in zip(items, sizes):
            m = self.state[p]["momentum"].reshape(-1)
            send[offset: offset + m.numel()].copy_(m)
            offset += n
        recv = torch.empty(world * send.numel(), dtype=self.wire_dtype, device=send.device)
        dist.all_gather_into_tensor(recv, send, group=group_pg)
        recv = recv.view(world, -1)
        fulls, offset = [], 0
        for (p, _), c, w, n in zip(items, chunk, width, sizes):
            rows = [max(0, min(c, p.shape[0] - r * c)) for r in range(world)]
            parts = [recv[r, offset: offset + rows[r] * w].view(rows[r], w) for r in range(world)]
            fulls.append(torch.cat(parts).view(p.shape))
            offset += n
        by_shape = defaultdict(list)
        for i, f in enumerate(fulls):
            by_shape[tuple(f.shape)].append(i)
        for shape, idx in by_shape.items():
            out = newton_schulz(torch.stack([fulls[i] for i in idx]), 5, self.ns_dtype)
            for k, i in enumerate(idx):
                p, group = items[i]
                start = me * chunk[i]
                mine = out[k][start: start + p._local_tensor.shape[0]]
                local = p._local_tensor
                local.mul_(1 - group["lr"] * group["weight_decay"])
                local.add_(mine.to(local.dtype), alpha=-group["lr"] * 0.2 * math.sqrt(max(shape[-2], shape[-1])))
        return None


# ============================================================ the optimizers compared
LR, WD = 3e-3, 0.1


def build_optimizer(kind: str, model, ns_dtype: str):
    ns = getattr(torch, ns_dtype)
    if kind.startswith("marsm"):
        from dist_marsm import MARSM
        kw = dict(lr=LR, weight_decay=WD, ns_dtype=ns_dtype)
        kw.update({
            "marsm_approx_bf16": dict(variant="approx", wire_dtype="bfloat16"),
            "marsm_approx_fp32": dict(variant="approx", wire_dtype="float32"),
            "marsm_efficient_bf16": dict(variant="efficient", wire_dtype="bfloat16"),
            "marsm_efficient_fp32": dict(variant="efficient", wire_dtype="float32"),
            "marsm_gamma0": dict(gamma=0.0, clip=False, wire_dtype="bfloat16"),
        }[kind])
        return MARSM(configure_marsm(model), **kw)
    if kind == "naive_muon":
        muon, rest = configure_naive(model)
        return Combined(NaiveFSDPMuon(muon["params"], lr=LR, weight_decay=WD, ns_dtype=ns),
                        torch.optim.AdamW(rest["params"], lr=LR, betas=(0.9, 0.95), weight_decay=WD, foreach=True))
    if kind == "adamw":
        return torch.optim.AdamW(configure_adamw(model), lr=LR, betas=(0.9, 0.95), weight_decay=WD, foreach=True)
    if kind.startswith("distmuon"):
        from distmuon_cpu import build_dist_muon_cpu
        muon, rest, layouts, buckets = configure_distmuon(model)
        extra = dict(nesterov=False, adjust_lr_fn="match_rms_adamw") if kind == "distmuon_l4l" else {}
        opt = build_dist_muon_cpu([{"params": muon["params"], "param_names": muon["param_names"]}],
                                  compute_sharding_by_fqn=layouts, bucket_configs=buckets, lr=LR, weight_decay=WD,
                                  **extra)
        return Combined(opt, torch.optim.AdamW(rest["params"], lr=LR, betas=(0.9, 0.95), weight_decay=WD,
                                               foreach=True))
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
        return saved["all_to_all_single"](output, input, output_split_sizes, input_split_sizes, group=group,
                                          async_op=async_op)

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


def state_bytes(opt) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v) and v.ndim > 0:
                local = v._local_tensor if hasattr(v, "_local_tensor") else v
                total += local.numel() * local.element_size()
    return total


# ============================================================ one rank
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ns_single_process(shapes, ns_dtype: str, device, reps: int, kernel: str = "dist_marsm") -> float:
    """Median seconds of Newton-Schulz on every matrix in this process.

    kernel "dist_marsm": dist_marsm.newton_schulz on same-shape stacks (what MARSM and the naive Muon run);
    "distmuon": DistMuon's own _zeropower_via_newtonschulz, one call per matrix (what its Owned layout runs).
    """
    if kernel == "distmuon":
        from torchtitan.distributed.flex_shard.dist_muon import _zeropower_via_newtonschulz as distmuon_ns
        mats = [torch.randn(*s, device=device) for s in shapes]
        run = lambda: [distmuon_ns(m, ns_coefficients=(3.4445, -4.7750, 2.0315), ns_steps=5, eps=1e-7)  # noqa: E731
                       for m in mats]
    else:
        from dist_marsm.newton_schulz import newton_schulz
        by_shape = defaultdict(int)
        for s in shapes:
            by_shape[s] += 1
        mats = [torch.randn(n, *s, device=device) for s, n in by_shape.items()]
        run = lambda: [newton_schulz(m, 5, getattr(torch, ns_dtype)) for m in mats]  # noqa: E731
    times = []
    for _ in range(reps + 1):
        sync(device)
        t = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - t)
    return median(times[1:])


def fsdp_model(config, mesh, device):
    from torch.distributed.fsdp import fully_shard
    model = make_model(config, seed=0, device=device)
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def run_one(kind, config, mesh, device, args, world):
    model = fsdp_model(config, mesh, device)
    opt = build_optimizer(kind, model, args.ns_dtype)
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
    rec = {"opt": opt_times, "step": step_times, "bytes_sent": counter["bytes"], "state_bytes": state_bytes(opt),
           "loss": float(loss.detach())}
    inner = opt.optimizer if hasattr(opt, "optimizer") else opt
    if hasattr(inner, "last_step_stats"):
        s = inner.last_step_stats
        rec["marsm_stats"] = {k: s.get(k) for k in ("ns_matrices", "bytes_sent", "allreduce_bytes")}
    del opt, model
    gc.collect()
    return rec


def _owner_ns_per_matrix():
    """A/B experiment for a proposed library change (benchmark only): the owner orthogonalizes one matrix per
    call instead of stacking same-shape matrices. Same results; only the batching differs."""
    import dist_marsm.collectives as collectives
    from dist_marsm.newton_schulz import newton_schulz, resolve_dtype

    def per_matrix(fulls, entries):
        return {pos: newton_schulz(full, entries[pos].ns_steps, resolve_dtype(entries[pos].ns_dtype))
                for pos, full in fulls.items()}
    collectives._orthogonalize_batched = per_matrix


def rank_main(rank, world, port, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if args.owner_ns_per_matrix:
        _owner_ns_per_matrix()
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=args.pg_timeout))
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("fsdp",))
    out = {}
    for config in args.models:
        shapes = matrix_shapes(make_model(config))
        floor_1p = ns_single_process(shapes, args.ns_dtype, device, args.ns_reps) if rank == 0 else None
        floor_dm = None
        if rank == 0 and any(k.startswith("distmuon") for k in args.kinds):
            floor_dm = ns_single_process(shapes, "bfloat16", device, 1, kernel="distmuon")
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
        out[config] = {"shapes": shapes, "ns_single_process_s": floor_1p, "ns_single_process_distmuon_s": floor_dm,
                       "results": res}
    if rank == 0:
        queue.put(out)
    dist.barrier()
    dist.destroy_process_group()


# ============================================================ report
def summarize(out, args, world):
    tables, data = [], {"args": vars(args), "world": world, "models": {}}
    for config, o in out.items():
        shapes = o["shapes"]
        from dist_marsm.newton_schulz import newton_schulz_flops
        ns_flops = sum(newton_schulz_flops(s) for s in shapes)
        floor = o["ns_single_process_s"] / world
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
            recs[kind] = dict(opt_s=opt, step_s=step, state_bytes=max(r["state_bytes"] for r in per_rank),
                              bytes_sent=max(r["bytes_sent"] for r in per_rank),
                              config_lines=config_lines(KINDS[kind][1]), per_rank=per_rank)
            if kind == "adamw":
                adamw_opt, adamw_step = opt, step
        for kind in args.kinds:
            r = recs[kind]
            label = KINDS[kind][0]
            if "error" in r:
                rows.append([label, r["error"][:80]] + ["-"] * 8)
                continue
            r["opt_over_adamw"] = r["opt_s"] / adamw_opt if adamw_opt else None
            r["step_over_adamw"] = r["step_s"] / adamw_step if adamw_step else None
            r["opt_over_floor"] = r["opt_s"] / floor if kind != "adamw" else None
            r["opt_over_own_kernel_floor"] = (r["opt_s"] / floor_dm if kind.startswith("distmuon") and floor_dm
                                              else r["opt_over_floor"])
            rows.append([label, r["opt_s"] * 1e3, r["step_s"] * 1e3, r["opt_over_adamw"], r["step_over_adamw"],
                         r["opt_over_floor"], r["opt_over_own_kernel_floor"], human_bytes(r["state_bytes"]), human_bytes(r["bytes_sent"]),
                         r["config_lines"]])
        head = (f"### {config} model ({MODEL_CONFIGS[config]}), {world} ranks, {args.threads} thread(s)/rank, "
                f"NS in {args.ns_dtype} (DistMuon: always bf16)\n\n"
                f"{len(shapes)} matrices, {ns_flops / 1e9:.1f} GFLOP of Newton-Schulz per step; single-process NS "
                f"{o['ns_single_process_s'] * 1e3:.1f} ms -> perfect-split floor {floor * 1e3:.1f} ms"
                + (f"; DistMuon's own NS kernel (one bf16 addmm-based call per matrix) single-process "
                   f"{o['ns_single_process_distmuon_s'] * 1e3:.1f} ms -> its floor {floor_dm * 1e3:.1f} ms" if floor_dm
                   else "") + f". Median of {args.steps} steps after {args.warmup} warm-up; each step = slowest rank.\n\n")
        table = markdown_table(["optimizer", "opt step ms", "train step ms", "opt / AdamW", "train / AdamW",
                                "opt / floor", "opt / own-kernel floor", "state bytes/rank", "sent bytes/rank/step", "config lines"], rows)
        tables.append(head + table)
        data["models"][config] = {"shapes": shapes, "ns_gflop": ns_flops / 1e9, "ns_single_process_s":
                                  o["ns_single_process_s"], "floor_s": floor, "distmuon_kernel_floor_s": floor_dm,
                                  "results": recs}
    return data, "\n\n".join(tables)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--models", default="debug", help="comma list of " + ",".join(MODEL_CONFIGS))
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma list of " + ",".join(KINDS))
    ap.add_argument("--ns-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="Newton-Schulz dtype for MARS-M, naive and the floor (DistMuon hard-codes bf16)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ns-reps", type=int, default=3)
    ap.add_argument("--pg-timeout", type=float, default=1800)
    ap.add_argument("--owner-ns-per-matrix", action="store_true",
                    help="experiment: MARS-M owners orthogonalize one matrix per call (no stacking)")
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
    name = args.name or f"bench_distributed_{world}r{'_' + args.ns_dtype if args.ns_dtype != 'bfloat16' else ''}"
    save(name, data, md)


if __name__ == "__main__":
    main()
