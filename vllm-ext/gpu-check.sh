#!/usr/bin/env bash
# GPU check of pregate_vllm's ops (libpregate.so's CUDA service through torch), in two steps:
#
#   vllm-ext/gpu-check.sh stage [DIR]   on a build machine (needs cargo): builds libpregate.so and
#                                       copies it, the pure-Python package and the check script to
#                                       DIR (default .device/vllm; a few MiB).
#   vllm-ext/gpu-check.sh [run] [DIR]   on the GPU host (torch, no vLLM, no Rust, no network): runs
#                                       tests/gpu_check.py against the staged library: the ops on
#                                       CUDA (f32, bf16; all experts resident and fewer slots)
#                                       against a dense CPU reference, a non-default stream behind
#                                       a long matmul, the slot pool in torch's allocator, per-call
#                                       overhead at one token, prefetch overlap; per-layer steps
#                                       (begin_step, moe_layer_routed) with speculative prefetch
#                                       against the reference, and the overlap of speculative loads
#                                       with compute against on-demand loading. Without a GPU the
#                                       CUDA checks SKIP and the CPU ones run (the rehearsal).
#
# The log and a results table go to PREGATE_GPU_LOG_DIR, else $OUT, else .device/out. The checks
# run under PREGATE_PYTHON (default python3), which must have torch; a rehearsal on a machine
# whose python3 has none can point it at another environment (the tier-1 one, for instance).
# Exit status: 0 when no check failed; 3 when nothing ran because that Python has no torch.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
mode=run
case "${1:-}" in
    stage|run) mode="$1"; shift ;;
esac
dir="${1:-$root/.device/vllm}"

if [ "$mode" = stage ]; then
    set -e
    cd "$root"
    lib="$(cargo build --release -p pregate-adapters --message-format=json 2>/dev/null |
        python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line) if line.startswith("{") else {}
    if m.get("reason") == "compiler-artifact" and "cdylib" in m["target"]["kind"]:
        print(next(f for f in m["filenames"] if f.endswith(".so")))
')"
    rm -rf "$dir"
    mkdir -p "$dir/pregate_vllm"
    cp vllm-ext/pregate_vllm/*.py "$dir/pregate_vllm/"
    cp "$lib" "$dir/pregate_vllm/libpregate.so"
    if command -v strip >/dev/null; then strip --strip-debug "$dir/pregate_vllm/libpregate.so"; fi
    cp vllm-ext/tests/gpu_check.py "$dir/"
    echo "staged $dir ($(du -sh "$dir" | cut -f1)) <- $lib"
    exit 0
fi

log_dir="${PREGATE_GPU_LOG_DIR:-${OUT:-$root/.device/out}}"
mkdir -p "$log_dir"
log="$log_dir/vllm-gpu-check.log"
table="$log_dir/vllm-gpu-check-results.txt"
if [ ! -f "$dir/gpu_check.py" ]; then
    echo "vllm gpu-check: nothing staged in $dir (run '$0 stage' on a build machine first)" | tee "$log"
    exit 2
fi
cuda_root="${CUDA_HOME:-/usr/local/cuda}"
export PREGATE_CUDA_INCLUDE="${PREGATE_CUDA_INCLUDE:-$cuda_root/include}"
for d in "$cuda_root/lib64" "$cuda_root/targets/x86_64-linux/lib"; do
    [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
export PREGATE_KERNEL_CACHE="${PREGATE_KERNEL_CACHE:-$log_dir/kernel-cache}"
export PREGATE_LIB="$dir/pregate_vllm/libpregate.so"
py="${PREGATE_PYTHON:-python3}"
if ! "$py" -c "import torch" >/dev/null 2>&1; then
    echo "SKIP: $py has no torch; the pregate_vllm checks did not run (set PREGATE_PYTHON)" | tee "$log"
    exit 3
fi
PYTHONPATH="$dir${PYTHONPATH:+:$PYTHONPATH}" "$py" "$dir/gpu_check.py" >"$log" 2>&1
rc=$?
{
    echo "pregate_vllm GPU check ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
    grep "^# torch" "$log"
    python3 -c '
import json, sys
for line in open(sys.argv[1]):
    if line.startswith("RESULT "):
        r = json.loads(line[7:])
        row = (r["status"], r["name"], r.get("seconds", 0), r.get("note", ""))
        print("%-6s %-48s %7.2fs  %s" % row)
' "$log"
    grep -E "^# [0-9]+ passed" "$log" || echo "the check script ended early (exit $rc): see $log"
} | tee "$table"
exit $rc
