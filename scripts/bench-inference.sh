#!/usr/bin/env bash
# Measures the inference engine against PyTorch on this machine, in one run:
# `cell0 bench infer` (CPU engine and wgpu) and sentence-transformers on
# PyTorch CPU with 2 threads (scripts/inference/bench_pytorch.py, in a venv
# with the pinned versions of scripts/inference/requirements.txt), then prints
# one markdown table of embeddings/s per case and the matmul GFLOP/s.
#
# Usage: scripts/bench-inference.sh [--quick]   (--quick: 0.5 s per case instead of 2 s)
# Env: CARGO_TARGET_DIR (where the release cell0 is built), CELL0_BENCH_VENV
# (default /tmp/cell0-infer-venv), CELL0_BENCH_OUT (default: a temp dir).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
venv="${CELL0_BENCH_VENV:-/tmp/cell0-infer-venv}"
out="${CELL0_BENCH_OUT:-$(mktemp -d)}"
mkdir -p "$out"
min_seconds=2
[ "${1:-}" = "--quick" ] && min_seconds=0.5
# Lavapipe warns when XDG_RUNTIME_DIR is unset; give it a private one.
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
  export XDG_RUNTIME_DIR="${TMPDIR:-/tmp}/cell0-xdg-$(id -u)"
  mkdir -p "$XDG_RUNTIME_DIR"
  chmod 700 "$XDG_RUNTIME_DIR"
fi

bash "$root/scripts/setup.sh"
bash "$root/scripts/fetch-model.sh"
echo "building cell0 (release)"
(cd "$root" && CARGO_TARGET_DIR="$target_dir" cargo build --release --locked -p cell0)
if [ ! -x "$venv/bin/python" ]; then
  echo "creating $venv with the pinned PyTorch environment"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --disable-pip-version-check -q -r "$root/scripts/inference/requirements.txt"
fi

echo "[1/2] cell0 bench infer (cpu, wgpu)"
(cd "$root" && "$target_dir/release/cell0" bench infer --min-seconds "$min_seconds" --output json >"$out/cell0.json")
echo "[2/2] PyTorch CPU, 2 threads"
"$venv/bin/python" "$root/scripts/inference/bench_pytorch.py" --min-seconds "$min_seconds" >"$out/pytorch.json"

python3 - "$out/cell0.json" "$out/pytorch.json" <<'PY'
import json, sys, datetime
cell0 = json.load(open(sys.argv[1]))
torch = json.load(open(sys.argv[2]))
cols = [(b["info"]["backend"] + " (" + b["info"]["adapter"] + ")", {(e["batch"], e["tokens"]): e["embeddings_per_sec"] for e in b["embed"]}) for b in cell0["backends"]]
cols.append(("PyTorch CPU %d threads (torch %s)" % (torch["threads"], torch["torch"]), {(e["batch"], e["tokens"]): e["embeddings_per_sec"] for e in torch["embed"]}))
print("\nDate: %s UTC, %d CPUs\n" % (datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M"), cell0["cpus"]))
print("| batch x tokens | " + " | ".join(c[0] for c in cols) + " |")
print("| --- |" + " ---: |" * len(cols))
for key in sorted({k for _, c in cols for k in c}, key=lambda k: (k[1], k[0])):
    print("| %d x %d | " % key + " | ".join("%.1f" % c[key] if key in c else "-" for _, c in cols) + " |")
print("\n| matmul n | " + " | ".join(b["info"]["backend"] for b in cell0["backends"]) + " |")
print("| ---: |" + " ---: |" * len(cell0["backends"]))
sizes = sorted({m["size"] for b in cell0["backends"] for m in b["matmul"]})
for n in sizes:
    print("| %d | " % n + " | ".join(next(("%.1f GFLOP/s" % m["gflops"] for m in b["matmul"] if m["size"] == n), "-") for b in cell0["backends"]) + " |")
PY
echo
echo "raw reports: $out/cell0.json $out/pytorch.json"
