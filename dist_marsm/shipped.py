"""The recipes and launchers that ship with dist_marsm, in a checkout or in an installed wheel.

A checkout keeps them at its top level (``recipes/``, ``launch/``); the wheel carries the same files inside
the package (``dist_marsm/recipes/``, ``dist_marsm/launch/``), so a pip-installed dist_marsm needs no
repository::

    python -m dist_marsm.train --recipe debug_cpu        # a shipped recipe by name, from any directory
    python -m dist_marsm.shipped                         # every shipped recipe and launcher, with its path
    python -m dist_marsm.shipped slurm.sbatch            # one file's path:
    sbatch --nodes 4 --gpus-per-node 8 "$(python -m dist_marsm.shipped slurm.sbatch)" llama3_8b

Imports nothing beyond the standard library.
"""

from __future__ import annotations

import sys
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
KINDS = ("recipes", "launch")


def shipped_dir(kind: str) -> Path:
    """The folder holding the shipped ``recipes`` or ``launch`` files: inside the package (a wheel) or beside
    it (a checkout, an editable install)."""
    if kind not in KINDS:
        raise ValueError(f"shipped_dir: kind must be one of {KINDS}, got {kind!r}")
    for folder in (_PACKAGE / kind, _PACKAGE.parent / kind):
        if folder.is_dir():
            return folder
    raise FileNotFoundError(
        f"dist_marsm's {kind}/ is neither in {_PACKAGE} (an installed wheel) nor in "
        f"{_PACKAGE.parent} (a checkout); reinstall dist_marsm"
    )


def recipe_names() -> list[str]:
    return sorted(p.stem for p in shipped_dir("recipes").glob("*.toml"))


def resolve_recipe(recipe: str) -> str:
    """``--recipe`` as given when that file exists; else a shipped recipe: ``debug_cpu``, ``debug_cpu.toml``
    or the README's ``recipes/debug_cpu.toml`` run outside a checkout. Raises LookupError naming the choices."""
    given = Path(recipe)
    if given.exists():
        return recipe
    # Only a bare name or recipes/NAME.toml can mean a shipped recipe; any other path is the user's own file.
    if not given.is_absolute() and (len(given.parts) == 1 or given.parts[:-1] == ("recipes",)):
        candidate = shipped_dir("recipes") / (given.name if given.suffix == ".toml" else given.name + ".toml")
        if candidate.is_file():
            return str(candidate)
    raise LookupError(
        f"recipe {recipe!r}: no such file in {Path.cwd()} and no shipped recipe of that name "
        f"(shipped: {', '.join(recipe_names())}; `python -m dist_marsm.shipped` prints their paths)"
    )


def shipped_path(name: str) -> Path:
    """A launcher by file name (``slurm.sbatch``, ``local.sh``) or a recipe as :func:`resolve_recipe` takes it."""
    launcher = shipped_dir("launch") / name
    if "/" not in name and launcher.is_file():
        return launcher
    try:
        return Path(resolve_recipe(name)).resolve()
    except LookupError:
        launchers = ", ".join(sorted(p.name for p in shipped_dir("launch").iterdir() if p.is_file()))
        raise LookupError(
            f"{name!r} is neither a shipped launcher ({launchers}) nor a recipe (shipped: {', '.join(recipe_names())})"
        ) from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if len(argv) > 1:
        print("usage: python -m dist_marsm.shipped [NAME]   (a launcher file name or a recipe name)", file=sys.stderr)
        return 2
    if argv:
        try:
            print(shipped_path(argv[0]))
        except LookupError as e:
            print(f"dist_marsm.shipped: error: {e}", file=sys.stderr)
            return 2
        return 0
    for kind in KINDS:
        folder = shipped_dir(kind)
        print(f"{kind}: {folder}")
        for p in sorted(folder.iterdir()):
            if p.is_file() and not p.name.startswith((".", "__")):
                print(f"  {p.stem if kind == 'recipes' else p.name:24s} {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
