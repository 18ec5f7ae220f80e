#!/usr/bin/env bash
# Serve a pregate model with Triton Inference Server, in the foreground, on 127.0.0.1.
#   triton-backend/serve.sh [--model DIR] [--http-port N] [--grpc-port N] [--metrics-port N]
# Builds the backend and the CLI, fetches tritonserver (PyPI wheel nvidia-pytriton==0.7.0), makes
# the `small` demo model if --model is not given (target/models/small), writes a model repository
# (target/triton-repo) and starts tritonserver: a KIND_GPU instance when nvidia-smi sees a GPU,
# KIND_CPU otherwise.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
model="" http=8000 grpc=8001 metrics=8002
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --http-port) http="$2"; shift 2 ;;
    --grpc-port) grpc="$2"; shift 2 ;;
    --metrics-port) metrics="$2"; shift 2 ;;
    -h|--help) sed -n 2,6p "$0"; exit 0 ;;
    *) echo "serve.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
cd "$root"
cargo build --release -p pregate-triton -p pregate-cli >&2
target="${CARGO_TARGET_DIR:-$root/target}"
server="$(triton-backend/scripts/fetch-tritonserver.sh)"
if [ -z "$model" ]; then
  model="$root/target/models/small"
  [ -f "$model/config.json" ] || "$target/release/pregate" make-model --preset small --out "$model" >&2
fi
model="$(cd "$model" && pwd)"
name="pregate"
repo="$root/target/triton-repo"
rm -rf "$repo" && mkdir -p "$repo/$name/1" "$root/target/triton-backends/pregate"
cp "$target/release/libtriton_pregate.so" "$root/target/triton-backends/pregate/"
kind="KIND_CPU"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "^GPU 0"; then
  kind="KIND_GPU"
fi
echo "pregate: instance kind $kind" >&2
sed -e "s|@MODEL_DIR@|$model|; s|@NAME@|$name|" \
  -e "s|instance_group \[ { count: 1 kind: KIND_CPU } \]|instance_group [ { count: 1 kind: $kind } ]|" \
  triton-backend/model_repository/pregate/config.pbtxt > "$repo/$name/config.pbtxt"
url="http://127.0.0.1:$http/v2/models/$name/generate_stream"
(
  for _ in $(seq 1 600); do
    if curl -sf "http://127.0.0.1:$http/v2/models/$name/ready" >/dev/null 2>&1; then
      echo "pregate: ready: $url"
      echo "try: curl -N -X POST $url -d '{\"text_input\": \"Once upon a time\", \"stream\": true, \"sampling_parameters\": \"{\\\"max_tokens\\\": 32}\"}'"
      echo "metrics: http://127.0.0.1:$metrics/metrics (pregate_*)"
      exit 0
    fi
    sleep 0.2
  done
  echo "pregate: the server did not become ready" >&2
) &
exec "$server" --model-repository="$repo" --backend-directory="$root/target/triton-backends" \
  --http-address=127.0.0.1 --grpc-address=127.0.0.1 --http-port="$http" --grpc-port="$grpc" \
  --metrics-port="$metrics" --exit-timeout-secs=5
