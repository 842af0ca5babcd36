#!/usr/bin/env bash
# Start/stop the real two-node SLURM (n1, n2) on localhost used by tests/test_launchers.py (SLURM tests skip, with
# the reason, when it is not running). Wraps ../shared/slurm/{start,stop}_slurm.sh (relative to the repo root).
#   .ci/slurm.sh start   start it (tolerant: a missing shared/slurm or a failed start only prints why)
#   .ci/slurm.sh stop    stop it, if this script started it
# Knobs passed through: NODES (default 2: nodes n1 and n2 on this machine, for the multi-node build and launcher
# tests), NCPUS (CPUs each node advertises, default 4: a 2-task job and a 2-task array run side by side),
# WITH_DBD (default 1: accounting, so `sacct` answers for status and requeue history), AUTH, CRED_EXPIRE,
# SLURM_DIR. SLURM_SCRIPTS overrides the folder of the scripts.
set -uo pipefail
cd "$(dirname "$0")/.."
SLURM_SCRIPTS=${SLURM_SCRIPTS:-../shared/slurm}
MARKER=${SLURM_DIR:-/tmp/pixeldit-slurm}.started-by-ci

case "${1:-}" in
  start)
    if [ ! -f "$SLURM_SCRIPTS/start_slurm.sh" ]; then
      echo "ci/slurm: $SLURM_SCRIPTS/start_slurm.sh not found; the SLURM tests will skip"; exit 0
    fi
    if command -v scontrol >/dev/null && scontrol ping 2>/dev/null | grep -q UP; then
      echo "ci/slurm: a SLURM controller already answers; using it (and leaving it running)"; exit 0
    fi
    if NODES=${NODES:-2} NCPUS=${NCPUS:-4} WITH_DBD=${WITH_DBD:-1} bash "$SLURM_SCRIPTS/start_slurm.sh"; then
      touch "$MARKER"
    else
      echo "ci/slurm: start_slurm.sh failed (see above); the SLURM tests will skip"
    fi
    exit 0 ;;
  stop)
    if [ -f "$MARKER" ]; then
      bash "$SLURM_SCRIPTS/stop_slurm.sh" || echo "ci/slurm: stop_slurm.sh reported an error"
      rm -f "$MARKER"
    else
      echo "ci/slurm: this script did not start SLURM; leaving it as it is"
    fi
    exit 0 ;;
  *) echo "usage: .ci/slurm.sh start|stop" >&2; exit 2 ;;
esac
