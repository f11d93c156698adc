"""torchtitan config registry: ``python -m torchtitan.train --module dist_marsm.titan --config <name>``.

torchtitan 0.3.0's ConfigManager imports ``<module>.config_registry`` (then ``<module>`` itself) for
a module path outside torchtitan and calls the function named by ``--config``. Each function here
translates the shipped recipe of the same name (``recipes/<name>.toml``, found next to the package or
in ``$DIST_MARSM_RECIPES``) with :func:`dist_marsm.titan.recipe.to_trainer_config`, so both entry
points train the same thing. torchtitan's tyro overrides then apply on top (``--training.steps 10``);
MARS-M hyperparameters live in ``--optimizer.param_groups.0.optimizer_kwargs.KEY`` there, which is
why ``python -m dist_marsm.train`` (with ``--optimizer.lr``) is the recommended front end.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from torchtitan.trainer import Trainer

from dist_marsm.titan.metrics import MARSMMetricsProcessor
from dist_marsm.titan.optimizer_container import MARSMOptimizersContainer

__all__ = ["MARSMTrainerConfig", "debug_cpu", "debug_cpu_adamw", "debug_cpu_distmuon", "llama3_8b", "llama3_70b", "recipe_config",
           "recipes_dir"]


@dataclass(kw_only=True, slots=True)
class MARSMTrainerConfig(Trainer.Config):
    """``Trainer.Config`` with the optimizer/metrics fields typed as dist_marsm's subclasses, so tyro
    (which rebuilds the config from field types) keeps them. ``build()`` still makes torchtitan's Trainer."""

    optimizer: MARSMOptimizersContainer.Config = field(default_factory=MARSMOptimizersContainer.Config)
    metrics: MARSMMetricsProcessor.Config = field(default_factory=MARSMMetricsProcessor.Config)


def recipes_dir() -> Path:
    env = os.environ.get("DIST_MARSM_RECIPES")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "recipes"


def recipe_config(name_or_path: str):
    """``Trainer.Config`` for a shipped recipe name (or a path to a .toml file)."""
    from dist_marsm.titan.recipe import load_recipe, to_trainer_config

    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = recipes_dir() / f"{name_or_path}.toml"
    world = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None
    return to_trainer_config(load_recipe(str(path), world_size=world))


def debug_cpu():
    """The CPU main job: llama3 debugmodel, MARS-M, embedded corpus (2 ranks)."""
    return recipe_config("debug_cpu")


def debug_cpu_adamw():
    """The CPU main job with torch AdamW (baseline)."""
    return recipe_config("debug_cpu_adamw")


def debug_cpu_distmuon():
    """The debug job with torchtitan's DistMuon (needs CUDA parameters: GPU only)."""
    return recipe_config("debug_cpu_distmuon")


def llama3_8b():
    """Llama 3 8B, FSDP, MARS-M (GPU cluster)."""
    return recipe_config("llama3_8b")


def llama3_70b():
    """Llama 3 70B, FSDP + TP 8, MARS-M (GPU cluster)."""
    return recipe_config("llama3_70b")
