"""torchrun restarts (``--max-restarts``): every restart attempt gets its own rendezvous keys.

After a rank dies torchrun restarts all workers against the same agent TCPStore, which still holds the
previous attempt's keys; the new rank 0 then reads the dead rank's gloo address and fails ("Gloo
connectFullMesh failed ... Connection refused"; torch 2.14.1, docs/checkpointing.md).
:func:`fresh_store_per_restart` wraps the store env:// rendezvous creates in a
``PrefixStore("dist_marsm_attempt_<TORCHELASTIC_RESTART_COUNT>")``, in this process only. Call it
before ``init_process_group``.
"""

from __future__ import annotations

import os

_installed = {"done": False}


def fresh_store_per_restart() -> bool:
    """Install the per-attempt store prefix (idempotent); True when running under torchelastic."""
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return False
    if _installed["done"]:
        return True
    import importlib

    import torch.distributed as dist

    rdzv = importlib.import_module("torch.distributed.rendezvous")  # the module, not dist.rendezvous()

    original = rdzv._create_c10d_store
    prefix = f"dist_marsm_attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}"

    def _create_c10d_store(*args, **kwargs):
        return dist.PrefixStore(prefix, original(*args, **kwargs))

    rdzv._create_c10d_store = _create_c10d_store
    _installed["done"] = True
    return True
