"""What torchtitan 0.3.0's Trainer needs on a CPU-only machine with gloo (no-op with an accelerator). The
four obstacles (device module, FlexAttention backward, PREMUL_SUM, SPMD backend): docs/torchtitan.md.
"""

import functools
import os
import platform
import resource
import sys
import types

import torch
from torch._utils import _get_available_device_type
from torch.distributed.fsdp import FSDPModule
from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention


def needs_cpu_shims() -> bool:
    """True when torch sees no accelerator (the condition under which torchtitan assumes cuda)."""
    return _get_available_device_type() is None


_PROPERTIES = types.SimpleNamespace(
    name=platform.processor() or platform.machine() or "cpu",
    total_memory=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
    multi_processor_count=os.cpu_count() or 1,
)
CPU_DEVICE_MODULE = types.ModuleType("dist_marsm_cpu_device_module", "torch.cuda as torchtitan uses it, for CPUs")
CPU_DEVICE_MODULE.__dict__.update(
    is_available=lambda: True,
    device_count=lambda: 1,  # torchtitan then picks device index 0 on every rank
    current_device=lambda: 0,
    set_device=lambda device: None,
    synchronize=lambda device=None: None,
    empty_cache=lambda: None,
    reset_peak_memory_stats=lambda device=None: None,
    get_device_name=lambda device=None: f"CPU ({_PROPERTIES.name})",
    get_device_properties=lambda d=None: _PROPERTIES,
    memory_stats=lambda device=None: {  # the process's peak resident set size stands in for the allocator's
        **dict.fromkeys(
            ("active_bytes.all.peak", "reserved_bytes.all.peak"),
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        ),
        "num_alloc_retries": 0,
        "num_ooms": 0,
    },
)
CPU_DEVICE_MODULE.memory = types.SimpleNamespace(memory_stats=CPU_DEVICE_MODULE.memory_stats)


def apply_cpu_device_module() -> bool:
    """Obstacle 1: the CPU device type/module in torchtitan (idempotent); False with an accelerator."""
    if not needs_cpu_shims():
        return False
    import torchtitan.trainer  # noqa: F401 - imports (nearly) every module that copies the names

    for name, module in list(sys.modules.items()):
        if module is not None and (name == "torchtitan" or name.startswith("torchtitan.")):
            if getattr(module, "device_type", None) == "cuda":
                module.device_type = "cpu"
            if getattr(module, "device_module", None) is torch.cuda:
                module.device_module = CPU_DEVICE_MODULE
    return True


def _wrap_parallelize_fn(parallelize_fn):
    """Obstacle 3: every FSDP module of the parallelized model reduces with a plain SUM."""

    @functools.wraps(parallelize_fn)
    def parallelize_with_sum_reduction(model, *args, **kwargs):
        model = parallelize_fn(model, *args, **kwargs)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)
        return model

    return parallelize_with_sum_reduction


def replace_configs(model_config, config_cls, make) -> None:
    """Replace every ``config_cls`` config in a model config tree by ``make(old)``."""
    for _fqn, old, parent, attr in list(model_config.traverse(config_cls)):
        parent.__setitem__(attr, make(old)) if isinstance(attr, int) else setattr(parent, attr, make(old))


def use_causal_sdpa(model_config) -> None:
    """Obstacle 2: every FlexAttention config becomes causal SDPA."""
    return replace_configs(model_config, FlexAttention.Config, lambda old: ScaledDotProductAttention.Config())


def adapt_trainer_config(config) -> bool:
    """Obstacles 1-4 for one ``Trainer.Config`` (in place); False (nothing done) with an accelerator."""
    if not apply_cpu_device_module():
        return False
    if config.model_spec is not None:
        use_causal_sdpa(config.model_spec.model)
        config.model_spec.parallelize_fn = _wrap_parallelize_fn(config.model_spec.parallelize_fn)
    config.parallelism.spmd_backend = "partial_dtensor"  # obstacle 4
    config.training.disable_cuda_graphs = True
    return True
