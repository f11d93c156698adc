#!/usr/bin/env bash
# Install SLURM (controller, node daemon, client commands) for tests/test_slurm.py.
# Idempotent: does nothing when slurmctld, slurmd, sbatch and scontrol are already on PATH.
# Never fails the caller: without apt or root the SLURM tests skip and print why (tests/slurm_cluster.py).
# Measured on Debian 12: `apt-get install -y slurm-wlm` gives SLURM 22.05 in about a minute.
set -u

have_slurm() {
    for b in slurmctld slurmd sbatch srun scontrol sinfo; do
        command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || return 1
    done
}

if have_slurm; then
    echo "install_slurm: SLURM already installed ($(slurmd -V 2>/dev/null || /usr/sbin/slurmd -V 2>/dev/null || echo '?'))"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_slurm: no apt-get on this machine; SLURM tests will skip"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install_slurm: not root and no passwordless sudo; SLURM tests will skip"
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
if $SUDO apt-get update -qq && $SUDO apt-get install -y -qq slurm-wlm >/dev/null; then
    echo "install_slurm: installed $(/usr/sbin/slurmd -V 2>/dev/null || echo 'SLURM')"
else
    echo "install_slurm: apt-get install slurm-wlm failed; SLURM tests will skip"
fi
exit 0
