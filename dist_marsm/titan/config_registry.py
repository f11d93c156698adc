"""``python -m torchtitan.train --module dist_marsm.titan --config <name>``: the shipped recipes by name.

torchtitan 0.3.0's ConfigManager imports ``<module>.config_registry`` for a module outside torchtitan
and calls the function named by ``--config``; each returns :func:`~dist_marsm.titan.recipe.recipe_config`
of ``recipes/<name>.toml`` (next to the package, or in ``$DIST_MARSM_RECIPES``). torchtitan's tyro then
applies the command line on top, with the typed MARS-M fields: ``--optimizer.gamma 0``, ``--help``.
"""

from __future__ import annotations

from dist_marsm.titan.recipe import MARSMTrainerConfig, recipe_config

__all__ = ["MARSMTrainerConfig", "debug_cpu", "debug_cpu_adamw", "debug_cpu_distmuon", "llama3_8b", "llama3_70b"]


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
