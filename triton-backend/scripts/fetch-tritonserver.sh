#!/usr/bin/env bash
# Fetches Triton Inference Server 2.51 (bundled in the PyPI wheel nvidia-pytriton==0.7.0) into
# DIR (default: target/tritonserver) and prints the path of the tritonserver binary.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
dir="${1:-$root/target/tritonserver}"
bin="$dir/pytriton/tritonserver/bin/tritonserver"
if [ ! -x "$bin" ]; then
  mkdir -p "$dir"
  python3 -m pip download -q nvidia-pytriton==0.7.0 --no-deps -d "$dir/wheel" >&2
  # zipfile loses the exec bits; the bin <-> nvidia_pytriton.libs layout (RPATH) is kept.
  python3 -m zipfile -e "$dir"/wheel/nvidia_pytriton-0.7.0-*.whl "$dir" >&2
  chmod +x "$bin"
fi
echo "$bin"
