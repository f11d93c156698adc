"""``torchrun --nproc_per_node N -m torchtitan.train --module dist_marsm.titan --config <name>``: the shipped recipes
(``recipes/<name>.toml`` of a checkout or an installed wheel, or ``$DIST_MARSM_RECIPES/<name>.toml``);
torchtitan's tyro applies the command line.
"""

import functools
import os
from pathlib import Path

from dist_marsm.shipped import shipped_dir
from dist_marsm.titan.recipe import MARSMTrainerConfig, load_recipe

RECIPES = ("debug_cpu", "debug_cpu_adamw", "debug_cpu_distmuon", "moe_debug_cpu", "llama3_8b", "llama3_70b")


def recipe_config(name: str) -> MARSMTrainerConfig:
    folder = Path(os.environ.get("DIST_MARSM_RECIPES") or shipped_dir("recipes"))
    world = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None
    return load_recipe(str(folder / f"{name}.toml"), world_size=world)


globals().update({name: functools.partial(recipe_config, name) for name in RECIPES})
