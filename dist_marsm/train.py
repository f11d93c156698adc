"""Entry point: ``python -m dist_marsm.train --recipe recipes/X.toml [--section.key value ...]``.

* Under torchrun (RANK and WORLD_SIZE set) this process is one rank: it checks the recipe against
  the world size, builds torchtitan's Trainer from it and trains.
* Otherwise it checks the recipe, builds the embedded tokenizer once, and starts a local job itself
  with ``[job] local_ranks`` processes (torch.distributed.run, standalone rendezvous; gloo when the
  machine has no accelerator), each running this module as one rank.

Every rank logs one line at start: ``dist_marsm.train: rank R of W on HOST (local rank L)``.
Outputs go to ``[job] dump_folder``: metrics.jsonl (rank 0, one JSON object per logged step),
loss_curve.png at the end, checkpoints in ``<dump_folder>/<[checkpoint] folder>`` (resumed
automatically from the latest complete one).

``--check`` only validates the recipe and prints the effective values (no torchtitan import).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys


def _parse(argv: list[str]):
    parser = argparse.ArgumentParser(prog="python -m dist_marsm.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="TOML recipe (see recipes/ and docs/torchtitan.md)")
    parser.add_argument("--check", action="store_true", help="validate the recipe, print it, and exit")
    args, overrides = parser.parse_known_args(argv)
    return args, overrides


def _error(msg: str) -> None:
    print(f"dist_marsm.train: error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = _parse(argv)
    from dist_marsm.titan.recipe import RecipeError, load_recipe

    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    try:
        world = int(os.environ["WORLD_SIZE"]) if under_torchrun else None
        recipe = load_recipe(args.recipe, overrides, world_size=world)
        if not under_torchrun and not args.check:
            recipe = load_recipe(args.recipe, overrides, world_size=recipe["job"]["local_ranks"])
    except RecipeError as e:
        _error(str(e))
    if args.check:
        print(json.dumps(recipe.values, indent=1, default=str))
        return 0
    if under_torchrun:
        return _run_rank(recipe)
    return _launch_local(recipe, argv)


def _launch_local(recipe, argv: list[str]) -> int:
    """Start ``[job] local_ranks`` copies of this module through torch.distributed.run (torchrun)."""
    from torch.distributed.run import get_args_parser, run

    from dist_marsm.titan import corpus

    nproc = recipe["job"]["local_ranks"]
    if recipe["model"]["hf_assets_path"] == "embedded":
        # Build the tokenizer once here rather than racing in every rank (each would also cope).
        from dist_marsm.titan.recipe import model_spec

        corpus.tokenizer_dir(model_spec(recipe).model.vocab_size)
    threads = recipe["job"]["threads_per_rank"]
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    print(f"dist_marsm.train: launching a local job with {nproc} ranks on {socket.gethostname()} "
          f"(recipe {recipe.path}, outputs in {recipe.dump_folder})", flush=True)
    torchrun_args = get_args_parser().parse_args(
        ["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc), "--module", "dist_marsm.train", *argv])
    try:
        run(torchrun_args)
    except Exception as e:  # noqa: BLE001 - torchrun's ChildFailedError already printed the rank's traceback
        print(f"dist_marsm.train: the local job failed: {type(e).__name__}", file=sys.stderr, flush=True)
        return 1
    return 0


def _run_rank(recipe) -> int:
    import torch

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    print(f"dist_marsm.train: rank {rank} of {world} on {socket.gethostname()} (local rank {local_rank}), "
          f"recipe {recipe.path}, dump_folder {recipe.dump_folder}", flush=True)
    threads = recipe["job"]["threads_per_rank"]
    if threads:
        torch.set_num_threads(threads)

    from torchtitan.tools.logging import init_logger, logger

    from dist_marsm.titan.recipe import ignored_optimizer_keys, to_trainer_config

    init_logger()
    logger.info(f"dist_marsm.train: rank {rank} of {world} on {socket.gethostname()}")
    if recipe["job"]["description"] and rank == 0:
        logger.info(f"recipe: {recipe['job']['description']}")
    ignored = ignored_optimizer_keys(recipe)
    if ignored and rank == 0:
        logger.info(f"[optimizer] keys not used by {recipe['optimizer']['name']}: {ignored}")
    from dist_marsm.titan import elastic, fault_injection

    elastic.fresh_store_per_restart()   # torchrun --max-restarts: a fresh rendezvous key space per attempt
    fault_injection.install_from_env()  # no-op unless DIST_MARSM_FAULT is set (crash-restart tests)
    config = to_trainer_config(recipe)
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
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
