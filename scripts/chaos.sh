#!/usr/bin/env bash
# Chaos runs against real cell0 processes (cell0-chaos, crate chaos/): each
# scenario starts a 3-node cluster, runs the register and set workloads while
# faults are injected, and checks the history (docs/chaos.md).
#
#   scripts/chaos.sh              the CI subset: kill, pause, partition-leader and
#                                 broken-reads (which must be caught), 15 s each
#   scripts/chaos.sh soak         every scenario for 60 s, then mixed for 10 min
#   scripts/chaos.sh SCENARIO...  the named scenarios, 60 s each
#
# Partitions need root (network namespaces); without root those scenarios are
# left out with a line saying so. Environment: SEED (default: one per run, printed),
# CARGO_TARGET_DIR [/var/tmp/cell0-target], OUT (where runs go) [a temporary dir].
# Exits non-zero when a run's verdicts are not what its scenario expects.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/cell0-target}"
echo "chaos: building cell0 and cell0-chaos"
cargo build --locked --workspace --bins --quiet
bin="$CARGO_TARGET_DIR/debug"
out="${OUT:-$(mktemp -d -t cell0-chaos-XXXXXX)}"

root=0
if [ "$(id -u)" -eq 0 ]; then root=1; fi

run() { # scenario duration
  local scenario="$1" duration="$2"
  if [ "$root" -eq 0 ] && "$bin/cell0-chaos" list | grep -E "^$scenario " | grep -q "needs root"; then
    echo "chaos: skipping $scenario: it needs root"
    return 0
  fi
  local seed_args=()
  if [ -n "${SEED:-}" ]; then seed_args=(--seed "$SEED"); fi
  echo "== chaos $scenario ($duration)"
  "$bin/cell0-chaos" run --scenario "$scenario" --duration "$duration" \
    --cell0-bin "$bin/cell0" --out "$out/$scenario" "${seed_args[@]}" 2> "$out/$scenario.log"
}

failed=0
case "${1:-ci}" in
  ci)
    for s in kill pause partition-leader broken-reads; do run "$s" 15s || failed=1; done
    ;;
  soak)
    for s in $("$bin/cell0-chaos" list | awk '{print $1}'); do run "$s" 60s || failed=1; done
    run mixed 10m || failed=1
    ;;
  *)
    for s in "$@"; do run "$s" 60s || failed=1; done
    ;;
esac
echo "chaos: runs in $out"
exit "$failed"
