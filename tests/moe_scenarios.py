"""Spawned-rank scenarios for tests/test_moe.py: torchtitan's deepseek_v3 ``debugmodel_cpu`` (MoE) under
torchtitan's own parallelize function (expert parallelism 2 or FSDP-sharded experts) trained with MARSM,
against the same model, data and steps in one process. Each rank writes its results to
``$DIST_MARSM_MOE_OUT/<scenario>_rank<R>.json``; the test compares them."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from tests._spawn import scenario

STEPS, BATCH, SEQ = 3, 4, 32  # per rank: BATCH sequences of SEQ tokens


def _model(ep: int = 1):
    from torchtitan.models import deepseek_v3
    from torchtitan.models.deepseek_v3.sharding import set_deepseek_v3_sharding_config

    from dist_marsm.titan import cpu_shims, moe

    cpu_shims.apply_cpu_device_module()
    moe.register_flavors()
    spec = deepseek_v3.model_registry(moe.FLAVOR)
    cpu_shims.use_causal_sdpa(spec.model)
    set_deepseek_v3_sharding_config(spec.model, enable_sp=False, enable_ep=ep > 1)  # as the Trainer does
    torch.manual_seed(0)
    model = spec.model.build()
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    return spec, model


def _tokens(world: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 2048, (world * BATCH, SEQ + 1), generator=g)


def _train(model, tokens: torch.Tensor, n_global: int, group=None):
    """STEPS MARSM steps (fp32 Newton-Schulz and wire); loss = sum of token CE / all tokens of all ranks."""
    from dist_marsm import MARSM, build_param_groups

    opt = MARSM(
        build_param_groups(model),
        lr=0.02,
        weight_decay=0.1,
        ns_dtype="float32",
        wire_dtype="float32",
        process_group=group,
    )
    losses, stats = [], []
    for _ in range(STEPS):
        logits = model(tokens[:, :-1])
        loss = (
            torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum")
            / n_global
        )
        loss.backward()
        opt.step()
        opt.zero_grad()
        total = loss.detach().clone()
        if group is None:
            dist.all_reduce(total)
        losses.append(float(total))
        stats.append(dict(opt.last_step_stats))
    report = opt.plan_report()
    params = {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().double() for n, p in model.named_parameters()
    }
    mars = {n: tuple(p.shape) for g in opt.param_groups if g["use_mars"] for n, p in zip(g["param_names"], g["params"])}
    return losses, stats, report, params, mars


def _run(rank: int, world: int, ep: int, name: str) -> None:
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed.utils import set_spmd_backend

    from dist_marsm.titan import cpu_shims

    set_spmd_backend("partial_dtensor")  # as the CPU recipes (cpu_shims): classic FSDP2 DTensors
    spec, model = _model(ep)
    tokens = _tokens(world)
    n_global = tokens[:, 1:].numel()
    dims = ParallelDims(
        dp_replicate=1, dp_shard=world, cp=1, tp=1, pp=1, ep=ep, world_size=world, spmd_backend="partial_dtensor"
    )
    dims.build_mesh()
    parallelize = cpu_shims._wrap_parallelize_fn(spec.parallelize_fn)
    model = parallelize(
        model,
        parallel_dims=dims,
        training=TrainingConfig(mixed_precision_param="float32"),
        parallelism=ParallelismConfig(
            data_parallel_shard_degree=world, expert_parallel_degree=ep, spmd_backend="partial_dtensor"
        ),
        compile_config=CompileConfig(),
        ac_config=None,
        dump_folder="/tmp",
    )
    placements = {n: str(getattr(p, "placements", None)) for n, p in model.named_parameters()}
    losses, stats, report, params, mars = _train(model, tokens[rank * BATCH : (rank + 1) * BATCH], n_global)
    single, alone = None, dist.new_group([0])
    if rank == 0:  # the reference: the same model and all ranks' data in this one process, no parallelism
        _, ref_model = _model()
        ref_losses, ref_stats, ref_report, ref_params, _ = _train(ref_model, tokens, n_global, alone)
        single = {
            "losses": ref_losses,
            "stats": ref_stats,
            "report": ref_report,
            "max_param_diff": {n: float((params[n] - ref_params[n]).abs().max()) for n in params},
            "param_scale": {n: float(ref_params[n].abs().max()) for n in params},
        }
    out = {"losses": losses, "stats": stats, "report": report, "placements": placements, "mars": mars, "single": single}
    with open(os.path.join(os.environ["DIST_MARSM_MOE_OUT"], f"{name}_rank{rank}.json"), "w") as f:
        json.dump(out, f, default=str)


@scenario(2)
def expert_parallel(rank: int, world: int) -> None:
    _run(rank, world, ep=world, name="expert_parallel")


@scenario(2)
def fsdp_experts(rank: int, world: int) -> None:
    _run(rank, world, ep=1, name="fsdp_experts")
