"""``python -m torchtitan.train --module dist_marsm.titan --config <name>``: the shipped recipes by name
(``recipes/<name>.toml`` or ``$DIST_MARSM_RECIPES/<name>.toml``); torchtitan's tyro applies the command line.
"""

from __future__ import annotations

import functools

from dist_marsm.titan.recipe import MARSMTrainerConfig, recipe_config

RECIPES = ("debug_cpu", "debug_cpu_adamw", "debug_cpu_distmuon", "moe_debug_cpu", "llama3_8b", "llama3_70b")
__all__ = ["MARSMTrainerConfig", *RECIPES]
globals().update({name: functools.partial(recipe_config, name) for name in RECIPES})
