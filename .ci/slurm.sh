#!/usr/bin/env bash
# Start/stop the real single-node SLURM (../shared/slurm) used by tests/test_launchers.py.
# Tolerant: without shared/slurm it says so and exits 0 (the SLURM tests then skip with a reason).
set -uo pipefail
cd "$(dirname "$0")/.."
SLURM_SCRIPTS=${SLURM_SCRIPTS:-../shared/slurm}
case "${1:-}" in
  start)
    if [ ! -x "$SLURM_SCRIPTS/start_slurm.sh" ] && [ ! -f "$SLURM_SCRIPTS/start_slurm.sh" ]; then
      echo "ci/slurm: $SLURM_SCRIPTS/start_slurm.sh not found; SLURM tests will skip"; exit 0
    fi
    # 4 advertised CPUs so a 2-task job (1 CPU each) and the array tasks can run side by side
    NCPUS=${NCPUS:-4} bash "$SLURM_SCRIPTS/start_slurm.sh" ;;
  stop)
    [ -f "$SLURM_SCRIPTS/stop_slurm.sh" ] && bash "$SLURM_SCRIPTS/stop_slurm.sh" || true ;;
  *) echo "usage: .ci/slurm.sh start|stop" >&2; exit 2 ;;
esac
