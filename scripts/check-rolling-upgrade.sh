#!/usr/bin/env bash
# Checks a rolling upgrade between two builds of cell0 on this machine: a
# 3-node cluster on 127.0.0.1 starts on OLD and is upgraded one node at a
# time to NEW, with a stage where a NEW node leads OLD followers. At each
# stage a put goes through every node, then a put asking for the previous
# pair (`kv put --prev-kv`), which must report the first value, and every
# node must serve the second one. Builds that change a log or message
# format (docs/operations.md, "Data formats") are checked with it.
#
#   scripts/check-rolling-upgrade.sh OLD_BINARY NEW_BINARY
#
# Stages: all OLD; one follower NEW (its writes go through an OLD leader);
# a NEW leader with OLD followers (the leader stops and restarts on OLD
# until the NEW node is elected, at most 6 times); all NEW. Exits 1 on the
# first stage that fails, printing what failed; stops every process it
# started and removes its data. Environment: BASE_PORT [27000] (node i uses
# BASE_PORT+10i .. +3), BENCH_DIR [/var/tmp] for the data.
set -euo pipefail

if [ $# -ne 2 ] || [ ! -x "$1" ] || [ ! -x "$2" ]; then
  echo "usage: $0 OLD_BINARY NEW_BINARY (both executable cell0 builds)" >&2
  exit 2
fi
OLD="$1"
NEW="$2"
CLI="$NEW"
BP="${BASE_PORT:-27000}"
W="$(mktemp -d "${BENCH_DIR:-/var/tmp}/cell0-upgrade.XXXXXX")"
declare -A PID BUILD

port() { echo $((BP + $1 * 10 + $2)); }
ep() { echo "127.0.0.1:$(port "$1" 0)"; }

# start I BINARY: starts node I on BINARY and waits until it is ready.
start() {
  local i=$1 args
  BUILD[$i]=$2
  args=(run --insecure --data-dir "$W/n$i" --name "node$i" --listen-public "$(ep "$i")"
    --listen-internal "127.0.0.1:$(port "$i" 1)" --listen-http "127.0.0.1:$(port "$i" 3)")
  if [ "$i" -eq 1 ]; then args+=(--bootstrap); else args+=(--join "$(ep 1)"); fi
  env -u CELL0_CONFIG "$2" "${args[@]}" >>"$W/n$i.log" 2>&1 </dev/null &
  PID[$i]=$!
  local deadline=$((SECONDS + 60))
  until curl -sf "http://127.0.0.1:$(port "$i" 3)/ready" >/dev/null; do
    if [ $SECONDS -ge $deadline ]; then
      echo "node $i was not ready within 60 s; its log:" >&2
      tail -20 "$W/n$i.log" >&2
      exit 1
    fi
    sleep 0.2
  done
}

# stop I: SIGTERM, then waits for the process to exit.
stop() {
  kill -TERM "${PID[$1]}" 2>/dev/null || true
  while kill -0 "${PID[$1]}" 2>/dev/null; do sleep 0.1; done
}

cleanup() {
  for i in "${!PID[@]}"; do stop "$i"; done
  rm -rf "$W"
}
trap cleanup EXIT

# leader_seen_by I: the leading node's number as node I sees it (empty: none yet).
leader_seen_by() {
  "$CLI" members --output json --endpoint "$(ep "$1")" 2>/dev/null |
    python3 -c 'import json,sys; l=[m["name"][4:] for m in json.load(sys.stdin) if m["leader"]]; print(l[0] if l else "")' 2>/dev/null || true
}

# leader I: waits up to 30 s for node I to know a leader and prints its number.
leader() {
  local deadline=$((SECONDS + 30)) l
  while :; do
    l="$(leader_seen_by "$1")"
    if [ -n "$l" ]; then echo "$l"; return; fi
    if [ $SECONDS -ge $deadline ]; then echo "node $1 knows no leader after 30 s" >&2; exit 1; fi
    sleep 0.2
  done
}

fail() {
  echo "FAIL ($STAGE): $*" >&2
  exit 1
}

# check STAGE: through every node, a put, then a put asking for the previous
# pair; every node must then serve the second value.
check() {
  STAGE=$1
  local i j k out prev deadline
  for i in 1 2 3; do
    k="upgrade/$STAGE/via-node$i"
    "$CLI" kv put "$k" first --endpoint "$(ep "$i")" >/dev/null || fail "put through node $i"
    out="$("$CLI" kv put "$k" second --prev-kv --output json --endpoint "$(ep "$i")")" || fail "put --prev-kv through node $i"
    prev="$(echo "$out" | python3 -c 'import json,sys; p=json.load(sys.stdin)["prev_kv"]; print(p["value"] if p else "")')"
    [ "$prev" = first ] || fail "put --prev-kv through node $i reported the previous value '$prev', not 'first'"
    for j in 1 2 3; do
      deadline=$((SECONDS + 20))
      until [ "$("$CLI" kv get "$k" --serializable --endpoint "$(ep "$j")" 2>/dev/null)" = second ]; do
        [ $SECONDS -lt $deadline ] || fail "node $j did not serve $k = second within 20 s"
        sleep 0.1
      done
    done
  done
  local builds=""
  for i in 1 2 3; do builds+=" node$i=$([ "${BUILD[$i]}" = "$OLD" ] && echo old || echo new)"; done
  echo "ok: $STAGE (leader node$(leader 1);$builds)"
}

start 1 "$OLD"
start 2 "$OLD"
start 3 "$OLD"
check all-old

L="$(leader 1)"
F=$((L % 3 + 1))
stop "$F"
start "$F" "$NEW"
check one-follower-new

# The NEW node leads only once an election picks it: stop the leader,
# wait out an election timeout, restart it on OLD.
for _ in 1 2 3 4 5 6; do
  L="$(leader "$F")"
  [ "$L" = "$F" ] && break
  stop "$L"
  deadline=$((SECONDS + 30))
  until [ -n "$(leader_seen_by "$F")" ] && [ "$(leader_seen_by "$F")" != "$L" ]; do
    [ $SECONDS -lt $deadline ] || break
    sleep 0.2
  done
  start "$L" "$OLD"
done
[ "$(leader "$F")" = "$F" ] || { STAGE=new-leader; fail "node $F (new) was not elected in 6 tries"; }
check new-leader-old-followers

for i in 1 2 3; do
  if [ "${BUILD[$i]}" = "$OLD" ]; then
    stop "$i"
    start "$i" "$NEW"
  fi
done
check all-new

if grep -l "NEWER_MESSAGE_FORMAT\|panicked" "$W"/n*.log >/dev/null 2>&1; then
  STAGE=logs
  fail "a node logged a refused message format or a panic: $(grep -h "NEWER_MESSAGE_FORMAT\|panicked" "$W"/n*.log | head -3)"
fi
echo "PASS: a rolling upgrade from $OLD to $NEW kept every write readable on every node"
