#!/usr/bin/env bash
# KIND_GPU smoke test of libtriton_pregate.so in the real Triton 2.51 (nvidia-pytriton 0.7.0 wheel),
# for a GPU host with no Rust and no network, in two steps:
#
#   gpu-smoke.sh stage [DIR]   on a build machine: bundle the wheel, the stripped backend and a tiny
#                              model (with its CPU greedy output for comparison) into DIR
#                              (default .device/triton)
#   gpu-smoke.sh run [DIR]     on the GPU host: start tritonserver with a KIND_GPU instance of the
#                              model, stream one greedy generation over HTTP, print the server's
#                              device log lines, pregate's metrics and whether the tokens match.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
mode="${1:-run}"
dir="${2:-$root/.device/triton}"

if [ "$mode" = stage ]; then
    mkdir -p "$dir"
    cd "$root"
    cargo build --release -p pregate-triton -p pregate-cli >&2
    server="$(triton-backend/scripts/fetch-tritonserver.sh)"
    cp "$(dirname "$server")"/../../../wheel/nvidia_pytriton-0.7.0-*.whl "$dir/"
    # Compressed: the device runner carries at most 64 MiB, and the wheel alone is 53 MiB.
    strip --strip-debug -o "$dir/libtriton_pregate.so" target/release/libtriton_pregate.so
    rm -f "$dir/libtriton_pregate.so.xz"
    xz -9 "$dir/libtriton_pregate.so"
    rm -rf "$dir/model"
    target/release/pregate make-model --preset tiny --seed 5 --out "$dir/model" >&2
    target/release/pregate generate --model "$dir/model" --prompt-ids 1,300,301,302 \
        --max-new-tokens 16 --ignore-eos --json --device cpu >"$dir/cpu.json"
    du -sh "$dir"
    exit 0
fi

dir="$(cd "$dir" && pwd)"
work="$(mktemp -d)"
trap 'kill "${pid:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
python3 -m zipfile -e "$dir"/nvidia_pytriton-0.7.0-*.whl "$work/triton" >/dev/null
server="$work/triton/pytriton/tritonserver/bin/tritonserver"
chmod +x "$server"
mkdir -p "$work/backends/pregate" "$work/repo/tiny/1"
python3 -c 'import lzma, sys; open(sys.argv[2], "wb").write(lzma.open(sys.argv[1]).read())' \
    "$dir/libtriton_pregate.so.xz" "$work/backends/pregate/libtriton_pregate.so"
sed -e "s|@MODEL_DIR@|$dir/model|; s|@NAME@|tiny|" \
    -e 's|instance_group \[ { count: 1 kind: KIND_CPU } \]|instance_group [ { count: 1 kind: KIND_GPU gpus: [ 0 ] } ]|' \
    "$root/triton-backend/model_repository/pregate/config.pbtxt" >"$work/repo/tiny/config.pbtxt"
grep -n "KIND_GPU" "$work/repo/tiny/config.pbtxt"
"$server" --model-repository="$work/repo" --backend-directory="$work/backends" \
    --http-address=127.0.0.1 --http-port=18900 --grpc-port=18901 --metrics-port=18902 \
    --log-verbose=0 >"$work/server.log" 2>&1 &
pid=$!
for _ in $(seq 1 300); do
    curl -sf http://127.0.0.1:18900/v2/models/tiny/ready >/dev/null 2>&1 && break
    sleep 0.2
done
curl -sf http://127.0.0.1:18900/v2/models/tiny/ready >/dev/null || {
    echo "server not ready"
    cat "$work/server.log"
    exit 1
}
echo "== server ready with a KIND_GPU instance"
curl -sN -X POST http://127.0.0.1:18900/v2/models/tiny/generate_stream \
    -d '{"input_ids": [1, 300, 301, 302], "stream": true, "sampling_parameters": "{\"max_tokens\": 16, \"ignore_eos\": true}"}' \
    >"$work/stream.txt"
python3 - "$work/stream.txt" "$dir/cpu.json" <<'PY'
import json, sys
ids = []
for line in open(sys.argv[1]):
    if line.startswith("data:"):
        got = json.loads(line[5:]).get("output_ids", [])
        ids += got if isinstance(got, list) else [got]
cpu = json.load(open(sys.argv[2]))["output_ids"]
print("gpu stream :", ids)
print("cpu engine :", cpu)
print("tokens equal to the CPU engine:", ids == cpu, f"({sum(a == b for a, b in zip(ids, cpu))}/{len(cpu)} positions)")
PY
echo "== server log (device, pregate, errors)"
grep -iE "pregate|cuda|device|error" "$work/server.log" | head -30
echo "== metrics"
curl -s http://127.0.0.1:18902/metrics | grep -E "^pregate_|^nv_gpu_utilization" | head -30
