#!/usr/bin/env bash
# Runs everything CI checks: setup, formatting, lints, docs and the whole test
# suite. Usage: scripts/test.sh [extra nextest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
# The inference tests compare against the real model (verified by sha256).
bash scripts/fetch-model.sh

# Lavapipe warns when XDG_RUNTIME_DIR is unset; give it a private one.
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
  export XDG_RUNTIME_DIR="${TMPDIR:-/tmp}/cell0-xdg-$(id -u)"
  mkdir -p "$XDG_RUNTIME_DIR"
  chmod 700 "$XDG_RUNTIME_DIR"
fi

echo "== fmt"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet
echo "== deploy"
bash scripts/check-deploy.sh
echo "== tests"
cargo nextest run --workspace --locked --profile ci "$@"
