"""Entry point: ``python -m dist_marsm.train --recipe recipes/X.toml [--section.key value ...]``.

The recipe (TOML) gives the config, the command line overrides it through tyro as torchtitan's own
``python -m torchtitan.train`` does (``--optimizer.gamma 0``, ``--checkpoint.no-enable``;
``--recipe R --help`` lists every field with its doc).

* Under torchrun (RANK and WORLD_SIZE set) this process is one rank: it checks the config against the
  world size, builds torchtitan's Trainer and trains.
* Otherwise it checks the config, builds the embedded tokenizer once, and starts a local job with
  ``[job] local_ranks`` processes (torch.distributed.run, standalone rendezvous, gloo without an
  accelerator), each running this module as one rank. Only rank 0's output reaches the console unless
  ``LOG_RANK`` names others (``LOG_RANK=0,1``), as torchtitan's launcher does.

Every rank logs ``dist_marsm.train: rank R of W on HOST (local rank L)`` at start. Outputs go to
``dump_folder``: metrics.jsonl (one JSON object per logged step), checkpoints in
``<dump_folder>/<[checkpoint] folder>`` (resumed automatically from the latest complete one).
``python -m dist_marsm.plot <dump_folder>`` draws the loss curve. ``--check`` validates and prints the config.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path


def _parse(argv: list[str]):
    parser = argparse.ArgumentParser(
        prog="python -m dist_marsm.train", description=__doc__.split("\n\n")[0], add_help=False
    )
    parser.add_argument(
        "--recipe",
        help="TOML recipe: a file, or the name of a shipped one (debug_cpu, ...; "
        "python -m dist_marsm.shipped lists them)",
    )
    parser.add_argument("--check", action="store_true", help="validate the recipe, print the config, and exit")
    args, overrides = parser.parse_known_args(argv)
    if args.recipe is None:
        parser.print_help()
        print("\nWith --recipe R, --help lists every config field (the overrides) with its doc.")
        raise SystemExit(0 if {"-h", "--help"} & set(argv) else 2)
    return args, overrides


def _error(msg: str) -> None:
    print(f"dist_marsm.train: error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = _parse(argv)
    from dist_marsm.shipped import resolve_recipe

    try:
        args.recipe = resolve_recipe(args.recipe)
    except LookupError as e:
        _error(str(e))
    from dist_marsm.titan.recipe import RecipeError, check_world_size, load_recipe

    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    try:
        config = load_recipe(
            args.recipe, overrides, world_size=int(os.environ["WORLD_SIZE"]) if under_torchrun else None
        )
        if not under_torchrun and not args.check:
            check_world_size(config, config.job.local_ranks, args.recipe)
        check_resume(config, args.recipe)
    except RecipeError as e:
        _error(str(e))
    if args.check:
        import json

        print(
            json.dumps(
                {k: v for k, v in config.to_dict().items() if k not in ("model_spec", "loss")}, indent=1, default=str
            )
        )
        return 0
    if under_torchrun:
        return _run_rank(config, args.recipe)
    return _launch_local(config, args.recipe, argv)


def check_resume(config, where: str) -> None:
    """Stop before training when the checkpoint a run would resume from was written by another optimizer
    (told by its DCP metadata: MARS-M groups hold gamma, DistMuon's adjust_lr_fn). With ``[checkpoint] verify``
    that is the newest step whose ``.metadata`` matches its checksum manifest (data files are verified by the
    ranks, dist_marsm.titan.checkpoint)."""
    from torch.distributed.checkpoint import FileSystemReader

    from dist_marsm.checkpoint_manifest import complete_steps, metadata_intact
    from dist_marsm.titan.optimizer_container import OPTIMIZER_NAME
    from dist_marsm.titan.recipe import RecipeError

    ck, folder = config.checkpoint, Path(config.dump_folder) / config.checkpoint.folder
    if not ck.enable or "optimizer" in ck.exclude_from_loading or not folder.is_dir():
        return
    steps = [s for s in complete_steps(str(folder)) if not ck.verify or metadata_intact(str(folder / f"step-{s}"))]
    step = ck.load_step if ck.load_step != -1 else (steps[-1] if steps else None)
    if step not in steps:
        return
    keys = [
        k
        for k in FileSystemReader(str(folder / f"step-{step}")).read_metadata().state_dict_metadata
        if k.startswith("optimizer.param_groups.")
    ]
    saved = (
        None
        if not keys
        else OPTIMIZER_NAME
        if any(k.endswith(".gamma") for k in keys)
        else "DistMuon"
        if any(k.endswith(".adjust_lr_fn") for k in keys)
        else "AdamW"
    )
    if saved is not None and saved != config.optimizer.name:
        raise RecipeError(
            f"{where}: [optimizer] name is {config.optimizer.name!r}, but the checkpoint it would "
            f"resume from ({folder / f'step-{step}'}) was written by {saved!r}; resume with "
            f"--optimizer.name {saved}, use another dump_folder, or set [checkpoint] "
            f'exclude_from_loading = ["optimizer"]'
        )


def _launch_local(config, recipe: str, argv: list[str]) -> int:
    """Start ``[job] local_ranks`` copies of this module through torch.distributed.run (torchrun)."""
    from torch.distributed.run import get_args_parser, run

    nproc = config.job.local_ranks
    if config.job.threads_per_rank:
        os.environ["OMP_NUM_THREADS"] = str(config.job.threads_per_rank)
    print(
        f"dist_marsm.train: launching a local job with {nproc} ranks on {socket.gethostname()} "
        f"(recipe {recipe}, outputs in {config.dump_folder})",
        flush=True,
    )
    torchrun_args = get_args_parser().parse_args(
        [
            "--standalone",
            "--nnodes",
            "1",
            "--nproc-per-node",
            str(nproc),
            "--local-ranks-filter",
            os.environ.get("LOG_RANK", "0"),
            "--role",
            "rank",
            "--tee",
            "3",
            "--module",
            "dist_marsm.train",
            *argv,
        ]
    )
    try:
        run(torchrun_args)
    except Exception as e:  # noqa: BLE001 - torchrun's ChildFailedError already printed the rank's traceback
        print(f"dist_marsm.train: the local job failed: {type(e).__name__}", file=sys.stderr, flush=True)
        return 1
    return 0


def _run_rank(config, recipe: str) -> int:
    import faulthandler

    import torch

    # A rank killed by a C++ abort or a segfault raises no Python exception, so torchrun's error file stays
    # empty; this prints every thread's Python stack to the rank's stderr first.
    faulthandler.enable(all_threads=True)

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    print(
        f"dist_marsm.train: rank {rank} of {world} on {socket.gethostname()} (local rank "
        f"{os.environ.get('LOCAL_RANK', '0')}), recipe {recipe}, dump_folder {config.dump_folder}",
        flush=True,
    )
    if config.job.threads_per_rank:
        torch.set_num_threads(config.job.threads_per_rank)

    from torchtitan.tools.logging import init_logger, logger

    init_logger()
    if config.job.description and rank == 0:
        logger.info(f"recipe: {config.job.description}")
    fresh_store_per_restart()
    trainer = None
    try:
        trainer = config.build()
        trainer.train()
    except BaseException:
        if trainer is not None:
            trainer.close()
        raise
    trainer.close()
    if torch.distributed.is_initialized():
        # Every rank done before any tears down its connections: a gloo peer that closes while another still
        # uses them can abort that rank at exit after a run that succeeded.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


def fresh_store_per_restart() -> bool:
    """torchrun ``--max-restarts``: before ``init_process_group``, give this restart attempt its own rendezvous
    key space (a ``PrefixStore`` per ``TORCHELASTIC_RESTART_COUNT``); the agent's TCPStore keeps the dead
    attempt's keys (docs/checkpointing.md). Idempotent; True under torchelastic."""
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return False
    import importlib

    import torch.distributed as dist

    rdzv = importlib.import_module("torch.distributed.rendezvous")  # the module, not dist.rendezvous()
    original = rdzv._create_c10d_store
    if not getattr(original, "dist_marsm_prefixed", False):
        prefix = f"dist_marsm_attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}"

        def _create_c10d_store(*args, **kwargs):
            return dist.PrefixStore(prefix, original(*args, **kwargs))

        _create_c10d_store.dist_marsm_prefixed = True
        rdzv._create_c10d_store = _create_c10d_store
    return True


if __name__ == "__main__":
    raise SystemExit(main())
