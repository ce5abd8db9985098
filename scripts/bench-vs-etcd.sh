#!/usr/bin/env bash
# Side-by-side KV benchmark: Cell0 against etcd 3.4, both as 3-node clusters
# on 127.0.0.1 on this machine, driven by the same load generator
# (cell0-load, crate chaos/), runs interleaved, one markdown table at the end.
#
#   scripts/bench-vs-etcd.sh                  the full matrix (3 rounds, 8 s per run)
#   QUICK=1 scripts/bench-vs-etcd.sh          a smoke run: 1 round, 2 s, few clients and keys
#
# What it does:
#   1. fetches etcd 3.4 with `apt-get download etcd-server etcd-client` into a cache
#      directory and unpacks it there with `dpkg -x` (nothing is installed system-wide
#      and no service starts; idempotent);
#   2. builds cell0 and cell0-load in release (`cargo build --release --locked -p cell0`,
#      exactly as scripts/bootstrap-cluster.sh does, then `-p cell0-chaos --bin cell0-load`);
#   3. starts a 3-node etcd cluster and a 3-node Cell0 cluster on loopback, data under a
#      temporary directory in $BENCH_DIR;
#   4. writes the key space once into each cluster (cell0-load --prefill);
#   5. for each round, for each row of the matrix, runs etcd and then Cell0:
#      put with 1, 64 and 256 clients, linearizable get with 64 clients. Every client has
#      its own connection, client i on endpoint i mod 3 (followers first, so a single client
#      goes through a follower on both systems); the CPU time of the three server processes
#      is read from /proc around each run;
#   6. prints one markdown table (medians over the rounds, Cell0/etcd ratios) and the load
#      average at the start and the end, and stops every process it started (also on
#      failure or Ctrl-C).
#
# Environment (defaults in brackets; QUICK=1 changes the defaults marked *):
#   ROUNDS [3, *1]  DURATION seconds per run [8, *2]  PUT_CLIENTS ["1 64 256", *"1 4"]
#   GET_CLIENTS ["64", *"4"]  KEYS [100000, *1000]  VALUE_SIZE [256]
#   CARGO_TARGET_DIR [/var/tmp/cell0-release]  CELL0_BIN, LOAD_BIN: use these binaries, no build
#   ETCD_CACHE [$CARGO_TARGET_DIR/etcd-3.4]  ETCD_BIN, ETCDCTL_BIN: use these, no download
#   BENCH_DIR: where the clusters' temporary directory goes; a real disk [/var/tmp]
#   BASE_PORT [24000]: etcd member i on BASE_PORT+10i (client) and +1 (peer); Cell0 node i
#     on BASE_PORT+100+10i (public gRPC), +1 (internal), +3 (HTTP)
#   READY_TIMEOUT seconds [60]  KEEP_DATA=1: keep the data directories
#   SHARE_CORES [0]: 0: both systems run their defaults (one thread of code per core in each
#     process); 1: the three server processes of each system share this machine's cores, each
#     running cores/3 (at least 1) threads of code: Cell0 `--worker-threads`, etcd
#     `GOMAXPROCS`, as scripts/bootstrap-cluster.sh sizes its nodes
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
die() { echo "bench-vs-etcd: $*" >&2; exit 1; }
# shellcheck source=scripts/lib/bench-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/bench-common.sh"

quick="${QUICK:-0}"
if [ "$quick" = 1 ]; then
  rounds="${ROUNDS:-1}" duration="${DURATION:-2}" put_clients="${PUT_CLIENTS:-1 4}"
  get_clients="${GET_CLIENTS:-4}" keys="${KEYS:-1000}"
else
  rounds="${ROUNDS:-3}" duration="${DURATION:-8}" put_clients="${PUT_CLIENTS:-1 64 256}"
  get_clients="${GET_CLIENTS:-64}" keys="${KEYS:-100000}"
fi
value_size="${VALUE_SIZE:-256}"
target_dir="${CARGO_TARGET_DIR:-/var/tmp/cell0-release}"
etcd_cache="${ETCD_CACHE:-$target_dir/etcd-3.4}"
bench_dir="${BENCH_DIR:-/var/tmp}"
base_port="${BASE_PORT:-24000}"
ready_timeout="${READY_TIMEOUT:-60}"
share_cores="${SHARE_CORES:-0}"
case "$share_cores" in
  0) threads="" ;;
  1) threads=$(( $(nproc) / 3 )); [ "$threads" -ge 1 ] || threads=1 ;;
  *) die "SHARE_CORES must be 0 or 1, not '$share_cores'" ;;
esac

for v in rounds duration keys ready_timeout base_port; do
  is_number "${!v}" || die "${v^^} must be a positive integer, not '${!v}'"
done
[[ "$value_size" =~ ^[0-9]+$ ]] || die "VALUE_SIZE must be a number, not '$value_size'"
for c in $put_clients $get_clients; do is_number "$c" || die "PUT_CLIENTS/GET_CLIENTS must list positive integers, not '$c'"; done
[ "$base_port" -le 65000 ] || die "BASE_PORT must leave room for 200 ports below 65536"

cell0_port() { echo $((base_port + 100 + $1 * 10 + $2)); } # cell0_port NODE OFFSET

# --- processes this script started, stopped on exit ---------------------------
started=()
work=""


cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_pids "${started[@]}"
  if [ -n "$work" ] && [ -d "$work" ]; then
    if [ "${KEEP_DATA:-0}" != 1 ]; then
      rm -rf "$work"/etcd[0-9] "$work"/cell0-[0-9]
    fi
    echo "logs and results: $work" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM


# --- 1. etcd 3.4 ----------------------------------------------------------------

# --- 2. binaries ----------------------------------------------------------------

# --- 3. clusters ----------------------------------------------------------------
etcd_pids=() cell0_pids=()

wait_ready() { # wait_ready NAME PID LOG URL
  local deadline=$((SECONDS + ready_timeout))
  until curl -sf "$4" >/dev/null 2>&1; do
    if ! running "$2"; then
      tail -n 20 "$3" >&2 || true
      die "$1 exited (log: $3)"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      tail -n 20 "$3" >&2 || true
      die "$1 is not ready after ${ready_timeout}s (log: $3)"
    fi
    sleep 0.2
  done
}

start_etcd() {
  local i initial="" env_unset=()
  for i in 1 2 3; do
    initial+="${initial:+,}e$i=http://127.0.0.1:$(etcd_port "$i" 1)"
  done
  # etcd reads ETCD_* variables as flags; a stray one must not change the setup.
  local v
  for v in $(compgen -e | grep '^ETCD_' || true); do env_unset+=(-u "$v"); done
  local procs=()
  [ -z "$threads" ] || procs=("GOMAXPROCS=$threads")
  for i in 1 2 3; do
    env "${env_unset[@]}" "${procs[@]}" "$etcd_bin" --name "e$i" --data-dir "$work/etcd$i" \
      --listen-client-urls "http://127.0.0.1:$(etcd_port "$i" 0)" \
      --advertise-client-urls "http://127.0.0.1:$(etcd_port "$i" 0)" \
      --listen-peer-urls "http://127.0.0.1:$(etcd_port "$i" 1)" \
      --initial-advertise-peer-urls "http://127.0.0.1:$(etcd_port "$i" 1)" \
      --initial-cluster "$initial" --initial-cluster-token bench-vs-etcd --initial-cluster-state new \
      --logger zap --log-outputs stderr \
      >"$work/etcd$i.log" 2>&1 </dev/null &
    started+=("$!")
    etcd_pids+=("$!")
  done
  for i in 1 2 3; do
    wait_ready "etcd member e$i" "${etcd_pids[$((i - 1))]}" "$work/etcd$i.log" "http://127.0.0.1:$(etcd_port "$i" 0)/health"
  done
  echo "etcd cluster ready: pids ${etcd_pids[*]}"
}

start_cell0() {
  local i
  for i in 1 2 3; do
    # Plaintext between nodes, as etcd runs here.
    local args=(run --insecure --data-dir "$work/cell0-$i" --name "node$i"
      --listen-public "127.0.0.1:$(cell0_port "$i" 0)"
      --listen-internal "127.0.0.1:$(cell0_port "$i" 1)"
      --listen-http "127.0.0.1:$(cell0_port "$i" 3)")
    [ -z "$threads" ] || args+=(--worker-threads "$threads")
    if [ "$i" -eq 1 ]; then
      args+=(--bootstrap)
    else
      args+=(--join "127.0.0.1:$(cell0_port 1 0)")
    fi
    env -u CELL0_CONFIG "$cell0_bin" "${args[@]}" >"$work/cell0-$i.log" 2>&1 </dev/null &
    started+=("$!")
    cell0_pids+=("$!")
  done
  # /ready: a joining node is ready once its join completed (it is in its final role).
  for i in 1 2 3; do
    wait_ready "cell0 node$i" "${cell0_pids[$((i - 1))]}" "$work/cell0-$i.log" "http://127.0.0.1:$(cell0_port "$i" 3)/ready"
  done
  echo "Cell0 cluster ready: pids ${cell0_pids[*]}"
}

# Prints the three client endpoints, followers first and the leader last, so
# that client 0 (the only one in a 1-client run) goes through a follower.
etcd_endpoints() {
  local all="127.0.0.1:$(etcd_port 1 0),127.0.0.1:$(etcd_port 2 0),127.0.0.1:$(etcd_port 3 0)"
  "$etcdctl_bin" --endpoints="$all" endpoint status -w json 2>/dev/null | python3 -c '
import json, sys
st = json.load(sys.stdin)
leader = [s["Endpoint"] for s in st if s["Status"]["header"]["member_id"] == s["Status"]["leader"]]
eps = [s["Endpoint"] for s in st]
if len(leader) != 1 or len(eps) != 3:
    sys.exit(1)
print(",".join([e for e in eps if e != leader[0]] + leader))
' || { echo "bench-vs-etcd: cannot tell etcd's leader; endpoints in member order" >&2; echo "$all"; }
}

cell0_endpoints() {
  local all="127.0.0.1:$(cell0_port 1 0),127.0.0.1:$(cell0_port 2 0),127.0.0.1:$(cell0_port 3 0)"
  "$cell0_bin" members --output json --endpoint "127.0.0.1:$(cell0_port 1 0)" 2>/dev/null | python3 -c '
import json, sys
all_eps = sys.argv[1].split(",")
ms = json.load(sys.stdin)
voters = [m for m in ms if m["role"] == "voter"]
leader = [m["public_addr"] for m in ms if m["leader"]]
if len(voters) != 3 or len(leader) != 1 or leader[0] not in all_eps:
    sys.exit(1)
print(",".join([e for e in all_eps if e != leader[0]] + leader))
' "$all" || { echo "bench-vs-etcd: cannot tell Cell0's leader (or not 3 voters); endpoints in node order" >&2; echo "$all"; }
}

check_alive() {
  local pid
  for pid in "${etcd_pids[@]}" "${cell0_pids[@]}"; do
    running "$pid" || die "server process $pid exited (logs in $work)"
  done
}

# --- main -----------------------------------------------------------------------
load_start="$(loadavg)"
fetch_etcd
build
mkdir -p "$bench_dir"
for i in 1 2 3; do
  for p in "$(etcd_port "$i" 0)" "$(etcd_port "$i" 1)" "$(cell0_port "$i" 0)" "$(cell0_port "$i" 1)" "$(cell0_port "$i" 3)"; do
    port_in_use "$p" && die "port $p on 127.0.0.1 is in use (set BASE_PORT)"
  done
done
work="$(mktemp -d "$bench_dir/bench-vs-etcd.XXXXXX")"
results="$work/results.jsonl"
: >"$results"
echo "work directory: $work"

start_etcd
start_cell0
declare -A endpoints pids
endpoints[etcd]="$(etcd_endpoints)"
endpoints[cell0]="$(cell0_endpoints)"
pids[etcd]="$(IFS=,; echo "${etcd_pids[*]}")"
pids[cell0]="$(IFS=,; echo "${cell0_pids[*]}")"
echo "etcd endpoints (leader last): ${endpoints[etcd]}"
echo "Cell0 endpoints (leader last): ${endpoints[cell0]}"

common=(--keys "$keys" --value-size "$value_size" --output json)
max_get=0
for c in $get_clients; do [ "$c" -gt "$max_get" ] && max_get="$c"; done
[ "$max_get" -gt 0 ] || max_get=16
for t in etcd cell0; do
  echo "== prefill: $keys keys of $value_size bytes into $t (and a 1 s warm-up of gets)"
  "$load_bin" --target "$t" --endpoints "${endpoints[$t]}" --op get --clients "$max_get" --duration 1 \
    --prefill "${common[@]}" >>"$work/prefill.jsonl"
done

rows=()
for c in $put_clients; do rows+=("put $c"); done
for c in $get_clients; do rows+=("get $c"); done
for round in $(seq 1 "$rounds"); do
  for row in "${rows[@]}"; do
    read -r op clients <<<"$row"
    extra=()
    [ "$op" = get ] && extra=(--consistency linearizable)
    for t in etcd cell0; do
      check_alive
      echo "== round $round/$rounds: $t $op, $clients clients, ${duration}s"
      "$load_bin" --target "$t" --endpoints "${endpoints[$t]}" --op "$op" --clients "$clients" \
        --duration "$duration" --pids "${pids[$t]}" "${extra[@]}" "${common[@]}" >>"$results"
    done
  done
done
check_alive
load_end="$(loadavg)"

{
  echo
  echo "## Cell0 vs etcd $etcd_version: KV on 3 nodes each, 127.0.0.1"
  echo
  echo "$(nproc) CPUs ($(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n1)), $(uname -sr)."
  echo "$rounds round(s), runs interleaved (each row: etcd, then Cell0), ${duration} s per run, $keys keys"
  echo "(prefilled), ${value_size}-byte values; one connection per client, client i on endpoint i mod 3,"
  echo "followers first. Load average (1/5/15 min) at the start: $load_start; at the end: $load_end."
  if [ -n "$threads" ]; then
    echo "Each server process runs $threads thread(s) of code (Cell0 --worker-threads, etcd GOMAXPROCS)."
  else
    echo "Each server process runs its default threads (one per core)."
  fi
  echo
  "$load_bin" compare "$results"
} | tee "$work/table.md"
