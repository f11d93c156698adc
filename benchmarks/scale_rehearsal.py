"""Scale rehearsal: MARS-M's real code path at 64 to 1,024 ranks, one rank at a time, in one CPU process.

    python benchmarks/scale_rehearsal.py [--models 8B 70B] [--step-layers 2] [--out scale_rehearsal]

torch's fake process group ("fake" backend) lets one process be rank r of W: torchtitan's own Llama 3 8B /
70B (fuse_qkv = false: wq, wk, wv, as benchmarks/plan_balance.py counts them) is built on the meta device,
parallelized by torchtitan's parallelize_llama (FSDP, HSDP; for FSDP x TP, torch's ColwiseParallel /
RowwiseParallel on the TP mesh first: torchtitan's own TP needs sharding configs its trainer sets), and
``to_empty(device="cpu")`` gives rank r's real local shards. MARSM is built from build_param_groups as a
user would, and takes real steps.

The fake group's collectives return each rank's own data, which no real job does. ``MirroredGroup`` below
stands in for them as if every other rank mirrored this one: a sum all-reduce is W times the local value,
a max is the local value, an all_gather_object gives W copies, an all_to_all_single fills the receive buffer
with as many elements as the split sizes say (zeros) and counts the bytes. It lives only here.

Newton-Schulz is stood in (``standin_orthogonalize``): an uninitialized result of the same shape and dtype
per matrix, so a step's time is everything else (the element-wise math on the local shards, packing,
the gathers' assembly, the scatters' slicing, the collectives' bookkeeping, the Python around them).
Newton-Schulz's own cost is its FLOPs (counted by newton_schulz_flops) at the GPU's GEMM rate.

Per (model, mesh, rank):
- plan: the first step's plan for the full model (every layer), built on the real local shards (allocated,
  never touched): its time, its Python memory (tracemalloc peak), this rank's Newton-Schulz TFLOP against
  the even split (checked equal to plan_balance.py's LPT figure for the same W), buckets, collectives per
  step and bytes sent / received per rank, from the plan's split sizes.
- step: real steps of the first ``--step-layers`` layers (every rank's state for the whole model does not
  fit this machine at W = 64): wall time of a steady step, its Python time (cProfile: time in Python
  frames, not in torch's C functions) and torch C calls, counted collectives and bytes, and the peak
  transient memory of gathered buckets (OwnerCompute.peak_transient_bytes) against its bound.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import math
import pstats
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.testing._internal.distributed.fake_pg import FakeStore  # noqa: E402

from dist_marsm import MARSM, build_param_groups, collectives  # noqa: E402
from dist_marsm.newton_schulz import newton_schulz_flops, resolve_dtype  # noqa: E402

# name -> (dp_replicate, dp_shard, tp); W is their product.
MESHES = {
    "FSDP 64": (1, 64, 1),
    "FSDP 256": (1, 256, 1),
    "FSDP 1024": (1, 1024, 1),
    "HSDP 8x128": (8, 128, 1),
    "FSDP 128 x TP 8": (1, 128, 8),
}
TP_COLWISE = (
    "attention.qkv_linear.wq",
    "attention.qkv_linear.wk",
    "attention.qkv_linear.wv",
    "feed_forward.w1",
    "feed_forward.w3",
)
TP_ROWWISE = ("attention.wo", "feed_forward.w2")


# ---------------------------------------------------------------------- the mirrored group
class _Done:
    """A finished collective (the mirrored group completes everything at the call)."""

    def wait(self, timeout=None):
        return True

    def is_completed(self):
        return True


class MirroredGroup:
    """Collectives as seen by one rank of a job in which every other rank mirrors this one.

    Patches torch.distributed's all_reduce, all_gather_object and all_to_all_single while active and
    counts calls and bytes (all_to_all_single's sent: the send splits' elements, received: the receive
    splits'; all_reduce's separately).
    """

    def __init__(self):
        self.calls: dict[str, int] = {}
        self.reset()

    def reset(self):
        self.calls, self.bytes_sent, self.bytes_received, self.allreduce_bytes = {}, 0, 0, 0

    def _count(self, name):
        self.calls[name] = self.calls.get(name, 0) + 1

    def all_reduce(self, tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        self._count("all_reduce")
        if op == dist.ReduceOp.SUM:
            tensor.mul_(dist.get_world_size(group))
        elif op not in (dist.ReduceOp.MAX, dist.ReduceOp.MIN, dist.ReduceOp.AVG):
            raise NotImplementedError(f"mirrored all_reduce: op {op}")
        self.allreduce_bytes += tensor.numel() * tensor.element_size()
        return _Done() if async_op else None

    def all_gather_object(self, object_list, obj, group=None):
        self._count("all_gather_object")
        object_list[:] = [obj] * len(object_list)

    def all_to_all_single(
        self, output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False
    ):
        self._count("all_to_all_single")
        world = dist.get_world_size(group)
        out_splits = output_split_sizes or [output.numel() // world] * world
        in_splits = input_split_sizes or [input.numel() // world] * world
        if sum(out_splits) != output.numel() or sum(in_splits) != input.numel():
            raise ValueError(
                f"all_to_all_single: splits {sum(in_splits)}/{sum(out_splits)} vs buffers "
                f"{input.numel()}/{output.numel()}"
            )
        me = dist.get_rank(group)
        output.zero_()
        self.bytes_sent += (sum(in_splits) - in_splits[me]) * input.element_size()
        self.bytes_received += (sum(out_splits) - out_splits[me]) * output.element_size()
        return _Done() if async_op else None

    @contextlib.contextmanager
    def active(self):
        names = ("all_reduce", "all_gather_object", "all_to_all_single")
        saved = {n: getattr(dist, n) for n in names}
        try:
            for n in names:
                setattr(dist, n, getattr(self, n))
            yield self
        finally:
            for n, f in saved.items():
                setattr(dist, n, f)


class StandinNewtonSchulz:
    """Stands in for orthogonalize_many: equal-shape, equal-dtype results, no arithmetic; counts FLOPs."""

    def __init__(self):
        self.flops = 0
        self.matrices = 0

    def __call__(self, matrices, steps=5, dtype=torch.bfloat16, eps=None, *, method="standard", coefficients="muon"):
        out = []
        for m in matrices:
            self.flops += newton_schulz_flops(tuple(m.shape), steps, method, dtype=dtype, coefficients=coefficients)
            self.matrices += math.prod(m.shape[:-2])
            out.append(torch.empty(m.shape, dtype=dtype, device=m.device))
        return out

    @contextlib.contextmanager
    def active(self):
        saved = collectives.orthogonalize_many
        collectives.orthogonalize_many = self
        try:
            yield self
        finally:
            collectives.orthogonalize_many = saved


# ---------------------------------------------------------------------- the model on one rank
def as_rank(rank: int, world: int) -> None:
    """Make this process rank ``rank`` of a fresh fake group of ``world`` ranks."""
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    _resolve_stale_mesh_groups()


def _resolve_stale_mesh_groups() -> None:
    """After a group is re-initialized as another rank, a sub-mesh torchtitan unflattens can carry the name
    of a group made in an earlier incarnation (a real job initializes once and never sees this); such a
    mesh dim gets a new group over the same ranks."""
    from torch.distributed.device_mesh import DeviceMesh

    if getattr(DeviceMesh.get_group, "_rehearsal", False):
        return
    original = DeviceMesh.get_group

    def get_group(self, mesh_dim=None):
        try:
            return original(self, mesh_dim)
        except RuntimeError:
            if self.ndim != 1:
                raise
            return dist.new_group(self.mesh.flatten().tolist())

    get_group._rehearsal = True
    DeviceMesh.get_group = get_group


def build_model(flavor: str, layers: int | None, mesh: tuple[int, int, int], rank: int | None):
    """torchtitan's Llama 3 ``flavor`` (its first ``layers`` layers), parallelized on ``mesh`` as rank ``rank``
    of the fake group (None: in the process group already initialized), with this rank's local shards
    allocated on the CPU (not initialized)."""
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.models.llama3.parallelize import parallelize_llama

    from dist_marsm.titan.cpu_shims import apply_cpu_device_module
    from dist_marsm.titan.recipe import ModelConfig

    apply_cpu_device_module()
    replicate, shard, tp = mesh
    world = replicate * shard * tp
    if rank is not None:
        as_rank(rank, world)
    spec = ModelConfig(flavor=flavor, fuse_qkv=False).spec()
    if layers is not None:
        spec.model.layers = spec.model.layers[:layers]
    with torch.device("meta"):
        model = spec.model.build()
    parallelism = ParallelismConfig(
        data_parallel_replicate_degree=replicate,
        data_parallel_shard_degree=shard,
        tensor_parallel_degree=tp,
        spmd_backend="partial_dtensor",
    )
    dims = ParallelDims(
        dp_replicate=replicate,
        dp_shard=shard,
        cp=1,
        tp=tp,
        pp=1,
        ep=1,
        world_size=world,
        spmd_backend=parallelism.spmd_backend,
    )
    dims.build_mesh()
    if tp > 1:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        plan = {}
        for i in range(len(model.layers)):
            plan.update({f"layers.{i}.{k}": ColwiseParallel() for k in TP_COLWISE})
            plan.update({f"layers.{i}.{k}": RowwiseParallel() for k in TP_ROWWISE})
        parallelize_module(model, dims.get_mesh("tp"), plan, src_data_rank=None)
    parallelize_llama(
        model,
        parallel_dims=dims,
        training=TrainingConfig(),
        parallelism=parallelism,
        compile_config=CompileConfig(),
        ac_config=None,
        dump_folder="/tmp",
    )
    model.to_empty(device="cpu")
    return model


def build_optimizer(model, **kwargs) -> MARSM:
    return MARSM(build_param_groups(model), lr=0.02, **kwargs)


def flat_groups(opt: MARSM) -> list:
    return opt.step_plan.flat_groups


def build_plan(opt: MARSM) -> list:
    """The plan the first step builds (MARSM._current_plan), without a step."""
    return opt._current_plan().flat_groups


# ---------------------------------------------------------------------- measurements
def plan_row(flavor: str, mesh_name: str, rank: int, mirrored: MirroredGroup, mesh=None) -> dict:
    """Plan for the whole model on one rank: its time, memory and what it gives this rank."""
    mesh = mesh or MESHES[mesh_name]
    world = math.prod(mesh)
    model = build_model(flavor, None, mesh, rank)
    opt = build_optimizer(model)
    gc.collect()
    mirrored.reset()
    start = time.perf_counter()
    with mirrored.active():
        groups = build_plan(opt)
    seconds = time.perf_counter() - start
    calls = dict(mirrored.calls)
    opt_mem = build_optimizer(model)  # the same build under tracemalloc: the plan's Python memory
    tracemalloc.start()
    with mirrored.active():
        build_plan(opt_mem)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del opt_mem
    (fg,) = [g for g in groups if g.matrices]
    report = fg.owner_plan.report()
    me = report[fg.my_rank]
    total_flops = sum(r["ns_flops"] for r in report)
    busiest = max(range(len(report)), key=lambda r: (report[r]["ns_flops"], -r))
    row = {
        "model": flavor,
        "mesh": mesh_name,
        "world": world,
        "rank": rank,
        "layers": len(model.layers),
        "plan_s": seconds,
        "plan_python_peak_mib": peak / 2**20,
        "plan_collectives": calls,
        "matrices": len(fg.matrices),
        "entries": len(fg.owner_plan.entries),
        "buckets": len(fg.owner_plan.buckets),
        "a2a_per_step": 2 * len(fg.owner_plan.buckets),
        "owned_matrices": me["matrices_owned"],
        "owned_tflop": me["ns_flops"] / 1e12,
        "even_split_tflop": total_flops / world / 1e12,
        "busiest_rank": fg.ranks[busiest],
        "busiest_tflop": report[busiest]["ns_flops"] / 1e12,
        "bytes_sent_per_step": me["bytes_sent"],
        "bytes_received_per_step": me["bytes_received"],
    }
    del opt, model, groups, fg
    gc.collect()
    return row


def plan_balance_busiest_tflop(flavor: str, world: int) -> float:
    """What benchmarks/plan_balance.py prints as the busiest rank's TFLOP (LPT) for this model and W."""
    import plan_balance
    from _common import llama3_matrix_shapes

    costs = [float(newton_schulz_flops(s, 5, "standard")) for s in llama3_matrix_shapes(flavor)]
    return max(plan_balance.loads(costs, world, "largest_first")) / 1e12


def fill_gradients(model, seed: int) -> None:
    """A gradient per parameter with this rank's local shard filled (what the backward would leave)."""
    from torch.distributed.tensor import DTensor

    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        local = torch.randn(p.to_local().shape, generator=g) * 1e-3
        p.grad = DTensor.from_local(
            local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(), run_check=False
        )


def init_parameters(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().normal_(0, 0.02)


def host_calls(fn) -> tuple[float, int, int]:
    """(seconds in Python frames, Python function calls, C function calls) of ``fn()`` under cProfile.

    The calls are the step's host work independent of tensor sizes: on a GPU each torch call is a launch
    and each Python call interpreter time, whatever the shard size. The seconds include the tensor math
    that Python operators (``a * b``) run inside a Python frame, so on a CPU they shrink as shards do.
    """
    profile = cProfile.Profile()
    profile.enable()
    fn()
    profile.disable()
    stats = pstats.Stats(profile).stats
    python_s = sum(tt for (file, _, _), (_, _, tt, _, _) in stats.items() if file != "~")
    py_calls = sum(nc for (file, _, _), (_, nc, _, _, _) in stats.items() if file != "~")
    c_calls = sum(nc for (file, _, _), (_, nc, _, _, _) in stats.items() if file == "~")
    return python_s, py_calls, c_calls


def step_row(
    flavor: str,
    mesh_name: str,
    rank: int,
    layers: int | None,
    steps: int,
    mirrored: MirroredGroup,
    ns: StandinNewtonSchulz,
    mesh=None,
    **optimizer_settings,
) -> dict:
    """Real steps of the first ``layers`` layers on one rank: time, counts and transient memory."""
    mesh = mesh or MESHES[mesh_name]
    model = build_model(flavor, layers, mesh, rank)
    init_parameters(model)
    opt = build_optimizer(model, **optimizer_settings)
    times, per_step = [], []
    with mirrored.active(), ns.active():
        for step in range(steps):
            fill_gradients(model, step)
            mirrored.reset()
            ns.flops = ns.matrices = 0
            start = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - start)
            per_step.append((dict(mirrored.calls), mirrored.bytes_sent, mirrored.bytes_received, ns.flops))
        fill_gradients(model, steps)
        py_s, py_calls, c_calls = host_calls(opt.step)
    calls, sent, received, flops = per_step[-1]
    row = {
        "model": flavor,
        "mesh": mesh_name,
        "world": math.prod(mesh),
        "rank": rank,
        "layers": len(model.layers),
        "first_step_s": times[0],
        "step_s": min(times[1:]),
        "step_python_s": py_s,
        "step_py_calls": py_calls,
        "step_c_calls": c_calls,
        "collectives": calls,
        "a2a_bytes_sent": sent,
        "a2a_bytes_received": received,
        "ns_tflop_this_rank": flops / 1e12,
        "local_shard_elements": sum(p.to_local().numel() for p in model.parameters()),
        **step_counts(opt),
    }
    del opt, model
    gc.collect()
    return row


def step_counts(opt: MARSM) -> dict:
    """What the last step's plan and engine say on this rank (the same on a real job and in the rehearsal)."""
    (fg,) = [g for g in flat_groups(opt) if g.matrices]
    engine = fg.engine
    sizes = [math.prod(e.shape) for e in fg.owner_plan.entries]
    wire = opt.wire_dtype.itemsize
    largest_bucket_elements = max(sum(sizes[p] for p in b) for b in fg.owner_plan.buckets)
    replicas = max(len(set(e.layout.replica_keys)) for e in fg.owner_plan.entries)
    bound = transient_bound(
        largest_bucket_elements,
        input_bytes=4,
        result_bytes=resolve_dtype(fg.owner_plan.entries[0].ns_dtype).itemsize,
        wire_bytes=wire,
        replicas=replicas,
    )
    mine = fg.owner_plan.report()[fg.my_rank]
    return {
        "engine_collectives": engine.collectives,
        "engine_bytes_sent": engine.bytes_sent,
        "engine_bytes_received": engine.bytes_received,
        "plan_bytes_sent": mine["bytes_sent"],
        "plan_bytes_received": mine["bytes_received"],
        "owned_ns_flops": mine["ns_flops"],
        "buckets": len(fg.owner_plan.buckets),
        "peak_transient_bytes": engine.peak_transient_bytes,
        "transient_bound_bytes": bound,
        "bucket_bytes": int(opt.options["bucket_mb"] * 2**20),
    }


def transient_bound(
    largest_bucket_elements: int, input_bytes: int, result_bytes: int, wire_bytes: int, replicas: int
) -> int:
    """docs/scale.md's bound on OwnerCompute.peak_transient_bytes, B the largest bucket (at least one matrix):
    B gathered in the input dtype and its results, the next gather's send and receive buffers (B each on the
    wire), and one scatter: every rank's block of B, in every replica (replicas x B), and this rank's blocks
    received (B)."""
    return largest_bucket_elements * (input_bytes + result_bytes + (replicas + 3) * wire_bytes)


# ---------------------------------------------------------------------- the table
def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def markdown(plan_rows: list[dict], step_rows: list[dict]) -> str:
    out = [
        "### Plan (whole model, first step; NS TFLOP per step)",
        "",
        (
            "| model | mesh | W | rank | plan s | plan Python MiB | owned TFLOP | even split | busiest | "
            "plan_balance busiest | buckets | all_to_all / step | sent / step | received / step |"
        ),
        "|" + "---|" * 14,
    ]
    for r in plan_rows:
        out.append(
            f"| {r['model']} | {r['mesh']} | {r['world']} | {r['rank']} | {r['plan_s']:.2f} | "
            f"{r['plan_python_peak_mib']:.1f} | {r['owned_tflop']:.2f} | {r['even_split_tflop']:.2f} | "
            f"{r['busiest_tflop']:.2f} (rank {r['busiest_rank']}) | {r['plan_balance_busiest_tflop']:.2f} | "
            f"{r['buckets']} | {r['a2a_per_step']} | {fmt_bytes(r['bytes_sent_per_step'])} | "
            f"{fmt_bytes(r['bytes_received_per_step'])} |"
        )
    out += [
        "",
        "### Steps (first layers only; Newton-Schulz stood in)",
        "",
        (
            "| model | mesh | W | rank | layers | first step s | step s | step Python s | torch C calls | "
            "collectives / step | sent | received | NS TFLOP here | peak transient | bound |"
        ),
        "|" + "---|" * 15,
    ]
    for r in step_rows:
        calls = ", ".join(f"{k} {v}" for k, v in sorted(r["collectives"].items()))
        out.append(
            f"| {r['model']} | {r['mesh']} | {r['world']} | {r['rank']} | {r['layers']} | "
            f"{r['first_step_s']:.2f} | {r['step_s']:.3f} | {r['step_python_s']:.3f} | {r['step_c_calls']} | "
            f"{calls} | {fmt_bytes(r['a2a_bytes_sent'])} | {fmt_bytes(r['a2a_bytes_received'])} | "
            f"{r['ns_tflop_this_rank']:.3f} | {fmt_bytes(r['peak_transient_bytes'])} | "
            f"{fmt_bytes(r['transient_bound_bytes'])} |"
        )
    return "\n".join(out)


def summary(plan_rows: list[dict], step_rows: list[dict]) -> str:
    """Per model: the slowest plan build at W = 1,024, and each rank role's step at FSDP 1024 over FSDP 64."""
    out = [
        "### Growth with W",
        "",
        "| model | slowest plan at W = 1,024 | role | step s, W 64 -> 1,024 | host calls, W 64 -> 1,024 |",
        "|---|---|---|---|---|",
    ]
    for flavor in dict.fromkeys(r["model"] for r in plan_rows):
        slowest = max((r["plan_s"] for r in plan_rows if r["model"] == flavor and r["world"] == 1024), default=None)
        roles = {}
        for r in step_rows:
            if r["model"] == flavor and r["mesh"] in ("FSDP 64", "FSDP 1024"):
                role = "busiest owner" if r.get("busiest") else ("first" if r["rank"] == 0 else "last")
                roles.setdefault(role, {})[r["world"]] = r
        for role, by_world in roles.items():
            if 64 in by_world and 1024 in by_world:
                a, b = by_world[64], by_world[1024]
                calls_a = a["step_py_calls"] + a["step_c_calls"]
                calls_b = b["step_py_calls"] + b["step_c_calls"]
                out.append(
                    f"| {flavor} | {slowest:.2f} s | {role} | {a['step_s']:.3f} -> {b['step_s']:.3f} "
                    f"({b['step_s'] / a['step_s']:.2f}x) | {calls_a} -> {calls_b} ({calls_b / calls_a:.2f}x) |"
                )
    return "\n".join(out)


def pick_ranks(world: int, busiest: int) -> list[int]:
    return list(dict.fromkeys([0, world - 1, busiest]))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["8B", "70B"])
    ap.add_argument("--meshes", nargs="+", default=list(MESHES), choices=list(MESHES))
    ap.add_argument("--step-layers", type=int, default=2, help="layers in the stepped model (memory: W = 64)")
    ap.add_argument(
        "--steps",
        type=int,
        default=3,
        help="timed steps per rank (the first builds the plan), then one more under cProfile",
    )
    ap.add_argument("--out", default="scale_rehearsal", help="results/<out>.json and .md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # a shared 2-core machine; one rank's host work is single-threaded anyway
    mirrored, ns = MirroredGroup(), StandinNewtonSchulz()
    plan_rows, step_rows = [], []
    started = time.perf_counter()
    for flavor in args.models:
        for mesh_name in args.meshes:
            world = math.prod(MESHES[mesh_name])
            first = plan_row(flavor, mesh_name, 0, mirrored)
            for rank in pick_ranks(world, first["busiest_rank"]):
                row = first if rank == 0 else plan_row(flavor, mesh_name, rank, mirrored)
                row["plan_balance_busiest_tflop"] = plan_balance_busiest_tflop(flavor, world)
                plan_rows.append(row)
                print(
                    f"plan {flavor} {mesh_name} rank {rank}: {row['plan_s']:.2f} s, owns {row['owned_tflop']:.2f} "
                    f"TFLOP (even {row['even_split_tflop']:.2f}, busiest {row['busiest_tflop']:.2f}, plan_balance "
                    f"{row['plan_balance_busiest_tflop']:.2f}), {row['buckets']} buckets",
                    flush=True,
                )
            # The stepped model's own busiest owner (its plan has only the first layers).
            step_first = step_row(flavor, mesh_name, 0, args.step_layers, args.steps, mirrored, ns)
            probe = build_optimizer(build_model(flavor, args.step_layers, MESHES[mesh_name], 0))
            with mirrored.active():  # the plan's agreement all-reduce must see W mirrored ranks
                report = next(g for g in build_plan(probe) if g.matrices).owner_plan.report()
            busiest = max(report, key=lambda r: (r["ns_flops"], -r["rank"]))["rank"]
            del probe
            for rank in pick_ranks(world, busiest):
                row = (
                    step_first
                    if rank == 0
                    else step_row(flavor, mesh_name, rank, args.step_layers, args.steps, mirrored, ns)
                )
                row["busiest"] = rank == busiest
                step_rows.append(row)
                print(
                    f"step {flavor} {mesh_name} rank {rank}{' (busiest)' if rank == busiest else ''}: first "
                    f"{row['first_step_s']:.2f} s, steady {row['step_s']:.3f} s (Python {row['step_python_s']:.3f} s, "
                    f"{row['step_py_calls']} Python + {row['step_c_calls']} C calls), "
                    f"{row['collectives']}, peak transient {fmt_bytes(row['peak_transient_bytes'])} "
                    f"(bound {fmt_bytes(row['transient_bound_bytes'])})",
                    flush=True,
                )
    if dist.is_initialized():
        dist.destroy_process_group()
    table = markdown(plan_rows, step_rows) + "\n\n" + summary(plan_rows, step_rows)
    print("\n" + table)
    print(f"\nrehearsal took {time.perf_counter() - started:.0f} s")
    from _common import save

    data = {
        "plan": plan_rows,
        "steps": step_rows,
        "step_layers": args.step_layers,
        "seconds": time.perf_counter() - started,
    }
    save(args.out, data, table)
    return data


if __name__ == "__main__":
    main()
