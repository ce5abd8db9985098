#!/usr/bin/env bash
# Generates a Python client from proto/ with grpcio-tools and runs Put/Get and
# server reflection (grpcio-reflection, v1alpha)
# through every given node: scripts/check-python-client.sh 127.0.0.1:7100 127.0.0.1:7200 ...
# The virtual environment is kept in $CELL0_PY_VENV (default /var/tmp/cell0-pyclient-venv).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${CELL0_PY_VENV:-/var/tmp/cell0-pyclient-venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q -r "$root/scripts/pyclient/requirements.txt"
gen="$(mktemp -d)"
trap 'rm -rf "$gen"' EXIT
"$venv/bin/python" -m grpc_tools.protoc -I "$root/proto" --python_out="$gen" --grpc_python_out="$gen" \
  "$root"/proto/cell0/v1/*.proto
touch "$gen/cell0/__init__.py" "$gen/cell0/v1/__init__.py"
PYTHONPATH="$gen" "$venv/bin/python" "$root/scripts/pyclient/kv_check.py" "$@"
