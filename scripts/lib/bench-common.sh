# Functions shared by the benchmark scripts (scripts/bench-vs-etcd.sh,
# scripts/bench-snapshot.sh). Sourced, not run. The caller defines `die`,
# `root` (the repository), `target_dir` (CARGO_TARGET_DIR of the release
# build), `etcd_cache` (where etcd's packages are unpacked) and `base_port`;
# `fetch_etcd` sets `etcd_bin` and `etcdctl_bin`, `build` sets `cell0_bin`
# and `load_bin`.

is_number() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }

etcd_port() { echo $((base_port + $1 * 10 + $2)); }       # etcd_port MEMBER OFFSET

running() { # running PID: exists and is not a zombie
  local state
  # The process may exit between any two reads: a missing file means gone.
  state="$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)"
  [ -n "$state" ] && [ "$state" != Z ]
}

stop_pids() { # stop_pids PID...: TERM, then KILL after 20 s; waits for each
  local pid deadline=$((SECONDS + 20))
  for pid in "$@"; do
    if running "$pid"; then kill -TERM "$pid" 2>/dev/null || true; fi
  done
  for pid in "$@"; do
    while running "$pid"; do
      if [ "$SECONDS" -ge "$deadline" ]; then
        echo "$(basename "$0"): pid $pid did not stop in 20 s; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
        break
      fi
      sleep 0.1
    done
    wait "$pid" 2>/dev/null || true
  done
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

fetch_etcd() {
  if [ -n "${ETCD_BIN:-}" ] || [ -n "${ETCDCTL_BIN:-}" ]; then
    [ -n "${ETCD_BIN:-}" ] && [ -n "${ETCDCTL_BIN:-}" ] || die "set both ETCD_BIN and ETCDCTL_BIN, or neither"
    etcd_bin="$ETCD_BIN" etcdctl_bin="$ETCDCTL_BIN"
  else
    local unpacked="$etcd_cache/root"
    etcd_bin="$unpacked/usr/bin/etcd" etcdctl_bin="$unpacked/usr/bin/etcdctl"
    if [ ! -x "$etcd_bin" ] || [ ! -x "$etcdctl_bin" ]; then
      echo "fetching etcd (apt-get download etcd-server etcd-client) into $etcd_cache"
      command -v apt-get >/dev/null && command -v dpkg >/dev/null || die "apt-get and dpkg are needed to fetch etcd (or set ETCD_BIN and ETCDCTL_BIN)"
      mkdir -p "$etcd_cache"
      rm -rf "$etcd_cache/debs.tmp" "$unpacked.tmp"
      mkdir "$etcd_cache/debs.tmp" "$unpacked.tmp"
      # As root, apt would hand the download to its sandbox user, who cannot write here.
      local sandbox=()
      [ "$(id -u)" -eq 0 ] && sandbox=(-o APT::Sandbox::User=root)
      (cd "$etcd_cache/debs.tmp" && apt-get "${sandbox[@]}" download etcd-server etcd-client) ||
        die "apt-get download etcd-server etcd-client failed (are the package lists current? 'apt-get update')"
      local deb
      for deb in "$etcd_cache"/debs.tmp/*.deb; do
        dpkg -x "$deb" "$unpacked.tmp"
      done
      [ -x "$unpacked.tmp/usr/bin/etcd" ] && [ -x "$unpacked.tmp/usr/bin/etcdctl" ] ||
        die "the packages in $etcd_cache/debs.tmp hold no usr/bin/etcd and usr/bin/etcdctl"
      rm -rf "$unpacked" "$etcd_cache/debs"
      mv "$unpacked.tmp" "$unpacked"
      mv "$etcd_cache/debs.tmp" "$etcd_cache/debs"
    fi
  fi
  etcd_version="$("$etcd_bin" --version 2>/dev/null | sed -n 's/^etcd Version: *//p')"
  case "$etcd_version" in
    3.4.*) ;;
    *) die "$etcd_bin is etcd '${etcd_version:-unknown}', not 3.4" ;;
  esac
  "$etcdctl_bin" version >/dev/null 2>&1 || die "$etcdctl_bin does not run"
  echo "etcd $etcd_version: $etcd_bin"
}

build() {
  cell0_bin="${CELL0_BIN:-$target_dir/release/cell0}"
  load_bin="${LOAD_BIN:-$target_dir/release/cell0-load}"
  if [ -z "${CELL0_BIN:-}" ]; then
    echo "building cell0 (release) in $target_dir; the first build compiles RocksDB and takes a while"
    # The same command as scripts/bootstrap-cluster.sh, so the same artifacts (RocksDB included).
    (cd "$root" && CARGO_TARGET_DIR="$target_dir" cargo build --release --locked -p cell0)
  fi
  if [ -z "${LOAD_BIN:-}" ]; then
    # cell0-chaos does not depend on RocksDB.
    (cd "$root" && CARGO_TARGET_DIR="$target_dir" cargo build --release --locked -p cell0-chaos --bin cell0-load)
  fi
  [ -x "$cell0_bin" ] || die "no cell0 binary at $cell0_bin"
  [ -x "$load_bin" ] || die "no cell0-load binary at $load_bin"
  echo "cell0: $cell0_bin"
  echo "cell0-load: $load_bin"
}

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
