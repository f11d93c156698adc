"""torchrun restarts (``--max-restarts``): give every restart attempt its own rendezvous keys.

Measured with torch 2.14.1 and ``torchrun --standalone --max-restarts 1`` (gloo, CPU): after a rank
dies, torchrun restarts all workers against the *same* agent TCPStore and MASTER_PORT, and the
store still holds the previous attempt's keys. The new rank 0 then reads the dead rank's old gloo
address and fails: ``Gloo connectFullMesh failed ... Connection refused, remote=<old port>``.
:func:`fresh_store_per_restart` wraps the store that ``init_process_group``'s env:// rendezvous
creates in a ``PrefixStore("dist_marsm_attempt_<TORCHELASTIC_RESTART_COUNT>")``, so every attempt
(and every process group created from the default store) uses fresh keys. It changes nothing when the
process is not under torchelastic or on the first attempt's key layout apart from the prefix, and it
only affects this process. Call it before ``init_process_group`` (before torchtitan's Trainer is
built).
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
