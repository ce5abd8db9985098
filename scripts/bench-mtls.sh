#!/usr/bin/env bash
# What mutual TLS between nodes (and ACL tokens) cost on the write path:
# the local 3-node cluster of scripts/bootstrap-cluster.sh with TLS (the
# default), with --insecure, and with TLS and --acl (every call carries a
# token, the node checks it and writes the audit line), `cell0 bench kv`
# against the leader at 1 and 64 clients, rounds interleaved (TLS,
# plaintext, TLS, ...), each on a fresh cluster.
#
#   ROUNDS=2 DURATION=8 MODES="tls insecure" scripts/bench-mtls.sh
#   MODES="tls acl" scripts/bench-mtls.sh          # what ACLs cost
#
# Prints one JSON line per mode, round and client count. Uses
# $CARGO_TARGET_DIR/release/cell0 (bootstrap-cluster.sh builds it).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${CARGO_TARGET_DIR:-$root/target}/release/cell0"
rounds="${ROUNDS:-2}"
duration="${DURATION:-8}"
modes="${MODES:-tls insecure}"
work="$(mktemp -d)"
trap 'CELL0_CLUSTER_DIR="$work/cluster" "$root/scripts/bootstrap-cluster.sh" stop >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

one_round() { # one_round MODE ROUND
  local mode="$1" round="$2" flags=()
  case "$mode" in
    insecure) flags=(--insecure) ;;
    acl) flags=(--acl) ;;
    tls) ;;
    *) echo "unknown mode $mode (tls, insecure, acl)" >&2; exit 2 ;;
  esac
  export CELL0_CLUSTER_DIR="$work/cluster"
  rm -rf "$CELL0_CLUSTER_DIR"
  unset CELL0_TOKEN
  "$root/scripts/bootstrap-cluster.sh" start --no-model "${flags[@]}" >"$work/start-$mode-$round.log" 2>&1
  if [ "$mode" = acl ]; then
    CELL0_TOKEN="$(cat "$CELL0_CLUSTER_DIR/token")"
    export CELL0_TOKEN
  fi
  local leader
  leader="$("$bin" members --output json --endpoint 127.0.0.1:7100 |
    python3 -c 'import json,sys; print([m["public_addr"] for m in json.load(sys.stdin) if m["leader"]][0])')"
  for clients in 1 64; do
    echo "{\"mode\":\"$mode\",\"round\":$round,\"result\":$("$bin" bench kv --clients "$clients" --duration "$duration" --endpoint "$leader" --output json 2>/dev/null | tr -d '\n ')}"
  done
  "$root/scripts/bootstrap-cluster.sh" stop >/dev/null
}

for round in $(seq 1 "$rounds"); do
  for mode in $modes; do
    one_round "$mode" "$round"
  done
done
