#!/usr/bin/env bash
# Fuzzes Cell0's decoders and public request handling with AFL++ through
# cargo-afl, on the stable toolchain (no nightly, no libFuzzer).
#
#   scripts/fuzz.sh [--minutes N] [--jobs J] [TARGET...]
#       run each TARGET (default: all) for N minutes (default 10), J at once
#       (default 1); print executions, paths, crashes and hangs per target
#   scripts/fuzz.sh --smoke
#       every target for 20 seconds
#
# Targets (chaos/fuzz/src/lib.rs): log_entry (a stored Raft log entry and
# the command in it, applied twice), snapshot (a snapshot file), config (a
# node configuration file), request (one public gRPC call to a real node in
# the fuzzing process, ACLs on). Each starts from its seeds plus the inputs
# kept in chaos/fuzz/corpus/TARGET/. Crashes and hangs are copied to
# $FUZZ_OUT/TARGET/ (default .fuzz/); the script exits 1 if any target
# crashed or hung. A crash, once fixed, goes into chaos/fuzz/corpus/TARGET/
# so that `cargo nextest run -E 'package(cell0-fuzz)'` replays it forever.
#
# Installs cargo-afl from crates.io once (it builds its own AFL++); builds
# in $CELL0_FUZZ_TARGET_DIR (default /var/tmp/cell0-fuzz; the first build
# compiles RocksDB, about 20 minutes on 2 cores).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
pkg="$root/chaos/fuzz/afl"
target_dir="${CELL0_FUZZ_TARGET_DIR:-/var/tmp/cell0-fuzz}"
out_root="${FUZZ_OUT:-$root/.fuzz}"
minutes=10
jobs=1
smoke=0
targets=()
all=(log_entry snapshot config request)

die() { echo "fuzz: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) [ $# -ge 2 ] || die "--minutes needs a number"; minutes="$2"; shift 2 ;;
    --jobs) [ $# -ge 2 ] || die "--jobs needs a number"; jobs="$2"; shift 2 ;;
    --smoke) smoke=1; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    -*) die "unknown option $1" ;;
    *) targets+=("$1"); shift ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
for t in "${targets[@]}"; do
  [[ " ${all[*]} " == *" $t "* ]] || die "unknown target $t (${all[*]})"
done
[[ "$minutes" =~ ^[0-9]+$ && "$minutes" -ge 1 ]] || die "--minutes must be a whole number of at least 1"
[[ "$jobs" =~ ^[1-9]$ ]] || die "--jobs must be 1 to 9"
seconds=$((minutes * 60))
[ "$smoke" -eq 1 ] && seconds=20

if ! cargo afl --version >/dev/null 2>&1; then
  echo "installing cargo-afl (crates.io; it builds AFL++ once)"
  cargo install --locked cargo-afl
fi

echo "building the fuzz targets (release, AFL++ instrumentation) in $target_dir"
(cd "$pkg" && CARGO_TARGET_DIR="$target_dir" cargo afl build --release --locked)
bin="$target_dir/release"

export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1
export AFL_NO_AFFINITY=1 AFL_SKIP_CRASHES=1

run_one() { # run_one TARGET
  local t="$1" work="$out_root/work/$1"
  rm -rf "$work" && mkdir -p "$work/in" "$out_root/$t"
  "$bin/seeds" "$t" "$work/in"
  if compgen -G "$root/chaos/fuzz/corpus/$t/*" >/dev/null; then
    cp "$root/chaos/fuzz/corpus/$t/"* "$work/in/"
  fi
  local extra=()
  if [ "$t" = request ]; then
    # The first input of each forked process starts a node.
    extra=(-t 20000)
    export AFL_FUZZER_LOOPCOUNT=100000
  fi
  # The request target's node writes under TMPDIR: one per run, removed after.
  TMPDIR="$work" cargo afl fuzz -i "$work/in" -o "$work/out" -V "$seconds" "${extra[@]}" -- "$bin/$t" \
    >"$work/afl.log" 2>&1 || { echo "$t: afl-fuzz failed, see $work/afl.log" >&2; tail -n 20 "$work/afl.log" >&2; return 1; }
  local stats="$work/out/default/fuzzer_stats"
  local execs crashes hangs paths run_time
  execs="$(awk -F: '/^execs_done/ {gsub(/ /,"",$2); print $2}' "$stats")"
  crashes="$(awk -F: '/^saved_crashes/ {gsub(/ /,"",$2); print $2}' "$stats")"
  hangs="$(awk -F: '/^saved_hangs/ {gsub(/ /,"",$2); print $2}' "$stats")"
  paths="$(awk -F: '/^corpus_count/ {gsub(/ /,"",$2); print $2}' "$stats")"
  run_time="$(awk -F: '/^run_time/ {gsub(/ /,"",$2); print $2}' "$stats")"
  find "$work/out/default/crashes" "$work/out/default/hangs" -type f -name 'id:*' -exec cp {} "$out_root/$t/" \; 2>/dev/null || true
  printf '%-10s %6ss %12s execs %8s paths %4s crashes %4s hangs\n' "$t" "$run_time" "$execs" "$paths" "$crashes" "$hangs" |
    tee "$out_root/$t.summary"
  [ "$crashes" = 0 ] && [ "$hangs" = 0 ]
}

failed=0
pids=()
for t in "${targets[@]}"; do
  echo "fuzzing $t for ${seconds}s"
  run_one "$t" &
  pids+=($!)
  if [ ${#pids[@]} -ge "$jobs" ]; then
    wait "${pids[0]}" || failed=1
    pids=("${pids[@]:1}")
  fi
done
for p in "${pids[@]}"; do
  wait "$p" || failed=1
done
echo
cat "$out_root"/*.summary 2>/dev/null || true
if [ "$failed" -ne 0 ]; then
  echo "fuzz: a target crashed, hung or could not run; inputs are in $out_root/<target>/" >&2
  exit 1
fi
echo "no crashes and no hangs"
