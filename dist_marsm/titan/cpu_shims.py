"""The four things torchtitan 0.3.0's Trainer needs to run on a CPU-only machine with gloo.

Used only when no accelerator is present (:func:`needs_cpu_shims`); on a GPU machine nothing here
runs, so GPU behaviour is never altered. Everything is idempotent.

1. Device module. With no accelerator ``torchtitan.tools.utils.device_type/device_module`` fall back
   to ``"cuda"``/``torch.cuda``. :func:`apply_cpu_device_module` installs ``"cpu"`` and a small CPU
   device module answering get_device_name, current_device, device_count,
   get_device_properties(...).total_memory, memory_stats, reset_peak_memory_stats, empty_cache,
   set_device, synchronize - in ``torchtitan.tools.utils`` and in every already imported torchtitan
   module that copied those names with ``from torchtitan.tools.utils import ...``.
2. Attention. FlexAttention has no backward on CPU. :func:`adapt_trainer_config` swaps every
   ``FlexAttention.Config`` in the model for ``ScaledDotProductAttention.Config`` (causal SDPA).
   The Trainer then builds no attention masks and SDPA uses ``is_causal=True``. Difference: packed
   documents in one sequence can attend to earlier documents of the same sequence (RoPE positions
   still restart per document). Fine for a debug job; GPU runs keep FlexAttention.
3. FSDP gradient reduction. torchtitan sets ``gradient_divide_factor=1.0``; FSDP2 then reduces with
   ``ReduceOp.PREMUL_SUM``, which gloo lacks. The model's ``parallelize_fn`` is wrapped to call
   ``set_force_sum_reduction_for_comms(True)`` on every FSDP module (a plain SUM, same result).
4. SPMD backend. ``parallelism.spmd_backend = "partial_dtensor"`` gives classic FSDP2 DTensor
   parameters (MARSM reads its plan from DTensor placements).
"""

from __future__ import annotations

import functools
import os
import platform
import sys
import types

import torch

__all__ = ["needs_cpu_shims", "apply_cpu_device_module", "adapt_trainer_config", "CPU_DEVICE_MODULE"]


def needs_cpu_shims() -> bool:
    """True when torch sees no accelerator (the condition under which torchtitan assumes cuda)."""
    from torch._utils import _get_available_device_type

    return _get_available_device_type() is None


def _total_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def _peak_rss_bytes() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    except Exception:  # noqa: BLE001 - purely informational
        return -1


class _CpuDeviceProperties:
    def __init__(self):
        self.name = platform.processor() or platform.machine() or "cpu"
        self.total_memory = _total_memory_bytes()
        self.multi_processor_count = os.cpu_count() or 1


def _make_cpu_device_module() -> types.ModuleType:
    mod = types.ModuleType("dist_marsm_cpu_device_module")
    mod.__doc__ = "CPU stand-in for torch.cuda as torchtitan uses it (dist_marsm.titan.cpu_shims)."
    mod.is_available = lambda: True
    mod.device_count = lambda: 1   # torchtitan then picks device index 0 on every rank
    mod.current_device = lambda: 0
    mod.set_device = lambda device: None
    mod.synchronize = lambda device=None: None
    mod.empty_cache = lambda: None
    mod.reset_peak_memory_stats = lambda device=None: None
    mod.get_device_name = lambda device=None: f"CPU ({_CpuDeviceProperties().name})"
    mod.get_device_properties = lambda device=None: _CpuDeviceProperties()
    # Peak resident set size of the process stands in for "reserved"/"active" peaks.
    mod.memory_stats = lambda device=None: {"active_bytes.all.peak": _peak_rss_bytes(),
                                            "reserved_bytes.all.peak": _peak_rss_bytes(),
                                            "num_alloc_retries": 0, "num_ooms": 0}
    mod.memory = types.SimpleNamespace(memory_stats=mod.memory_stats)
    mod._dist_marsm_cpu_shim = True
    return mod


CPU_DEVICE_MODULE = _make_cpu_device_module()


def apply_cpu_device_module() -> bool:
    """Obstacle 1. Install the CPU device type/module in torchtitan; returns False (and does nothing)
    when an accelerator is present. Safe to call any number of times, before or after torchtitan
    modules are imported."""
    if not needs_cpu_shims():
        return False
    import torchtitan.tools.utils as tt_utils
    import torchtitan.trainer  # noqa: F401 - imports (nearly) every module that copies the names

    for name, module in list(sys.modules.items()):
        if module is None or not (name == "torchtitan" or name.startswith("torchtitan.")):
            continue
        if getattr(module, "device_type", None) == "cuda":
            module.device_type = "cpu"
        if getattr(module, "device_module", None) is torch.cuda:
            module.device_module = CPU_DEVICE_MODULE
    tt_utils.device_type, tt_utils.device_module = "cpu", CPU_DEVICE_MODULE
    return True


def _force_sum_reduction(model: torch.nn.Module) -> int:
    from torch.distributed.fsdp import FSDPModule

    count = 0
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
            count += 1
    return count


def _wrap_parallelize_fn(parallelize_fn):
    if getattr(parallelize_fn, "_dist_marsm_force_sum", False):
        return parallelize_fn

    @functools.wraps(parallelize_fn)
    def parallelize_with_sum_reduction(model, *args, **kwargs):
        model = parallelize_fn(model, *args, **kwargs)
        _force_sum_reduction(model)
        return model

    parallelize_with_sum_reduction._dist_marsm_force_sum = True
    return parallelize_with_sum_reduction


def use_causal_sdpa(model_config) -> int:
    """Obstacle 2: replace every FlexAttention config in a model config by causal SDPA; returns the count."""
    from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention

    found = list(model_config.traverse(FlexAttention.Config))
    for _fqn, _cfg, parent, attr in found:
        if isinstance(attr, int):
            parent[attr] = ScaledDotProductAttention.Config()
        else:
            setattr(parent, attr, ScaledDotProductAttention.Config())
    return len(found)


def adapt_trainer_config(config) -> bool:
    """Obstacles 1-4 for one ``Trainer.Config`` (modified in place). No-op with an accelerator.

    Returns True when the shims were applied.
    """
    if not apply_cpu_device_module():
        return False
    spec = config.model_spec
    if spec is not None:
        use_causal_sdpa(spec.model)
        spec.parallelize_fn = _wrap_parallelize_fn(spec.parallelize_fn)
    config.parallelism.spmd_backend = "partial_dtensor"
    config.training.disable_cuda_graphs = True
    return True
