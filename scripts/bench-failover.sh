#!/usr/bin/env bash
# Failover, measured: kill -9 the leader of a 3-node cluster under write load, again and
# again, and time how long writes take to succeed again; Cell0 beside etcd 3.4, in the
# same run, driven by the same harness (`cell0-chaos failover`, chaos/src/failover.rs).
#
#   scripts/bench-failover.sh                 20 kills of each system, interleaved in 4 chunks
#   QUICK=1 scripts/bench-failover.sh         a smoke run: 2 kills of each, one chunk
#   CELL0_CONFIGS="fast=/path/raft.toml" scripts/bench-failover.sh
#                                             also measures Cell0 with that config file, as
#                                             "fast", interleaved with the others
#
# What it does:
#   1. fetches etcd 3.4 with `apt-get download etcd-server etcd-client` into a cache
#      directory and unpacks it there with `dpkg -x` (nothing is installed system-wide and
#      no service starts; idempotent; the same code as scripts/bench-vs-etcd.sh);
#   2. builds cell0 and cell0-chaos in release (`cargo build --release --locked -p cell0
#      -p cell0-chaos`, in CARGO_TARGET_DIR);
#   3. runs the systems interleaved: for each chunk, `cell0-chaos failover` against Cell0
#      (then each CELL0_CONFIGS variant), then against etcd; each run starts a fresh 3-node
#      cluster on loopback under a temporary directory in $BENCH_DIR, kills its leader
#      KILLS/CHUNKS times (restarting it on its data dir and letting writes flow for the
#      settle time in between), writes its rounds as JSON and has its data dirs removed
#      (etcd preallocates 64 MB WAL files);
#   4. prints one markdown table of all rounds pooled per system (recovery p50/p90/p99/max,
#      the gap, the election, Cell0/etcd ratios) with the machine, the date and the load
#      average at the start and the end, and stops every process it started (also on
#      failure or Ctrl-C).
#
# Environment (defaults in brackets; QUICK=1 changes the defaults marked *):
#   KILLS per system [20, *2]  CHUNKS [4, *1]  WRITERS [8]  REQUEST_TIMEOUT_MS [500]
#   SETTLE_MS [2000]  CELL0_CONFIGS: "label=FILE ..." extra Cell0 variants (labels other
#   than cell0 and etcd, without spaces or '=')
#   CARGO_TARGET_DIR [/var/tmp/cell0-release]  CELL0_BIN, CHAOS_BIN: use these binaries, no build
#   ETCD_CACHE [$CARGO_TARGET_DIR/etcd-3.4]  ETCD_BIN, ETCDCTL_BIN: use these, no download
#   BENCH_DIR: where the runs' temporary directory goes; a real disk [/var/tmp]
#   BASE_PORT [24400]: etcd member i on BASE_PORT+10i (client) and +1 (peer); Cell0 nodes
#     listen on 127.x.y.z:7100-7103, addresses of their own
#   KEEP_DATA=1: keep the data directories (logs and results are always kept)
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
die() { echo "bench-failover: $*" >&2; exit 1; }
# shellcheck source=scripts/lib/bench-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/bench-common.sh"

if [ "${QUICK:-0}" = 1 ]; then
  kills="${KILLS:-2}" chunks="${CHUNKS:-1}"
else
  kills="${KILLS:-20}" chunks="${CHUNKS:-4}"
fi
writers="${WRITERS:-8}"
request_timeout_ms="${REQUEST_TIMEOUT_MS:-500}"
settle_ms="${SETTLE_MS:-2000}"
target_dir="${CARGO_TARGET_DIR:-/var/tmp/cell0-release}"
etcd_cache="${ETCD_CACHE:-$target_dir/etcd-3.4}"
bench_dir="${BENCH_DIR:-/var/tmp}"
base_port="${BASE_PORT:-24400}"

for v in kills chunks writers request_timeout_ms base_port; do
  is_number "${!v}" || die "${v^^} must be a positive integer, not '${!v}'"
done
[[ "$settle_ms" =~ ^[0-9]+$ ]] || die "SETTLE_MS must be a number, not '$settle_ms'"
[ "$chunks" -le "$kills" ] || die "CHUNKS ($chunks) must not exceed KILLS ($kills)"
[ "$base_port" -le 65000 ] || die "BASE_PORT must leave room for 40 ports below 65536"

# Variants, "label=config file" ("cell0=": Cell0 with its defaults).
variants=("cell0=")
for v in ${CELL0_CONFIGS:-}; do
  label="${v%%=*}" file="${v#*=}"
  [[ "$v" == *=* && -n "$label" && -n "$file" ]] || die "CELL0_CONFIGS entries are label=FILE, not '$v'"
  [ -f "$file" ] || die "no config file $file (CELL0_CONFIGS)"
  case "$label" in cell0 | etcd) die "CELL0_CONFIGS: the label '$label' is taken" ;; esac
  variants+=("$label=$(cd "$(dirname "$file")" && pwd)/$(basename "$file")")
done

# --- processes this script started, stopped on exit ---------------------------
started=()
work=""

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  # cell0-chaos kills and reaps its cluster when it gets SIGTERM.
  stop_pids "${started[@]}"
  if [ -n "$work" ] && [ -d "$work" ]; then
    [ "${KEEP_DATA:-0}" = 1 ] || remove_data
    echo "logs and results: $work" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

remove_data() { rm -rf "$work"/runs/*/node[0-9] "$work"/runs/*/etcd[0-9]; }

build_failover() {
  cell0_bin="${CELL0_BIN:-$target_dir/release/cell0}"
  chaos_bin="${CHAOS_BIN:-$target_dir/release/cell0-chaos}"
  if [ -z "${CELL0_BIN:-}" ] || [ -z "${CHAOS_BIN:-}" ]; then
    echo "building cell0 and cell0-chaos (release) in $target_dir; the first build compiles RocksDB and takes a while"
    (cd "$root" && CARGO_TARGET_DIR="$target_dir" cargo build --release --locked -p cell0 -p cell0-chaos)
  fi
  [ -x "$cell0_bin" ] || die "no cell0 binary at $cell0_bin"
  [ -x "$chaos_bin" ] || die "no cell0-chaos binary at $chaos_bin"
  echo "cell0: $cell0_bin"
  echo "cell0-chaos: $chaos_bin"
}

# run_one LABEL CONFIG TARGET KILLS CHUNK: one `cell0-chaos failover` run, in the
# background so that the trap can stop it; its JSON goes under $work/results, named so
# that the files sort in the order the runs happened.
run_one() {
  local label="$1" config="$2" target="$3" n="$4" chunk="$5" rc=0
  local dir="$work/runs/$label-$chunk" json
  json="$work/results/$(printf '%02d-%02d' "$chunk" "$run_index")-$label.json"
  run_index=$((run_index + 1))
  local args=(failover --target "$target" --label "$label" --kills "$n" --writers "$writers"
    --request-timeout-ms "$request_timeout_ms" --settle-ms "$settle_ms"
    --dir "$dir" --json "$json" --cell0-bin "$cell0_bin" --etcd-bin "$etcd_bin"
    --etcd-base-port "$base_port")
  [ -n "$config" ] && args+=(--cell0-config "$config")
  echo "== chunk $chunk/$chunks: $label, $n kills"
  env -u CELL0_CONFIG "$chaos_bin" "${args[@]}" >"$dir.table" 2> >(tee "$dir.progress" >&2) </dev/null &
  local pid=$!
  started+=("$pid")
  wait "$pid" || rc=$?
  [ "${KEEP_DATA:-0}" = 1 ] || remove_data
  [ -f "$json" ] || die "the $label run of chunk $chunk wrote no results (exit $rc; files in $dir)"
}

# --- main -----------------------------------------------------------------------
load_start="$(loadavg)"
date_start="$(date -u '+%Y-%m-%d %H:%M UTC')"
fetch_etcd
build_failover
for i in 1 2 3; do
  for p in "$(etcd_port "$i" 0)" "$(etcd_port "$i" 1)"; do
    port_in_use "$p" && die "port $p on 127.0.0.1 is in use (set BASE_PORT)"
  done
done
mkdir -p "$bench_dir"
work="$(mktemp -d "$bench_dir/bench-failover.XXXXXX")"
mkdir -p "$work/runs" "$work/results"
echo "work directory: $work"

run_index=1
for chunk in $(seq 1 "$chunks"); do
  # KILLS spread over the chunks, the remainder on the first ones.
  n=$((kills / chunks + (chunk <= kills % chunks ? 1 : 0)))
  for v in "${variants[@]}"; do
    run_one "${v%%=*}" "${v#*=}" cell0 "$n" "$chunk"
  done
  run_one etcd "" etcd "$n" "$chunk"
done
load_end="$(loadavg)"

{
  echo
  echo "## Failover: Cell0 vs etcd $etcd_version, 3 nodes each, 127.0.0.1"
  echo
  echo "$date_start; $(nproc) CPUs ($(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n1)),"
  echo "$(awk '/^MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo) of memory, $(uname -sr); cell0 at $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?')."
  echo "$kills kills of the leader per system in $chunks interleaved chunk(s) (each a fresh cluster),"
  echo "$writers writers of unique keys with a ${request_timeout_ms} ms deadline per write, ${settle_ms} ms of"
  echo "writes between a healthy cluster and each kill. Load average (1/5/15 min) at the start:"
  echo "$load_start; at the end: $load_end."
  for v in "${variants[@]:1}"; do echo "Cell0 variant ${v%%=*}: config ${v#*=}."; done
  echo
  "$chaos_bin" failover --compare "$work"/results/*.json
} | tee "$work/table.md"
