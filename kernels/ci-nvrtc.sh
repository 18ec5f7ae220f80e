#!/usr/bin/env bash
# CI check without a GPU: compile every pregate kernel with NVRTC for sm_80, sm_89 and sm_90.
#
# Installs the CUDA 13.0 NVRTC library and headers from PyPI (nvidia-cuda-nvrtc,
# nvidia-cuda-runtime) into a cache folder once, then runs
# `cargo test -p pregate-kernels --test nvrtc_compile` with PREGATE_REQUIRE_NVRTC=1 (so a broken
# setup fails instead of skipping). Idempotent; safe to call from .ci/run.
#
# Environment: PREGATE_CUDA_WHEEL_VERSION (default 13.0.88, the H100 host's CUDA 13.0),
# PREGATE_CUDA_WHEELS (install folder; default ~/.cache/pregate/cuda-wheels-<version>).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
ver="${PREGATE_CUDA_WHEEL_VERSION:-13.0.88}"
dir="${PREGATE_CUDA_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/pregate/cuda-wheels-$ver}"
lib="$dir/nvidia/cu13/lib"
inc="$dir/nvidia/cu13/include"

if [ ! -f "$lib/libnvrtc.so.13" ] || [ ! -f "$inc/cuda_bf16.h" ]; then
    echo "ci-nvrtc: installing nvidia-cuda-nvrtc==$ver nvidia-cuda-runtime==$ver into $dir"
    tmp="$dir.tmp.$$"
    rm -rf "$tmp"
    mkdir -p "$(dirname "$dir")"
    if ! python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$tmp" \
        "nvidia-cuda-nvrtc==$ver" "nvidia-cuda-runtime==$ver"; then
        rm -rf "$tmp"
        echo "ci-nvrtc: FAILED to install the NVRTC wheels (is PyPI reachable?)" >&2
        exit 1
    fi
    rm -rf "$dir"
    mv "$tmp" "$dir"
fi

export PREGATE_NVRTC_LIB="$lib"
export PREGATE_CUDA_INCLUDE="$inc"
export PREGATE_REQUIRE_NVRTC=1
cd "$root"
cargo test --release -p pregate-kernels --test nvrtc_compile -- --nocapture
