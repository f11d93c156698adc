#!/usr/bin/env bash
# Single-machine dist_marsm training: torchrun --standalone with N ranks on this machine.
#
#   launch/local.sh [NPROC] RECIPE.toml [--section.key value ...]
#   NPROC=4 launch/local.sh recipes/debug_cpu.toml --training.steps 20
#   DRY_RUN=1 launch/local.sh 2 recipes/debug_cpu.toml        # print the command, run nothing
#
# NPROC (first argument, else $NPROC, else the number of GPUs, else 2 on a CPU-only machine) ranks are started.
# Everything after the recipe goes unchanged to `python -m dist_marsm.train`.  `--recipe PATH` works too.
# The entry point picks NCCL on GPUs and gloo on CPU.  TORCHRUN="python -m torch.distributed.run" if torchrun
# is not on PATH.  RECIPE is a file (relative to the current directory) or the name of a recipe shipped with the
# installed package (debug_cpu; `python -m dist_marsm.shipped` lists them), which works from any directory.
set -euo pipefail
die() { echo "local.sh: error: $*" >&2; exit 2; }

if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; then NPROC="$1"; shift; fi
RECIPE=""
if [ "${1:-}" = "--recipe" ]; then RECIPE="${2:-}"; shift 2 || true
elif [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then RECIPE="$1"; shift
fi
[ -n "$RECIPE" ] || die "usage: launch/local.sh [NPROC] RECIPE.toml [--section.key value ...]"
if [ -z "${NPROC:-}" ]; then
    NGPU="$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)"
    if [ "${NGPU:-0}" -gt 0 ]; then NPROC="$NGPU"; else NPROC=2; fi
fi
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "NPROC must be a positive integer, got '$NPROC'"
# Not a file here: dist_marsm.train resolves a shipped recipe's name on every rank; check it exists first.
if [ "${DRY_RUN:-0}" != 1 ] && [ ! -f "$RECIPE" ] && ! "${PYTHON:-python3}" -m dist_marsm.shipped "$RECIPE" >/dev/null
then die "recipe not found: $RECIPE (cwd $PWD)"; fi

read -r -a TORCHRUN_CMD <<< "${TORCHRUN:-torchrun}"
if [ -n "${TRAIN_SCRIPT:-}" ]; then ENTRY=("$TRAIN_SCRIPT")
else ENTRY=(-m "${TRAIN_MODULE:-dist_marsm.train}"); fi
CMD=("${TORCHRUN_CMD[@]}" --standalone --nnodes=1 --nproc_per_node="$NPROC" --max_restarts=0
     "${ENTRY[@]}" --recipe "$RECIPE" "$@")

if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "CMD: $(printf '%q ' "${CMD[@]}")"
    exit 0
fi
echo "[launch] local: $NPROC ranks on $(hostname): $(printf '%q ' "${CMD[@]}")"
exec "${CMD[@]}"
