"""Run torchtitan's DistMuon on CPU (gloo) for benchmarks and the parity test - never imported by dist_marsm.

torchtitan 0.3.0's DistMuon is written for one CUDA device per process. Its math and its packed
all_to_all runtime work on CPU tensors; three things around them do not. ``cpu_accommodations()``
removes exactly those three, and only while DistMuon is being built or stepped (``build_dist_muon_cpu``
and ``CPUDistMuon.step`` enter it; outside it torch and torchtitan are untouched). On a CUDA machine
nothing is patched: ``build_dist_muon_cpu`` and ``CPUDistMuon`` pass straight through.
"""

from __future__ import annotations

import contextlib
import types

import torch

_ORIGINAL_GET_DEVICE_MODULE = torch.get_device_module
_ORIGINAL_RECORD_STREAM = torch.Tensor.record_stream


class _NoOpEvent:
    """Stands in for a device event. CPU kernels run in program order, so there is nothing to wait for."""

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


class _NoOpStream:
    """Stands in for a device stream; every ordering request is already satisfied on CPU."""

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else _NoOpEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


_CURRENT = _NoOpStream()

# The handle answers the four things the bucketed runtime asks of torch.get_device_module(device):
# Stream(device=..., priority=...), Event(), current_stream(device) and the stream(s) context manager.
CPU_STREAM_HANDLE = types.SimpleNamespace(
    Stream=lambda device=None, priority=0: _NoOpStream(),
    Event=lambda *args, **kwargs: _NoOpEvent(),
    current_stream=lambda device=None: _CURRENT,
    stream=lambda s=None: contextlib.nullcontext(),
    synchronize=lambda device=None: None,
)


def _get_device_module(device=None):
    is_cpu = (device is not None and torch.device(device).type == "cpu") or (
        device is None and not torch.cuda.is_available()
    )
    return CPU_STREAM_HANDLE if is_cpu else _ORIGINAL_GET_DEVICE_MODULE(device)


def _record_stream(self, stream):
    if self.device.type == "cpu":
        return None
    return _ORIGINAL_RECORD_STREAM(self, stream)


def _validate_parameter_storage_any_device(self) -> torch.device:
    """DistMuon._validate_parameter_storage without the 'must be CUDA' clause (same single-device rule)."""
    from torch.distributed.tensor import DTensor

    devices = set()
    for group in self.param_groups:
        for param in group["params"]:
            if not isinstance(param, DTensor):
                raise TypeError("DistMuon requires DTensor parameters")
            devices.add(param.to_local().device)
    if len(devices) != 1:
        raise ValueError("DistMuon requires all parameters on one device per process")
    return devices.pop()


@contextlib.contextmanager
def cpu_accommodations():
    """The three CPU accommodations DistMuon needs (module docstring), for the duration of the ``with`` block."""
    from torchtitan.distributed.flex_shard.dist_muon import DistMuon

    saved_validate = DistMuon.__dict__["_validate_parameter_storage"]
    # 1. DistMuon._validate_parameter_storage raises "DistMuon requires one CUDA device per process" for CPU
    #    parameters, although nothing in its math needs CUDA: keep its one-device check, drop the CUDA check.
    DistMuon._validate_parameter_storage = _validate_parameter_storage_any_device
    # 2. The bucketed runtime asks torch.get_device_module(device) for Stream(device=..., priority=...),
    #    Event(), current_stream(device) and stream(s); torch.cpu.Stream takes no device/priority arguments.
    #    CPU work is executed in program order, so streams and events whose operations are no-ops are exact.
    torch.get_device_module = _get_device_module
    # 3. Tensor.record_stream is a CUDA-caching-allocator hint; on a CPU tensor it raises. No-op for CPU only.
    #    (torchtitan 0.3.0's runtime already skips it for CPU scratch buffers; kept so a path that does not
    #    skip it cannot fail on CPU.)
    torch.Tensor.record_stream = _record_stream
    try:
        yield
    finally:
        DistMuon._validate_parameter_storage = saved_validate
        torch.get_device_module = _ORIGINAL_GET_DEVICE_MODULE
        torch.Tensor.record_stream = _ORIGINAL_RECORD_STREAM


def _on_cpu(params) -> bool:
    for group in params:
        for p in group["params"]:
            local = p.to_local() if hasattr(p, "to_local") else p
            return local.device.type == "cpu"
    return False


class CPUDistMuon:
    """Wraps a DistMuon built on CPU: ``step`` runs under ``cpu_accommodations()``; everything else delegates."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def step(self, closure=None):
        with cpu_accommodations():
            return self.optimizer.step(closure)

    def __getattr__(self, name):
        return getattr(self.optimizer, name)


def build_dist_muon_cpu(params, **kwargs):
    """torchtitan's build_dist_muon; on CPU parameters under the accommodations and wrapped by CPUDistMuon."""
    from torchtitan.distributed.flex_shard import build_dist_muon

    params = list(params)
    if not _on_cpu(params):
        return build_dist_muon(params, **kwargs)
    with cpu_accommodations():
        return CPUDistMuon(build_dist_muon(params, **kwargs))
