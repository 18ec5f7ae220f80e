#!/usr/bin/env bash
# End-to-end tests of libtriton_pregate.so against a real tritonserver (CI entry point).
# Builds the backend and the CLI, fetches tritonserver, installs the Python clients if missing,
# and runs the pytest suite (it starts its own servers on free loopback ports).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
# One cargo invocation, so both crates share one feature resolution (no second build of the deps).
cargo build --release -p pregate-triton -p pregate-cli >&2
target="${CARGO_TARGET_DIR:-$root/target}"
export PREGATE_TRITONSERVER="$(triton-backend/scripts/fetch-tritonserver.sh)"
export PREGATE_BIN="$target/release/pregate"
export PREGATE_BACKEND_LIB="$target/release/libtriton_pregate.so"
python3 -c "import tritonclient.grpc, requests, pytest" 2>/dev/null ||
  python3 -m pip install -q "tritonclient[grpc]" requests pytest >&2
exec python3 -m pytest -q -x "$root/triton-backend/tests" "$@"
