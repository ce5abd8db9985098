#!/usr/bin/env bash
# Snapshot throughput and new-member catch-up: Cell0 against etcd 3.4, one
# after the other on this machine, 3-node clusters on 127.0.0.1 plus a 4th
# member that joins after the data is written, one markdown table at the end.
#
#   scripts/bench-snapshot.sh                 256 MiB of 1 KiB values
#   SIZE_MB=32 scripts/bench-snapshot.sh      a smoke run
#
# What it does:
#   1. disk: `dd if=/dev/zero bs=1M count=min(SIZE_MB,1024) conv=fdatasync` into the
#      work directory (on BENCH_DIR's disk): sequential write MB/s, then deletes the file;
#   2. fetches etcd 3.4 and builds cell0 and cell0-load in release, as
#      scripts/bench-vs-etcd.sh does (same cache, same target directory, same commands);
#   3. Cell0: 3 nodes with a config file setting [raft] snapshot_every (2000) and
#      keep_logs_after_snapshot (100), so the log is purged behind each snapshot; writes
#      SIZE_MB MiB as SIZE_MB*2^20/VALUE_BYTES distinct keys of VALUE_BYTES bytes
#      (cell0-load --prefill); takes the leader's commit index, starts a 4th node with
#      --join and times it from its start until its metrics (`cell0_raft_applied_index`, polled with curl like etcd's) report an applied
#      index at least that commit index (catch-up), then until its /ready answers (its
#      join completed); VmRSS of the 4 processes is sampled every 0.5 s meanwhile; reads
#      from the logs (JSON) the new node's "received snapshot" and "installed snapshot"
#      lines and the sender's "wrote snapshot file" line of that snapshot; then stops
#      the cluster and deletes its data;
#   4. etcd: 3 members with --snapshot-count 2000 (and --quota-backend-bytes 3*SIZE_MB MiB,
#      within 2..8 GiB, so that the data fits), the same keys and values, then
#      `etcdctl member add e4` and a 4th member with --initial-cluster-state existing,
#      timed from its start until its revision equals the leader's: first as its
#      metrics listener reports it (etcd_debugging_mvcc_current_revision; catch-up),
#      then as `etcdctl endpoint status` on it answers it (etcd serves clients only once
#      the member published itself through Raft); VmRSS sampled the same way; the new
#      member's "received and saved database snapshot" line gives etcd's snapshot size
#      and download time;
#   5. prints one markdown table (and writes it, with a JSON line of the numbers, to the
#      work directory), and the load average at the start and the end.
#
# Every process it started is stopped on exit (also on failure or Ctrl-C), and the
# work directory is removed; after a failure its logs are kept (data directories never).
#
# Environment (defaults in brackets):
#   SIZE_MB [256]  VALUE_BYTES [1024]  FILL_CLIENTS [32]: clients writing the keys
#   SNAPSHOT_EVERY [2000]: Cell0 raft.snapshot_every and etcd --snapshot-count
#   KEEP_LOGS_AFTER_SNAPSHOT [100]: Cell0 raft.keep_logs_after_snapshot
#   BASE_PORT [25000]: etcd member i on BASE_PORT+10i (client), +1 (peer), +2 (metrics); Cell0 node i
#     on BASE_PORT+100+10i (public gRPC), +1 (internal), +3 (HTTP); i = 1..4
#   BENCH_DIR [/var/tmp]: where the work directory (data, logs, dd's file) goes; a real disk
#   CARGO_TARGET_DIR [/var/tmp/cell0-release]  CELL0_BIN, LOAD_BIN: use these, no build
#   ETCD_CACHE [$CARGO_TARGET_DIR/etcd-3.4]  ETCD_BIN, ETCDCTL_BIN: use these, no download
#   READY_TIMEOUT [60] s per node start; FILL_TIMEOUT [300+SIZE_MB] s per fill;
#   CATCHUP_TIMEOUT [120+SIZE_MB/2] s per catch-up; POLL_INTERVAL [0.2] s between status polls
#   KEEP_LOGS=1: keep the work directory's logs and table; KEEP_DATA=1: keep everything
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
die() { echo "bench-snapshot: $*" >&2; exit 1; }
# shellcheck source=scripts/lib/bench-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/bench-common.sh"
say() { echo "bench-snapshot: $*" >&2; }

size_mb="${SIZE_MB:-256}"
value_bytes="${VALUE_BYTES:-1024}"
fill_clients="${FILL_CLIENTS:-32}"
snapshot_every="${SNAPSHOT_EVERY:-2000}"
keep_logs_after="${KEEP_LOGS_AFTER_SNAPSHOT:-100}"
base_port="${BASE_PORT:-25000}"
bench_dir="${BENCH_DIR:-/var/tmp}"
target_dir="${CARGO_TARGET_DIR:-/var/tmp/cell0-release}"
etcd_cache="${ETCD_CACHE:-$target_dir/etcd-3.4}"
ready_timeout="${READY_TIMEOUT:-60}"
poll_interval="${POLL_INTERVAL:-0.2}"

for v in size_mb value_bytes fill_clients snapshot_every base_port ready_timeout; do
  is_number "${!v}" || die "${v^^} must be a positive integer, not '${!v}'"
done
[[ "$keep_logs_after" =~ ^[0-9]+$ ]] || die "KEEP_LOGS_AFTER_SNAPSHOT must be a number, not '$keep_logs_after'"
[[ "$poll_interval" =~ ^[0-9]*\.?[0-9]+$ ]] || die "POLL_INTERVAL must be a number of seconds, not '$poll_interval'"
[ "$value_bytes" -le 1048576 ] || die "VALUE_BYTES must be at most 1048576 (Cell0's value limit)"
[ "$base_port" -le 65000 ] || die "BASE_PORT must leave room for the ports above it"
keys=$((size_mb * 1048576 / value_bytes))
[ "$keys" -ge 1 ] || die "SIZE_MB*2^20/VALUE_BYTES is 0 keys"
fill_timeout="${FILL_TIMEOUT:-$((300 + size_mb))}"
catchup_timeout="${CATCHUP_TIMEOUT:-$((120 + size_mb / 2))}"
is_number "$fill_timeout" || die "FILL_TIMEOUT must be a positive integer, not '$fill_timeout'"
is_number "$catchup_timeout" || die "CATCHUP_TIMEOUT must be a positive integer, not '$catchup_timeout'"

cell0_port() { echo $((base_port + 100 + $1 * 10 + $2)); } # cell0_port NODE OFFSET

# --- processes this script started, stopped on exit -----------------------------
started=()
work=""


cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_pids "${started[@]}"
  if [ -n "$work" ] && [ -d "$work" ]; then
    if [ "${KEEP_DATA:-0}" = 1 ]; then
      say "work directory kept: $work"
    elif [ "$rc" -ne 0 ] || [ "${KEEP_LOGS:-0}" = 1 ]; then
      rm -rf "$work"/etcd[0-9] "$work"/cell0-[0-9] "$work"/dd.tmp
      say "logs kept: $work"
    else
      rm -rf "$work"
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

now() { echo "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; } # elapsed START END

# --- etcd 3.4 and the binaries: the same cache and builds as bench-vs-etcd.sh ------


# --- waits, fill, RSS --------------------------------------------------------------
wait_ready() { # wait_ready NAME PID LOG URL
  local deadline=$((SECONDS + ready_timeout))
  until curl -sf "$4" >/dev/null 2>&1; do
    running "$2" || { tail -n 20 "$3" >&2 || true; die "$1 exited (log: $3)"; }
    if [ "$SECONDS" -ge "$deadline" ]; then
      tail -n 20 "$3" >&2 || true
      die "$1 is not ready after ${ready_timeout}s (log: $3)"
    fi
    sleep 0.2
  done
}

fill() { # fill TARGET ENDPOINTS: every key once (cell0-load --prefill), progress on stderr
  local out="$work/fill-$1.json"
  echo "== $1: writing $keys keys of $value_bytes bytes ($size_mb MiB) with $fill_clients clients (at most ${fill_timeout}s)"
  # --prefill writes keys 0..KEYS-1 once each; the 1 s of serializable gets after it
  # (cell0-load always runs a measured interval) write nothing.
  # In the background and waited for, so that Ctrl-C stops it (timeout runs it in a
  # process group of its own) and the trap can end it.
  local rc=0 pid
  timeout --kill-after=10 "$fill_timeout" "$load_bin" --target "$1" --endpoints "$2" \
    --op get --consistency serializable --clients "$fill_clients" --duration 1 \
    --prefill --keys "$keys" --value-size "$value_bytes" --output json >"$out" </dev/null &
  pid=$!
  started+=("$pid")
  wait "$pid" || rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then die "writing the keys into $1 took more than ${fill_timeout}s (FILL_TIMEOUT)"; fi
  [ "$rc" -eq 0 ] || die "cell0-load failed writing the keys into $1 (exit $rc)"
  fill_seconds="$(grep -o '"prefill_seconds":[0-9.e+-]*' "$out" | cut -d: -f2 || true)"
  [ -n "$fill_seconds" ] || die "cell0-load printed no prefill_seconds for $1 (output: $out)"
  echo "$1: written in ${fill_seconds}s"
}

rss_sampler() { # rss_sampler OUT PID...: every 0.5 s, the peak VmRSS (kB) per pid into OUT
  local out="$1" pid key value rest
  shift
  declare -A peak
  for pid in "$@"; do peak[$pid]=0; done
  while :; do
    for pid in "$@"; do
      value=0
      if [ -r "/proc/$pid/status" ]; then
        while read -r key value rest; do
          [ "$key" = VmRSS: ] && break
          value=0
        done 2>/dev/null <"/proc/$pid/status" || value=0
      fi
      [ "${value:-0}" -gt "${peak[$pid]}" ] && peak[$pid]="$value"
    done
    for pid in "$@"; do echo "$pid ${peak[$pid]}"; done >"$out.tmp"
    mv -f "$out.tmp" "$out"
    sleep 0.5
  done
}

sampler_pid=""
start_sampler() { # start_sampler OUT PID...
  rss_sampler "$@" &
  sampler_pid=$!
  started+=("$sampler_pid")
}
stop_sampler() { stop_pids "$sampler_pid"; }

# peak_mb FILE PID [whole-life]: in MB (2^20 bytes), the highest of the sampled peak and
# VmRSS now; with whole-life also VmHWM, the kernel's peak since the process started
# (exact for the new member, whose whole life is the catch-up; samples may miss a peak).
peak_mb() {
  local kb=0 key value
  if [ -r "$1" ]; then kb="$(awk -v p="$2" '$1 == p { print $2 }' "$1")"; fi
  while read -r key value _; do
    case "$key" in
      VmRSS:) if [ "$value" -gt "${kb:-0}" ]; then kb="$value"; fi ;;
      VmHWM:) if [ "${3:-}" = whole-life ] && [ "$value" -gt "${kb:-0}" ]; then kb="$value"; fi ;;
    esac
  done < <(cat "/proc/$2/status" 2>/dev/null || true)
  echo $(((${kb:-0} + 512) / 1024))
}
hwm_mb() { # hwm_mb PID: VmHWM (the kernel's peak RSS since the process started) in MB
  awk '/^VmHWM:/ { printf "%.0f", $2 / 1024 }' "/proc/$1/status" 2>/dev/null || echo "?"
}

# The new member's catch-up: catchup_t0 is its start, catchup_deadline the SECONDS
# by which it must be done; a check leaves what it saw in $seen.
catchup_t0="" catchup_deadline=0 seen=""
poll_until() { # poll_until LABEL PID LOG CHECK...: runs CHECK every POLL_INTERVAL until it succeeds
  local label="$1" pid="$2" log="$3" next_report=$((SECONDS + 2))
  shift 3
  seen=""
  until "$@"; do
    running "$pid" || { tail -n 20 "$log" >&2 || true; die "$label exited (log: $log)"; }
    if [ "$SECONDS" -ge "$catchup_deadline" ]; then
      tail -n 20 "$log" >&2 || true
      die "$label did not catch up in ${catchup_timeout}s (CATCHUP_TIMEOUT); last seen: ${seen:-nothing} (log: $log)"
    fi
    if [ "$SECONDS" -ge "$next_report" ]; then
      echo "$label: ${seen:-no answer yet}, $(elapsed "$catchup_t0" "$(now)") s"
      next_report=$((SECONDS + 2))
    fi
    sleep "$poll_interval"
  done
}

# --- Cell0 -----------------------------------------------------------------------
cell0_pids=()

start_cell0_node() { # start_cell0_node I: node I, joining node 1 unless I is 1
  local i="$1" args
  args=(run --insecure --config "$work/cell0.toml" --data-dir "$work/cell0-$i" --name "node$i"
    --listen-public "127.0.0.1:$(cell0_port "$i" 0)"
    --listen-internal "127.0.0.1:$(cell0_port "$i" 1)"
    --listen-http "127.0.0.1:$(cell0_port "$i" 3)"
    --log-format json --log-level info)
  if [ "$i" -eq 1 ]; then
    args+=(--bootstrap)
  else
    args+=(--join "127.0.0.1:$(cell0_port 1 0)")
  fi
  # CELL0_* variables are flags too; a stray one must not change the setup.
  local v env_unset=()
  for v in $(compgen -e | grep '^CELL0_' || true); do env_unset+=(-u "$v"); done
  env "${env_unset[@]}" "$cell0_bin" "${args[@]}" >"$work/cell0-$i.log" 2>&1 </dev/null &
  started+=("$!")
  cell0_pids[i]=$!
}

cell0_status() { # cell0_status NODE FIELD: one field of `cell0 status --output json`
  timeout 5 "$cell0_bin" status --endpoint "127.0.0.1:$(cell0_port "$1" 0)" --output json 2>/dev/null |
    sed -n "s/^ *\"$2\": *\"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}$/\1/p" || true
}

cell0_caught_up() { # node4's applied index (metrics, like etcd's probe) reached the leader's commit index
  local a
  a="$(curl -sf -m 5 "http://127.0.0.1:$(cell0_port 4 3)/metrics" 2>/dev/null |
    awk '$1 == "cell0_raft_applied_index" { printf "%d", $2 }' || true)"
  seen="applied index (metrics) ${a:-(no answer)} of $cell0_target"
  is_number "$a" && [ "$a" -ge "$cell0_target" ]
}
cell0_ready() { # node4's join completed
  seen="/ready not yet"
  curl -sf -m 5 "http://127.0.0.1:$(cell0_port 4 3)/ready" >/dev/null 2>&1
}

bench_cell0() {
  cat >"$work/cell0.toml" <<EOF
[raft]
snapshot_every = $snapshot_every
keep_logs_after_snapshot = $keep_logs_after
EOF
  local i
  for i in 1 2 3; do start_cell0_node "$i"; done
  for i in 1 2 3; do
    wait_ready "cell0 node$i" "${cell0_pids[i]}" "$work/cell0-$i.log" "http://127.0.0.1:$(cell0_port "$i" 3)/ready"
  done
  echo "Cell0 cluster ready: pids ${cell0_pids[*]}"
  fill cell0 "127.0.0.1:$(cell0_port 1 0),127.0.0.1:$(cell0_port 2 0),127.0.0.1:$(cell0_port 3 0)"
  cell0_fill_seconds="$fill_seconds"

  local leader_id leader=0 commit
  leader_id="$(cell0_status 1 leader_id)"
  for i in 1 2 3; do
    [ "$(cell0_status "$i" node_id)" = "$leader_id" ] && leader="$i"
  done
  [ "$leader" -gt 0 ] || die "cannot tell Cell0's leader (leader_id '$leader_id')"
  commit="$(cell0_status "$leader" commit_index)"
  is_number "$commit" || die "cannot read the commit index of Cell0's leader node$leader"
  grep -q '"wrote snapshot file"' "$work/cell0-$leader.log" ||
    say "warning: Cell0's leader built no snapshot while the keys were written; node4 may catch up from the log alone"
  cell0_leader="$leader" cell0_target="$commit"

  echo "== cell0: starting node4 (--join); leader node$leader, commit index $commit (at most ${catchup_timeout}s)"
  catchup_t0="$(now)" catchup_deadline=$((SECONDS + catchup_timeout))
  start_cell0_node 4
  start_sampler "$work/rss-cell0" "${cell0_pids[1]}" "${cell0_pids[2]}" "${cell0_pids[3]}" "${cell0_pids[4]}"
  poll_until "cell0 node4" "${cell0_pids[4]}" "$work/cell0-4.log" cell0_caught_up
  cell0_catchup="$(elapsed "$catchup_t0" "$(now)")"
  echo "cell0 node4 holds everything: $seen after ${cell0_catchup}s"
  poll_until "cell0 node4" "${cell0_pids[4]}" "$work/cell0-4.log" cell0_ready
  cell0_ready_s="$(elapsed "$catchup_t0" "$(now)")"
  stop_sampler
  echo "cell0 node4 ready (/ready: its join completed) after ${cell0_ready_s}s"
  # The install is logged right after the applied index moves: give the line a moment.
  if grep -q '"received snapshot"' "$work/cell0-4.log"; then
    for _ in $(seq 50); do
      grep -q '"installed snapshot"' "$work/cell0-4.log" && break
      sleep 0.2
    done
  fi
  for i in 1 2 3 4; do
    cell0_rss[i]="$(peak_mb "$work/rss-cell0" "${cell0_pids[i]}" "$([ "$i" -eq 4 ] && echo whole-life)")"
    cell0_hwm[i]="$(hwm_mb "${cell0_pids[i]}")"
  done
  echo "stopping the Cell0 cluster"
  stop_pids "${cell0_pids[@]}"
  [ "${KEEP_DATA:-0}" = 1 ] || rm -rf "$work"/cell0-[0-9]
}

# --- etcd ------------------------------------------------------------------------
etcd_pids=()
etcd_quota=$((size_mb * 3 * 1048576))
[ "$etcd_quota" -ge $((2 * 1073741824)) ] || etcd_quota=$((2 * 1073741824))
[ "$etcd_quota" -le $((8 * 1073741824)) ] || etcd_quota=$((8 * 1073741824))

start_etcd_member() { # start_etcd_member I STATE INITIAL_CLUSTER
  local i="$1" v env_unset=()
  # etcd reads ETCD_* variables as flags; a stray one must not change the setup.
  for v in $(compgen -e | grep '^ETCD_' || true); do env_unset+=(-u "$v"); done
  env "${env_unset[@]}" "$etcd_bin" --name "e$i" --data-dir "$work/etcd$i" \
    --listen-client-urls "http://127.0.0.1:$(etcd_port "$i" 0)" \
    --advertise-client-urls "http://127.0.0.1:$(etcd_port "$i" 0)" \
    --listen-peer-urls "http://127.0.0.1:$(etcd_port "$i" 1)" \
    --initial-advertise-peer-urls "http://127.0.0.1:$(etcd_port "$i" 1)" \
    --listen-metrics-urls "http://127.0.0.1:$(etcd_port "$i" 2)" \
    --initial-cluster "$3" --initial-cluster-token bench-snapshot --initial-cluster-state "$2" \
    --snapshot-count "$snapshot_every" --quota-backend-bytes "$etcd_quota" \
    --logger zap --log-outputs stderr \
    >"$work/etcd$i.log" 2>&1 </dev/null &
  started+=("$!")
  etcd_pids[i]=$!
}

# A new member accepts connections at once but serves them only once it is ready
# (it applied its own publish entry, so it holds nearly everything): a long dial
# timeout lets a poll that is waiting get its answer as soon as that happens.
etcd_revision() { # etcd_revision MEMBER: the revision in its endpoint status
  timeout 20 "$etcdctl_bin" --endpoints="127.0.0.1:$(etcd_port "$1" 0)" --dial-timeout=10s --command-timeout=5s \
    endpoint status --write-out=json 2>/dev/null | grep -o '"revision":[0-9]*' | head -n1 | cut -d: -f2 || true
}

# A new member serves clients only once it is ready (after it published itself through
# Raft), but its metrics listener answers at once: the revision it holds comes from there.
etcd_caught_up() {
  local r
  r="$(curl -sf -m 5 "http://127.0.0.1:$(etcd_port 4 2)/metrics" 2>/dev/null |
    awk '$1 == "etcd_debugging_mvcc_current_revision" { printf "%d", $2 }' || true)"
  seen="revision (metrics) ${r:-(no answer)} of $etcd_target"
  is_number "$r" && [ "$r" -ge "$etcd_target" ]
}
etcd_serving() { # endpoint status on e4 answers with the leader's revision
  local r
  r="$(etcd_revision 4)"
  seen="endpoint status revision ${r:-(no answer)} of $etcd_target"
  is_number "$r" && [ "$r" -ge "$etcd_target" ]
}

bench_etcd() {
  local i initial="" eps=""
  for i in 1 2 3; do
    initial+="${initial:+,}e$i=http://127.0.0.1:$(etcd_port "$i" 1)"
    eps+="${eps:+,}127.0.0.1:$(etcd_port "$i" 0)"
  done
  for i in 1 2 3; do start_etcd_member "$i" new "$initial"; done
  for i in 1 2 3; do
    wait_ready "etcd member e$i" "${etcd_pids[i]}" "$work/etcd$i.log" "http://127.0.0.1:$(etcd_port "$i" 0)/health"
  done
  echo "etcd cluster ready: pids ${etcd_pids[*]}"
  fill etcd "$eps"
  etcd_fill_seconds="$fill_seconds"

  local status
  status="$("$etcdctl_bin" --endpoints="$eps" --command-timeout=5s endpoint status --write-out=json)" ||
    die "etcdctl endpoint status failed"
  etcd_leader="" etcd_target="" etcd_db_bytes=""
  read -r etcd_leader etcd_target etcd_db_bytes < <(python3 -c '
import json, sys
for i, s in enumerate(json.load(sys.stdin), 1):
    st = s["Status"]
    if st["header"]["member_id"] == st["leader"]:
        print(i, st["header"]["revision"], st["dbSize"])
' <<<"$status" || true)
  is_number "${etcd_target:-}" || die "cannot tell etcd's leader and its revision"

  echo "== etcd: etcdctl member add e4, then start it; leader e$etcd_leader, revision $etcd_target (at most ${catchup_timeout}s)"
  # etcd refuses a member (unhealthy cluster) until every member has been connected
  # for 5 s; retried for up to 30 s.
  local add_deadline=$((SECONDS + 30))
  until "$etcdctl_bin" --endpoints="$eps" --command-timeout=10s \
    member add e4 --peer-urls="http://127.0.0.1:$(etcd_port 4 1)" >"$work/etcd-member-add.txt" 2>&1; do
    [ "$SECONDS" -lt "$add_deadline" ] || die "etcdctl member add failed for 30 s: $(tail -n 1 "$work/etcd-member-add.txt")"
    sleep 1
  done
  catchup_t0="$(now)" catchup_deadline=$((SECONDS + catchup_timeout))
  start_etcd_member 4 existing "$initial,e4=http://127.0.0.1:$(etcd_port 4 1)"
  start_sampler "$work/rss-etcd" "${etcd_pids[1]}" "${etcd_pids[2]}" "${etcd_pids[3]}" "${etcd_pids[4]}"
  poll_until "etcd e4" "${etcd_pids[4]}" "$work/etcd4.log" etcd_caught_up
  etcd_catchup="$(elapsed "$catchup_t0" "$(now)")"
  echo "etcd e4 holds everything: $seen after ${etcd_catchup}s"
  poll_until "etcd e4" "${etcd_pids[4]}" "$work/etcd4.log" etcd_serving
  etcd_ready_s="$(elapsed "$catchup_t0" "$(now)")"
  stop_sampler
  echo "etcd e4 answers endpoint status with that revision after ${etcd_ready_s}s"
  for i in 1 2 3 4; do
    etcd_rss[i]="$(peak_mb "$work/rss-etcd" "${etcd_pids[i]}" "$([ "$i" -eq 4 ] && echo whole-life)")"
    etcd_hwm[i]="$(hwm_mb "${etcd_pids[i]}")"
  done
  echo "stopping the etcd cluster"
  stop_pids "${etcd_pids[@]}"
  [ "${KEEP_DATA:-0}" = 1 ] || rm -rf "$work"/etcd[0-9]
}

# --- main ------------------------------------------------------------------------
load_start="$(loadavg)"
command -v python3 >/dev/null || die "python3 is needed to read the logs"
command -v curl >/dev/null || die "curl is needed for the readiness checks"
fetch_etcd
build
mkdir -p "$bench_dir"
for i in 1 2 3 4; do
  for p in "$(etcd_port "$i" 0)" "$(etcd_port "$i" 1)" "$(etcd_port "$i" 2)" "$(cell0_port "$i" 0)" "$(cell0_port "$i" 1)" "$(cell0_port "$i" 3)"; do
    port_in_use "$p" && die "port $p on 127.0.0.1 is in use (set BASE_PORT)"
  done
done
work="$(mktemp -d "$bench_dir/bench-snapshot.XXXXXX")"
echo "work directory: $work"
avail_mb=$(($(df -Pk "$work" | awk 'NR == 2 { print $4 }') / 1024))
[ "$avail_mb" -ge $((size_mb * 10)) ] ||
  say "warning: $avail_mb MB free on $work's disk; the clusters may need up to $((size_mb * 10)) MB"

# 1. disk
dd_mb=$((size_mb < 1024 ? size_mb : 1024))
echo "== disk: dd $dd_mb MiB with conv=fdatasync into $work"
dd_out="$(LC_ALL=C dd if=/dev/zero of="$work/dd.tmp" bs=1M count="$dd_mb" conv=fdatasync 2>&1)" ||
  { rm -f "$work/dd.tmp"; die "dd failed: $dd_out"; }
rm -f "$work/dd.tmp"
# "268435456 bytes (268 MB, 256 MiB) copied, 1.23 s, 218 MB/s": bytes / seconds, in MB (10^6).
disk_mb_s="$(echo "$dd_out" | awk '/ copied, / { b = $1; sub(/.* copied, /, ""); s = $1 + 0; if (s > 0) printf "%.0f", b / s / 1e6 }')"
[ -n "$disk_mb_s" ] || die "cannot read dd's output: $dd_out"
echo "disk: $disk_mb_s MB/s"

declare -a cell0_rss cell0_hwm etcd_rss etcd_hwm
bench_cell0
bench_etcd
load_end="$(loadavg)"

# --- report ----------------------------------------------------------------------
export work size_mb keys value_bytes fill_clients snapshot_every keep_logs_after etcd_version etcd_quota \
  load_start load_end disk_mb_s cell0_fill_seconds etcd_fill_seconds cell0_catchup etcd_catchup cell0_ready_s etcd_ready_s \
  cell0_leader cell0_target etcd_leader etcd_target etcd_db_bytes
export cell0_rss_list="${cell0_rss[*]}" cell0_hwm_list="${cell0_hwm[*]}"
export etcd_rss_list="${etcd_rss[*]}" etcd_hwm_list="${etcd_hwm[*]}"
cpus="$(nproc) CPUs ($(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n1)), $(uname -sr)"
export cpus
python3 - <<'PY' | tee "$work/table.md"
import json, os, re

e = os.environ
work = e["work"]

def log_lines(path):
    """The JSON objects of a log file; other lines are skipped."""
    out = []
    try:
        with open(path, errors="replace") as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass
    except OSError:
        pass
    return out

def last(lines, message, key="message", **match):
    found = [l for l in lines if l.get(key) == message and all(l.get(k) == v for k, v in match.items())]
    return found[-1] if found else None

# Cell0: the new node's received and installed snapshot, and the build of that snapshot.
new = log_lines(f"{work}/cell0-4.log")
received = last(new, "received snapshot")
installed = last(new, "installed snapshot")
built, built_by = None, None
if received:
    for i in (1, 2, 3):
        b = last(log_lines(f"{work}/cell0-{i}.log"), "wrote snapshot file", snapshot=received.get("snapshot"))
        if b:
            built, built_by = b, i
if built is None:
    leader = int(e["cell0_leader"])
    built, built_by = last(log_lines(f"{work}/cell0-{leader}.log"), "wrote snapshot file"), leader

# etcd: the new member's downloaded snapshot.
def go_seconds(d):
    """A Go duration string (1m2.5s, 830.2ms, 12µs) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
    parts = re.findall(r"([0-9.]+)(h|ms|m|s|us|µs|ns)", d or "")
    return sum(float(n) * units[u] for n, u in parts) if parts else None

etcd_new = log_lines(f"{work}/etcd4.log")
etcd_recv = last(etcd_new, "received and saved database snapshot", key="msg")
etcd_snap_bytes = etcd_snap_s = None
if etcd_recv:
    etcd_snap_bytes = etcd_recv.get("incoming-snapshot-size-bytes")
    etcd_snap_s = go_seconds(etcd_recv.get("download-took"))

def num(v, fmt="{:.1f}"):
    return "n/a" if v is None else fmt.format(v)

def ratio(a, b):
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}"

def mb(v):
    return None if v is None else v / 1e6

cell0_catchup, etcd_catchup = float(e["cell0_catchup"]), float(e["etcd_catchup"])
cell0_ready, etcd_ready = float(e["cell0_ready_s"]), float(e["etcd_ready_s"])
size_bytes = int(e["keys"]) * int(e["value_bytes"])
fill = lambda s: size_bytes / 1e6 / float(s) if s else None
etcd_transfer = etcd_snap_bytes / 1e6 / etcd_snap_s if etcd_snap_bytes and etcd_snap_s else None
def to_int(v):
    try:
        return int(v)
    except ValueError:
        return None

cell0_rss = e["cell0_rss_list"].split()
cell0_hwm = e["cell0_hwm_list"].split()
etcd_rss = e["etcd_rss_list"].split()
etcd_hwm = e["etcd_hwm_list"].split()

result = {
    "size_mb": int(e["size_mb"]), "keys": int(e["keys"]), "value_bytes": int(e["value_bytes"]),
    "disk_mb_s": float(e["disk_mb_s"]),
    "cell0": {
        "fill_seconds": float(e["cell0_fill_seconds"]),
        "snapshot_bytes": (received or built or {}).get("bytes"),
        "snapshot_build_mb_s": built and built.get("mb_per_s"),
        "snapshot_build_ms": built and built.get("elapsed_ms"),
        "snapshot_built_by": f"node{built_by}" if built else None,
        "snapshot_transfer_mb_s": received and received.get("mb_per_s"),
        "snapshot_transfer_ms": received and received.get("elapsed_ms"),
        "snapshot_install_mb_s": installed and installed.get("mb_per_s"),
        "snapshot_install_ms": installed and installed.get("elapsed_ms"),
        "catchup_seconds": cell0_catchup, "ready_seconds": cell0_ready, "target_commit_index": int(e["cell0_target"]),
        "leader": f"node{e['cell0_leader']}",
        "peak_rss_mb": dict(zip(["node1", "node2", "node3", "node4"], map(to_int, cell0_rss))),
        "vm_hwm_mb": dict(zip(["node1", "node2", "node3", "node4"], cell0_hwm)),
    },
    "etcd": {
        "version": e["etcd_version"],
        "fill_seconds": float(e["etcd_fill_seconds"]),
        "db_bytes": int(e["etcd_db_bytes"]),
        "snapshot_bytes": etcd_snap_bytes,
        "snapshot_download_seconds": etcd_snap_s,
        "snapshot_transfer_mb_s": etcd_transfer,
        "catchup_seconds": etcd_catchup, "serving_seconds": etcd_ready, "target_revision": int(e["etcd_target"]),
        "leader": f"e{e['etcd_leader']}",
        "peak_rss_mb": dict(zip(["e1", "e2", "e3", "e4"], map(to_int, etcd_rss))),
        "vm_hwm_mb": dict(zip(["e1", "e2", "e3", "e4"], etcd_hwm)),
    },
    "catchup_ratio_cell0_over_etcd": cell0_catchup / etcd_catchup if etcd_catchup else None,
    "load_average_start": e["load_start"], "load_average_end": e["load_end"],
}
with open(f"{work}/result.json", "w") as f:
    f.write(json.dumps(result) + "\n")

c = result["cell0"]
print()
print(f"## Snapshot and new-member catch-up: Cell0 vs etcd {e['etcd_version']}, 3 nodes + 1 joining, 127.0.0.1")
print()
print(f"{e['cpus']}.")
print(f"{e['size_mb']} MiB written as {e['keys']} distinct keys of {e['value_bytes']} bytes "
      f"(incompressible) with {e['fill_clients']} clients; then a 4th member joins and is timed from its")
print(f"start until it holds everything: Cell0 `cell0_raft_applied_index` on its metrics listener >= the leader's commit index")
print(f"({e['cell0_target']}), etcd revision on its metrics listener = the leader's ({e['etcd_target']}). Cell0 raft.snapshot_every = "
      f"{e['snapshot_every']}, keep_logs_after_snapshot = {e['keep_logs_after']}; etcd --snapshot-count "
      f"{e['snapshot_every']}, quota {int(e['etcd_quota']) >> 20} MiB.")
print(f"Clusters run one after the other. Load average (1/5/15 min) at the start: {e['load_start']}; at the end: {e['load_end']}.")
print()
print("| measure | Cell0 | etcd | Cell0/etcd |")
print("|---|---:|---:|---:|")
print(f"| disk sequential write (dd 1M blocks, fdatasync), MB/s | {e['disk_mb_s']} | (same disk) | |")
fc, fe = fill(e["cell0_fill_seconds"]), fill(e["etcd_fill_seconds"])
print(f"| fill: MB/s of values ({e['fill_clients']} clients) | {num(fc)} | {num(fe)} | {ratio(fc, fe)} |")
print(f"| snapshot size, MB | {num(mb(c['snapshot_bytes']))} | {num(mb(etcd_snap_bytes))} (db {num(mb(int(e['etcd_db_bytes'])))}) | |")
print(f"| snapshot build on {c['snapshot_built_by'] or 'the leader'}, MB/s (ms) | {num(c['snapshot_build_mb_s'])} ({num(c['snapshot_build_ms'], '{}')}) | | |")
print(f"| snapshot transfer to the new member, MB/s (ms) | {num(c['snapshot_transfer_mb_s'])} ({num(c['snapshot_transfer_ms'], '{}')}) "
      f"| {num(etcd_transfer)} ({num(etcd_snap_s and etcd_snap_s * 1000, '{:.0f}')}) | {ratio(c['snapshot_transfer_mb_s'], etcd_transfer)} |")
print(f"| snapshot install on the new member, MB/s (ms) | {num(c['snapshot_install_mb_s'])} ({num(c['snapshot_install_ms'], '{}')}) | | |")
print(f"| **catch-up of the new member, s** | **{cell0_catchup:.2f}** | **{etcd_catchup:.2f}** | **{ratio(cell0_catchup, etcd_catchup)}** |")
print(f"| new member ready: Cell0 /ready, etcd answers endpoint status, s | {cell0_ready:.2f} | {etcd_ready:.2f} | {ratio(cell0_ready, etcd_ready)} |")
for i in range(4):
    cl = f"node{i + 1}" + (" leader" if str(i + 1) == e["cell0_leader"] else "") + (" new" if i == 3 else "")
    el = f"e{i + 1}" + (" leader" if str(i + 1) == e["etcd_leader"] else "") + (" new" if i == 3 else "")
    print(f"| peak RSS while the new member catches up (VmHWM since start), MB: {cl} / {el} | {cell0_rss[i]} ({cell0_hwm[i]}) "
          f"| {etcd_rss[i]} ({etcd_hwm[i]}) | {ratio(to_int(cell0_rss[i]), to_int(etcd_rss[i]))} |")
if not received:
    print()
    print("Cell0's new node received no snapshot (it caught up from the log): raise SIZE_MB or lower SNAPSHOT_EVERY.")
if not etcd_recv:
    print()
    print("etcd's new member received no snapshot (it caught up from the log): raise SIZE_MB.")
print()
print("json: " + json.dumps(result))
PY
