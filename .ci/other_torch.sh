#!/usr/bin/env bash
# The second CI pass: dist_marsm on the torch releases beside the pinned 2.14.1 that .ci/run's main pass uses.
#
#   bash .ci/other_torch.sh          # both passes below
#   bash .ci/other_torch.sh 2.15     # torch 2.15.0, the newest release pyproject.toml admits
#   bash .ci/other_torch.sh 2.11     # torch 2.11.0, the GPU machines' image
#   bash .ci/other_torch.sh prepare  # only build the venvs (.ci/run does this while its main pass runs)
#
# torch 2.15.0: the wheel built from this checkout is pip-installed with its [titan,test] extras into a venv
#   holding PyPI's torch 2.15.0; from a directory outside the repository a shipped recipe trains 3 steps by
#   name; then the core and distributed tests and benchmarks/gpu_check.py --cpu-smoke run on that torch.
# torch 2.11.0: benchmarks/gpu_check.py --cpu-smoke, the first thing a GPU run checks (torchtitan 0.3.0 needs
#   torch >= 2.14, so on 2.11 the check's torchtitan parts report "not importable" and the core runs alone).
#
# PyPI's Linux torch is the CUDA build (the wheel plus nvidia-* libraries, a few GB per venv); it runs on CPU.
# This machine's pip config caps torch at 2.14.1, so the venvs install with PIP_CONFIG_FILE=/dev/null.
# Venvs are kept under $DIST_MARSM_CI_CACHE (default /var/cache/dist_marsm, else ~/.cache/dist_marsm_ci), one per
# requirement list, so a rerun only installs the freshly built wheel; a fresh machine builds them (network to PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
CACHE="${DIST_MARSM_CI_CACHE:-/var/cache/dist_marsm}"
PYTHON="${PYTHON:-python3}"
WHICH="${1:-all}"
case "$WHICH" in all|2.15|2.11|prepare) ;; *) echo "usage: $0 [all|2.15|2.11|prepare]" >&2; exit 2;; esac
if ! mkdir -p "$CACHE" 2>/dev/null || [ ! -w "$CACHE" ]; then   # not root: the user's own cache
    CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/dist_marsm_ci"; mkdir -p "$CACHE"
fi

log() { echo "[other_torch $(date -u +%T)] $*"; }

# venv DIR REQUIREMENT...: a venv at DIR holding exactly these requirements; reused when its stamp matches.
venv() {
    local dir="$1"; shift
    local want; want="$(printf '%s\n' "$@")"
    if [ -x "$dir/bin/python" ] && [ "$(cat "$dir/.requirements" 2>/dev/null)" = "$want" ]; then
        log "reusing $dir"
        return
    fi
    rm -rf "$dir"
    local t0=$SECONDS
    "$PYTHON" -m venv "$dir"
    PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= "$dir/bin/pip" install -q --disable-pip-version-check "$@" \
        || { log "could not install $* from PyPI into $dir (is PyPI reachable?)"; return 1; }
    printf '%s\n' "$want" > "$dir/.requirements"
    log "built $dir in $((SECONDS - t0)) s, $(du -sh "$dir" | cut -f1) on disk"
}

smoke() {  # tests/test_gpu_check.py (gpu_check.py --cpu-smoke, its bounds re-checked) on the venv's torch
    local py="$1" tag="$2" base="$CACHE/gpu_check_smoke_$2"
    log "torch $tag: tests/test_gpu_check.py (benchmarks/gpu_check.py --cpu-smoke)"
    rm -rf "$base"
    "$py" -m pytest -q -ra -p no:cacheprovider --basetemp "$base" tests/test_gpu_check.py
    sed -n '1,/^## /p' "$base"/gpu_check0/gpu_check.md | grep -v '^## '
}

# Everything the wheel pulls in with its [titan,test] extras, installed once; the wheel goes in every run.
VENV_215=("$CACHE/venv-torch2.15.0" "torch==2.15.0" "torchtitan==0.3.0" triton tokenizers matplotlib numpy pytest
          pytest-timeout)
VENV_211=("$CACHE/venv-torch2.11.0" "torch==2.11.0" numpy pytest pytest-timeout)

pass_215() {
    local v="${VENV_215[0]}"
    venv "${VENV_215[@]}"
    log "torch 2.15.0: $("$v/bin/python" -c 'import torch; print(torch.__version__)')"
    local wheels; wheels="$(mktemp -d)"
    "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$wheels" "$REPO"
    local whl; whl="$(ls "$wheels"/dist_marsm-*.whl)"
    # --force-reinstall --no-deps: the same version number must still replace the cached venv's older build;
    # the resolver check below proves the wheel's own requirements hold with torch 2.15.0.
    "$v/bin/pip" install -q --force-reinstall --no-deps "$whl"
    PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= "$v/bin/pip" install -q "${whl}[titan,test]"
    "$v/bin/pip" check
    local away; away="$(mktemp -d)"
    log "torch 2.15.0: wheel $(basename "$whl") installed; 3 steps of debug_cpu by name in $away"
    (cd "$away" && "$v/bin/python" -m dist_marsm.train --recipe debug_cpu --training.steps 3 \
        --lr_scheduler.warmup_steps 1 --checkpoint.enable false > train.log 2>&1) \
        || { tail -40 "$away/train.log"; log "torch 2.15.0: recipe run FAILED"; return 1; }
    grep -E "step: +3 " "$away/train.log" | tail -1 || { tail -40 "$away/train.log"; return 1; }
    (cd "$away" && sbatch_path="$("$v/bin/python" -m dist_marsm.shipped slurm.sbatch)" \
        && DRY_RUN=1 bash "$sbatch_path" debug_cpu | tail -1)
    rm -rf "$away" "$wheels"
    log "torch 2.15.0: core and distributed tests"
    # The repo's tests against the repo's code (pytest's pythonpath), on the venv's torch and torchtitan.
    "$v/bin/python" -m pytest -q -ra -p no:cacheprovider tests/test_optimizer.py tests/test_newton_schulz.py \
        tests/test_units.py tests/test_normuon.py tests/test_distributed.py
    smoke "$v/bin/python" 2.15.0
}

pass_211() {
    local v="${VENV_211[0]}"
    venv "${VENV_211[@]}"
    log "torch 2.11.0: $("$v/bin/python" -c 'import torch; print(torch.__version__)')"
    smoke "$v/bin/python" 2.11.0
}

t0=$SECONDS
if [ "$WHICH" = prepare ]; then venv "${VENV_215[@]}"; venv "${VENV_211[@]}"; fi
if [ "$WHICH" = all ] || [ "$WHICH" = 2.15 ]; then pass_215; fi
if [ "$WHICH" = all ] || [ "$WHICH" = 2.11 ]; then pass_211; fi
log "done in $((SECONDS - t0)) s"
