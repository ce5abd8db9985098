#!/usr/bin/env bash
# Installs a Cell0 node as a systemd service on this machine (run as root):
#
#   deploy/systemd/install.sh [PATH/TO/cell0]    (default: target/release/cell0)
#
# Copies the binary to /usr/local/bin, the unit to /etc/systemd/system,
# creates /etc/cell0 (cell0.env 0600, cell0.toml), /var/lib/cell0 (0700) and
# /var/log/cell0, and reloads systemd. Existing config files are kept. Prints
# each step; starts nothing (`systemctl enable --now cell0` does).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bin="${1:-$root/target/release/cell0}"
[ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root" >&2; exit 1; }
[ -x "$bin" ] || { echo "install.sh: no cell0 binary at $bin (cargo build --release -p cell0)" >&2; exit 1; }

step() { echo "+ $*"; "$@"; }
step install -m 0755 "$bin" /usr/local/bin/cell0
step install -d -m 0755 /etc/cell0
step install -d -m 0700 /var/lib/cell0
step install -d -m 0750 /var/log/cell0
if [ ! -e /etc/cell0/cell0.env ]; then
  step install -m 0600 "$here/cell0.env" /etc/cell0/cell0.env
else
  echo "= kept /etc/cell0/cell0.env"
fi
if [ ! -e /etc/cell0/cell0.toml ]; then
  printf '# docs/configuration.md lists every setting.\nname = "%s"\n' "$(hostname -s)" >/etc/cell0/cell0.toml
  echo "+ wrote /etc/cell0/cell0.toml"
else
  echo "= kept /etc/cell0/cell0.toml"
fi
step install -m 0644 "$here/cell0.service" /etc/systemd/system/cell0.service
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  step systemctl daemon-reload
  echo "next: edit /etc/cell0/cell0.env and /etc/cell0/cell0.toml, then: systemctl enable --now cell0"
else
  echo "systemd is not running here: the files are in place for when it is"
fi
