#!/usr/bin/env bash
# Tier 1 of pregate_vllm: torch and libpregate.so, no vLLM. Sets up (or reuses) a virtual
# environment with torch under a cache folder, builds libpregate.so and the pregate CLI, installs
# the package into the environment, and runs the tests.
#
#   vllm-ext/tests/run.sh [pytest args]
#
# PREGATE_TORCH_VENV: the environment (default ~/.cache/pregate/venv-torch-2.13.0).
# Skips, saying why, only when torch cannot be installed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
torch_version=2.13.0
venv="${PREGATE_TORCH_VENV:-$HOME/.cache/pregate/venv-torch-$torch_version}"

if ! "$venv/bin/python" -c "import torch, pytest, safetensors" 2>/dev/null; then
    echo "== setting up $venv (torch $torch_version from PyPI: several GB on first use)"
    python3 -m venv "$venv"
    if ! "$venv/bin/pip" install -q --disable-pip-version-check "torch==$torch_version" \
        pytest numpy safetensors setuptools; then
        echo "SKIPPED: torch $torch_version could not be installed into $venv; tier-1 tests not run"
        exit 0
    fi
fi
py="$venv/bin/python"

echo "== building libpregate.so and the pregate CLI"
cargo build --release -q -p pregate-adapters -p pregate-cli
echo "== installing pregate-vllm into $venv"
"$py" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps \
    --force-reinstall ./vllm-ext
# Test the installed package, not the source tree: run from a folder without pregate_vllm in it.
cd "$root/vllm-ext/tests"
PREGATE_BIN="$root/target/release/pregate" exec "$py" -m pytest -q -p no:cacheprovider \
    --rootdir "$root/vllm-ext" "$@" .
