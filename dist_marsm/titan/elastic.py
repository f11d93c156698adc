"""torchrun restarts (``--max-restarts``): every restart attempt gets its own rendezvous keys.

torchrun restarts workers against the same agent TCPStore, which still holds the previous attempt's keys
(the new rank 0 would read a dead rank's gloo address; docs/checkpointing.md). So the store env://
rendezvous creates is wrapped in a ``PrefixStore`` per ``TORCHELASTIC_RESTART_COUNT``, in this process.
"""

from __future__ import annotations

import os

import torch.distributed as dist


def fresh_store_per_restart() -> bool:
    """Install the per-attempt store prefix (idempotent); True when running under torchelastic.
    Call it before ``init_process_group``."""
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return False
    import importlib

    rdzv = importlib.import_module("torch.distributed.rendezvous")  # the module, not dist.rendezvous()
    original = rdzv._create_c10d_store
    if getattr(original, "dist_marsm_prefixed", False):
        return True
    prefix = f"dist_marsm_attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}"

    def _create_c10d_store(*args, **kwargs):
        return dist.PrefixStore(prefix, original(*args, **kwargs))

    _create_c10d_store.dist_marsm_prefixed = True
    rdzv._create_c10d_store = _create_c10d_store
    return True
