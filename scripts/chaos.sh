#!/usr/bin/env bash
# Chaos runs against real cell0 processes (cell0-chaos, crate chaos/): each
# scenario starts a 3-node cluster, runs the register and set workloads while
# faults are injected, and checks the history (docs/chaos.md).
#
#   scripts/chaos.sh              the CI subset: kill, pause, partition-leader and
#                                 broken-reads (which must be caught), 15 s each
#   scripts/chaos.sh soak         every scenario for SOAK_SECONDS [300], SOAK_ROUNDS
#                                 [1] times, each run with a seed of its own
#   scripts/chaos.sh SCENARIO...  the named scenarios, 60 s each
#
# Partitions in network namespaces and full disks (tmpfs) need root; without
# root those scenarios are left out with a line saying so. Environment: SEED
# (default: one per run, printed), CARGO_TARGET_DIR [/var/tmp/cell0-target],
# BIN_DIR (take cell0 and cell0-chaos from there instead of building), AGENTS
# (run the agent workload with this many agents too) [0], OUT (where runs go)
# [a temporary dir].
# Exits non-zero when a run's verdicts are not what its scenario expects.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/cell0-target}"
if [ -n "${BIN_DIR:-}" ]; then
  bin="$BIN_DIR"
else
  echo "chaos: building cell0 and cell0-chaos"
  cargo build --locked --workspace --bins --quiet
  bin="$CARGO_TARGET_DIR/debug"
fi
out="${OUT:-$(mktemp -d -t cell0-chaos-XXXXXX)}"
mkdir -p "$out"

root=0
if [ "$(id -u)" -eq 0 ]; then root=1; fi

run() { # scenario duration [run name]
  local scenario="$1" duration="$2" name="${3:-$1}"
  if [ "$root" -eq 0 ] && "$bin/cell0-chaos" list | grep -E "^$scenario " | grep -q "needs root"; then
    echo "chaos: skipping $scenario: it needs root"
    return 0
  fi
  local extra_args=()
  if [ -n "${SEED:-}" ]; then extra_args=(--seed "$SEED"); fi
  if [ "${AGENTS:-0}" != 0 ]; then extra_args+=(--agents "$AGENTS"); fi
  echo "== chaos $name ($duration)"
  "$bin/cell0-chaos" run --scenario "$scenario" --duration "$duration" \
    --cell0-bin "$bin/cell0" --out "$out/$name" "${extra_args[@]}" 2> "$out/$name.log" || return 1
  # A run that passed keeps its history, timeline and logs, not the nodes' data.
  rm -rf "$out/$name"/nodes/node[0-9]
}

failed=0
case "${1:-ci}" in
  ci)
    for s in kill pause partition-leader broken-reads; do run "$s" 15s || failed=1; done
    ;;
  soak)
    for round in $(seq 1 "${SOAK_ROUNDS:-1}"); do
      for s in $("$bin/cell0-chaos" list | awk '{print $1}'); do
        run "$s" "${SOAK_SECONDS:-300}s" "$round-$s" || failed=1
      done
    done
    ;;
  *)
    for s in "$@"; do run "$s" 60s || failed=1; done
    ;;
esac
echo "chaos: runs in $out"
exit "$failed"
