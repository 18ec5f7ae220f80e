#!/usr/bin/env bash
# Serve a pregate model with Triton Inference Server, in the foreground, on 127.0.0.1.
#   triton-backend/serve.sh [--model DIR] [--http-port N] [--grpc-port N] [--metrics-port N]
#                           [--param KEY=VALUE]...   (a model parameter, over the example's)
# Builds the backend and the CLI, fetches tritonserver (PyPI wheel nvidia-pytriton==0.7.0), makes
# the `small` demo model if --model is not given (target/models/small), writes a model repository
# (a temporary folder, removed on exit) and starts tritonserver: a KIND_GPU instance when nvidia-smi
# sees a GPU, KIND_CPU otherwise. Prints `pregate: ready` once this server answers; exits non-zero
# if it fails, and stops it on Ctrl-C or SIGTERM.
# PREGATE_TRITONSERVER, PREGATE_BIN and PREGATE_BACKEND_LIB (all three) use those files instead of
# building and fetching (as triton-backend/tests/run.sh sets them).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
model="" http=8000 grpc=8001 metrics=8002
params=()
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --http-port) http="$2"; shift 2 ;;
    --grpc-port) grpc="$2"; shift 2 ;;
    --metrics-port) metrics="$2"; shift 2 ;;
    --param)
      case "$2" in
        [a-z]*=*) params+=("$2") ;;
        *) echo "serve.sh: --param takes KEY=VALUE, got '$2'" >&2; exit 2 ;;
      esac
      shift 2 ;;
    -h|--help) sed -n 2,11p "$0"; exit 0 ;;
    *) echo "serve.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
for p in "$http" "$grpc" "$metrics"; do
  case "$p" in
    ''|*[!0-9]*) echo "serve.sh: port '$p' is not a number" >&2; exit 2 ;;
  esac
done

# Whether something already listens on 127.0.0.1:$1 (or holds it so a server cannot bind it).
port_taken() {
  python3 - "$1" <<'EOF'
import socket, sys
s = socket.socket()
# As servers bind: a port with only closing connections on it is free.
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(0)
sys.exit(1)
EOF
}
# Refuse before building anything: another server on a port would answer for this one.
for pair in "http:$http" "grpc:$grpc" "metrics:$metrics"; do
  kind="${pair%%:*}" port="${pair#*:}"
  if port_taken "$port"; then
    echo "serve.sh: the $kind port $port on 127.0.0.1 is already in use (another server?);" \
      "stop it or choose another port with --$kind-port N" >&2
    exit 1
  fi
done
if [ "$http" = "$grpc" ] || [ "$http" = "$metrics" ] || [ "$grpc" = "$metrics" ]; then
  echo "serve.sh: the HTTP, gRPC and metrics ports must differ ($http, $grpc, $metrics)" >&2
  exit 2
fi

cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"
if [ -n "${PREGATE_TRITONSERVER:-}" ] && [ -n "${PREGATE_BIN:-}" ] && [ -n "${PREGATE_BACKEND_LIB:-}" ]; then
  server="$PREGATE_TRITONSERVER" pregate="$PREGATE_BIN" lib="$PREGATE_BACKEND_LIB"
else
  cargo build --release -p pregate-triton -p pregate-cli >&2
  server="$(triton-backend/scripts/fetch-tritonserver.sh)"
  pregate="$target/release/pregate" lib="$target/release/libtriton_pregate.so"
fi
if [ -z "$model" ]; then
  # Under target/ (ignored by git): no model file lands in the work tree.
  model="$root/target/models/small"
  [ -f "$model/config.json" ] || "$pregate" make-model --preset small --out "$model" >&2
fi
model="$(cd "$model" && pwd)"
name="pregate"

# A repository of this server's own, so two servers never overwrite each other's backend library.
work="$(mktemp -d "${TMPDIR:-/tmp}/pregate-serve.XXXXXX")"
pid=""
stop() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    # Triton can take a few seconds to exit (--exit-timeout-secs); then it is killed.
    for _ in $(seq 1 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
repo="$work/repo"
mkdir -p "$repo/$name/1" "$work/backends/pregate"
cp "$lib" "$work/backends/pregate/libtriton_pregate.so"
kind="KIND_CPU"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "^GPU 0"; then
  kind="KIND_GPU"
fi
echo "pregate: instance kind $kind" >&2
if [ "$kind" = KIND_CPU ]; then
  echo "pregate: no GPU here, so the CUDA, NVML and DCGM errors tritonserver prints next are" \
    "harmless: the model is served on the CPU" >&2
fi
sed -e "s|@MODEL_DIR@|$model|; s|@NAME@|$name|" \
  -e "s|instance_group \[ { count: 1 kind: KIND_CPU } \]|instance_group [ { count: 1 kind: $kind } ]|" \
  triton-backend/model_repository/pregate/config.pbtxt > "$repo/$name/config.pbtxt"
for kv in ${params[@]+"${params[@]}"}; do
  key="${kv%%=*}" value="${kv#*=}"
  # A key the example sets is replaced, any other added; the backend refuses unknown keys.
  sed -i "/parameters { key: \"$key\" /d" "$repo/$name/config.pbtxt"
  echo "parameters { key: \"$key\" value: { string_value: \"$value\" } }" >> "$repo/$name/config.pbtxt"
done

# Whether process $1 listens on TCP port $2: the listening socket's inode among its open files
# (Linux /proc). Where /proc cannot tell, true: the liveness check still holds.
listens() {
  local hex inodes i
  [ -r /proc/net/tcp ] && [ -d "/proc/$1/fd" ] || return 0
  hex="$(printf ':%04X' "$2")"
  inodes="$(awk -v p="$hex" '$4 == "0A" && substr($2, length($2) - 4) == p { print $10 }' \
    /proc/net/tcp /proc/net/tcp6 2>/dev/null)"
  for i in $inodes; do
    find "/proc/$1/fd" -lname "socket:\[$i\]" 2>/dev/null | grep -q . && return 0
  done
  return 1
}

# In the background so that this script can watch it; Ctrl-C reaches it through the traps (a
# background job of a script ignores SIGINT).
"$server" --model-repository="$repo" --backend-directory="$work/backends" \
  --http-address=127.0.0.1 --grpc-address=127.0.0.1 --http-port="$http" --grpc-port="$grpc" \
  --metrics-port="$metrics" --exit-timeout-secs=5 &
pid=$!
url="http://127.0.0.1:$http/v2/models/$name/generate_stream"
ready=0
for _ in $(seq 1 600); do
  if ! kill -0 "$pid" 2>/dev/null; then
    break
  fi
  if curl -sf "http://127.0.0.1:$http/v2/models/$name/ready" >/dev/null 2>&1 &&
    kill -0 "$pid" 2>/dev/null && listens "$pid" "$http"; then
    ready=1
    break
  fi
  sleep 0.2
done
if [ "$ready" = 1 ]; then
  echo "pregate: ready: $url"
  echo "try: curl -N -X POST $url -d '{\"text_input\": \"Once upon a time\", \"stream\": true, \"sampling_parameters\": \"{\\\"max_tokens\\\": 32}\"}'"
  echo "metrics: http://127.0.0.1:$metrics/metrics (pregate_*)"
elif kill -0 "$pid" 2>/dev/null; then
  echo "pregate: the server did not become ready in 120 s; stopping it" >&2
  exit 1
fi
status=0
wait "$pid" || status=$?
pid=""
if [ "$ready" = 0 ]; then
  echo "pregate: tritonserver exited (status $status) before it was ready; see its log above" >&2
  [ "$status" != 0 ] || status=1
fi
exit "$status"
