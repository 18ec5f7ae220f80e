#!/usr/bin/env bash
# GPU check of pregate-kernels, in two steps:
#
#   kernels/gpu-check.sh stage [BIN_DIR]   on a build machine (needs cargo): builds the test
#                                          binaries in release mode and copies them to BIN_DIR
#                                          (default .device/bin), named after their test target.
#   kernels/gpu-check.sh [run] [BIN_DIR]   on the GPU host (no Rust, no network): runs every test
#                                          of every staged binary one at a time (the device tests:
#                                          one per device present, `NAME::cpu`, `NAME::cuda:N`),
#                                          writes a log and prints a results table. A test its
#                                          binary reports as ignored (a CUDA test on a host without
#                                          a CUDA device, or without NVRTC) is SKIP, not PASS.
#   kernels/gpu-check.sh all [BIN_DIR]     on the GPU host: the tests, then every benchmark (the
#                                          `gpu` bench binary staged in BIN_DIR/../bench and the
#                                          PyTorch baselines in kernels/bench/), with RESULT lines
#                                          collected into gpu-bench-results.txt. PREGATE_BENCH_LAYERS
#                                          (default 32) sets the layers of the readme-7b model the
#                                          decode benchmarks generate under PREGATE_BENCH_MODEL_DIR
#                                          (default /tmp/pregate-readme7b); PREGATE_BENCH_QUICK=1
#                                          runs fewer sizes; PREGATE_BENCH_SKIP="WORD ..." skips the
#                                          steps whose command line contains a WORD.
#   kernels/gpu-check.sh bench [BIN_DIR]   the benchmarks only.
#   kernels/gpu-check.sh mixtral [BIN_DIR] only the offloaded decode of a Mixtral-8x7B-shaped model
#                                          (also the last step of `bench`): PREGATE_BENCH_MIXTRAL_LAYERS
#                                          (default 8; 2.8 GB of experts each) layers generated under
#                                          PREGATE_BENCH_MIXTRAL_DIR (default /tmp/pregate-mixtral),
#                                          capacities PREGATE_BENCH_MIXTRAL_CAPS (default 2,3,4,5,6),
#                                          each LRU on demand and with speculative prefetch, and
#                                          all resident, PREGATE_BENCH_MIXTRAL_STEPS (16) steps each;
#                                          each of its two steps is killed after
#                                          PREGATE_BENCH_MIXTRAL_SECONDS (default 240).
#
# Run-time environment: CUDA headers from PREGATE_CUDA_INCLUDE (default /usr/local/cuda/include),
# NVRTC and cuBLAS from /usr/local/cuda/lib64 (prepended to LD_LIBRARY_PATH), the log under
# PREGATE_GPU_LOG_DIR, else $OUT (the device runner's output folder), else .device/out.
# Exit status: 0 when no test failed.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
mode="run"
case "${1:-}" in
    stage|run|all|bench|mixtral) mode="$1"; shift ;;
esac
bin_dir="${1:-$root/.device/bin}"

if [ "$mode" = stage ]; then
    set -e
    mkdir -p "$bin_dir"
    cd "$root"
    # Each test executable, with the name of its target (gpu_kernels, nvrtc_compile, the lib's units).
    cargo test -p pregate-kernels --release --no-run --message-format=json 2>/dev/null |
        python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m.get("profile", {}).get("test"):
        t = m["target"]
        name = "unit_" + t["name"].replace("-", "_") if t["kind"] == ["lib"] else t["name"]
        print(name, m["executable"])
' | while read -r name exe; do
        cp "$exe" "$bin_dir/$name"
        # Debug info is most of the size; the device runner carries at most 64 MiB.
        if command -v strip >/dev/null; then strip --strip-debug "$bin_dir/$name"; fi
        echo "staged $bin_dir/$name  <- $exe"
    done
    # The CUDA engine's GPU tests (crate pregate: Read-ME models, the expert runtime, the Hugging
    # Face families on their transformers fixtures) and the GPU benchmark binary (pregate-benches).
    bench_dir="$(dirname "$bin_dir")/bench"
    mkdir -p "$bench_dir"
    cargo build -p pregate -p pregate-benches --release --test gpu_engine --test gpu_moe --test gpu_families --bench gpu --message-format=json 2>/dev/null |
        python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in ("gpu_engine", "gpu_moe", "gpu_families", "gpu"):
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do
        if [ "$name" = gpu ]; then dst="$bench_dir/gpu"; else dst="$bin_dir/$name"; fi
        cp "$exe" "$dst"
        if command -v strip >/dev/null; then strip --strip-debug "$dst"; fi
        echo "staged $dst  <- $exe"
    done
    # pregate_vllm's ops through libpregate.so (vllm-ext/gpu-check.sh), run by the same call.
    bash "$root/vllm-ext/gpu-check.sh" stage "$(dirname "$bin_dir")/vllm"
    exit 0
fi

log_dir="${PREGATE_GPU_LOG_DIR:-${OUT:-$root/.device/out}}"
mkdir -p "$log_dir"
log="$log_dir/gpu-check.log"
table="$log_dir/gpu-check-results.txt"
: >"$log"

cuda_root="${CUDA_HOME:-/usr/local/cuda}"
export PREGATE_CUDA_INCLUDE="${PREGATE_CUDA_INCLUDE:-$cuda_root/include}"
for d in "$cuda_root/lib64" "$cuda_root/targets/x86_64-linux/lib"; do
    [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
export PREGATE_KERNEL_CACHE="${PREGATE_KERNEL_CACHE:-$log_dir/kernel-cache}"
# On a GPU host a missing NVRTC is a failure; a rehearsal on a machine without a GPU (no
# nvidia-smi) reports the NVRTC tests as skipped instead.
if command -v nvidia-smi >/dev/null; then
    export PREGATE_REQUIRE_NVRTC="${PREGATE_REQUIRE_NVRTC:-1}"
fi
export RUST_BACKTRACE=1

{
    echo "# pregate-kernels GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    else
        echo "nvidia-smi unavailable"
    fi
    echo "PREGATE_CUDA_INCLUDE=$PREGATE_CUDA_INCLUDE"
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
    echo "binaries: $bin_dir"
} >>"$log"

bench_bin="$(dirname "$bin_dir")/bench/gpu"
blog="$log_dir/gpu-bench.log"

bstep() {
    # PREGATE_BENCH_SKIP: space-separated words; a step whose command line has one is skipped.
    for sk in ${PREGATE_BENCH_SKIP:-}; do
        case "$*" in *"$sk"*) echo "=== skipped: $*" | tee -a "$blog"; return ;; esac
    done
    echo "=== $* ($(date -u +%H:%M:%S))" | tee -a "$blog"
    "$@" 2>&1 | tee -a "$blog" | grep -E "^(RESULT|SKIP|error|load|torch load)" || true
}

# Offloaded decode of a Mixtral-8x7B-shaped model (each layer routes itself on the device), each
# step under a time bound: time on a GPU machine is short. Eleven setups of about 22 steps (LRU
# and speculative at five capacities, all resident), well under a second per step at 2 slots on
# a PCIe 5 link, after packing the pinned copy: inside the 240 s bound.
run_mixtral_bench() {
    local mixdir="${PREGATE_BENCH_MIXTRAL_DIR:-/tmp/pregate-mixtral}"
    local secs="${PREGATE_BENCH_MIXTRAL_SECONDS:-240}"
    chmod +x "$bench_bin" 2>/dev/null || true
    if [ ! -f "$mixdir/config.json" ]; then
        # Made aside and moved once complete, so that a step killed by its bound leaves no half
        # model behind.
        rm -rf "$mixdir.tmp"
        bstep timeout "$secs" "$bench_bin" make-mixtral "$mixdir.tmp" "${PREGATE_BENCH_MIXTRAL_LAYERS:-8}"
        if grep -q "^RESULT make_mixtral" "$blog"; then mv "$mixdir.tmp" "$mixdir"; fi
    fi
    bstep timeout "$secs" "$bench_bin" mixtral-offload "$mixdir" \
        "${PREGATE_BENCH_MIXTRAL_CAPS:-2,3,4,5,6}" "${PREGATE_BENCH_MIXTRAL_STEPS:-16}"
}

if [ "$mode" = mixtral ]; then
    : >"$blog"
    run_mixtral_bench
    grep -h "^RESULT" "$blog" | sed 's/^RESULT //' | tee "$log_dir/gpu-mixtral-results.txt"
    exit 0
fi

run_benches() {
    local results="$log_dir/gpu-bench-results.txt"
    local layers="${PREGATE_BENCH_LAYERS:-32}"
    local mdir="${PREGATE_BENCH_MODEL_DIR:-/tmp/pregate-readme7b}"
    local quick=""
    [ "${PREGATE_BENCH_QUICK:-0}" = 1 ] && quick="--quick"
    chmod +x "$bench_bin" 2>/dev/null || true
    : >"$blog"
    bstep "$bench_bin" expert-layer $quick
    bstep python3 "$here/bench/moe_torch.py" $quick
    bstep "$bench_bin" loads
    if [ ! -f "$mdir/config.json" ]; then
        bstep "$bench_bin" make-model "$mdir" "$layers"
    fi
    bstep "$bench_bin" decode "$mdir" "${PREGATE_BENCH_BATCHES:-1,8,32}" "${PREGATE_BENCH_STEPS:-32}"
    bstep python3 "$here/bench/decode_torch.py" "$mdir" "${PREGATE_BENCH_BATCHES:-1,8,32}" "${PREGATE_BENCH_STEPS:-32}"
    # The router's cost grows with the context: the same decode after 1024-token prompts, the
    # router on the host beside the router on the device.
    PREGATE_BENCH_PROMPT="${PREGATE_BENCH_LONG_PROMPT:-1024}" bstep "$bench_bin" decode "$mdir" \
        "${PREGATE_BENCH_LONG_BATCHES:-8,32}" "${PREGATE_BENCH_STEPS:-32}"
    # Offloaded decode: the engine's router routes, then synthetic Read-ME routes (the replay's
    # expert model, 2921/4096 tokens keeping the previous token's expert): PREGATE_BENCH_SYNTH_REQS
    # requests of PREGATE_BENCH_SYNTH_TOKENS tokens, batch 1.
    bstep "$bench_bin" offload "$mdir" "${PREGATE_BENCH_CAPS:-2,3,4,5}" "${PREGATE_BENCH_STEPS:-32}" 1 \
        "${PREGATE_BENCH_SYNTH_REQS:-8}" "${PREGATE_BENCH_SYNTH_TOKENS:-64}"
    run_mixtral_bench
    {
        echo "pregate GPU benchmarks ($(date -u +%Y-%m-%dT%H:%M:%SZ)), readme-7b layers=$layers"
        head -3 "$log" | tail -2
        grep -h "^RESULT" "$blog" | sed 's/^RESULT //'
    } | tee "$results"
}

if [ "$mode" = bench ]; then
    run_benches
    exit 0
fi

pass=0 fail=0 skip=0
rows=()
shopt -s nullglob
bins=("$bin_dir"/*)
if [ ${#bins[@]} -eq 0 ]; then
    echo "gpu-check: no binaries in $bin_dir (run '$0 stage' on a build machine first)" | tee -a "$log"
    exit 2
fi
for bin in "${bins[@]}"; do
    [ -x "$bin" ] || chmod +x "$bin" 2>/dev/null || true
    suite="$(basename "$bin")"
    mapfile -t tests < <("$bin" --list 2>/dev/null | sed -n 's/: test$//p')
    for t in "${tests[@]}"; do
        start=$(date +%s.%N)
        out="$("$bin" --exact "$t" --nocapture --test-threads=1 2>&1)"
        rc=$?
        # The harness's summary (libtest and libtest-mimic print the same line).
        summary="$(echo "$out" | grep -m1 "^test result:")"
        secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN{printf "%.2f", b-a}')
        {
            echo
            echo "=== $suite::$t (exit $rc, ${secs}s)"
            echo "$out"
        } >>"$log"
        if [ $rc -ne 0 ]; then
            result=FAIL; fail=$((fail + 1))
            note="$(echo "$out" | grep -m1 -E "panicked at|error" -A1 | tail -1 | cut -c1-90)"
            # A test that returned its error (no panic): the message under its "---- NAME ----".
            [ -n "$note" ] || note="$(echo "$out" | grep -m1 -A1 "^---- " | tail -1 | cut -c1-90)"
        elif echo "$summary" | grep -qE " 1 ignored;"; then
            result=SKIP; skip=$((skip + 1))
            # The harness says once why it ignored its tests ("no CUDA device: ...").
            note="$(echo "$out" | grep -m1 -E "^(no CUDA device|NVRTC not available)" |
                sed -E "s/: [0-9]+ (GPU )?tests skipped//" | cut -c1-90)"
        elif ! echo "$summary" | grep -qE " 1 passed;"; then
            result=FAIL; fail=$((fail + 1))
            note="ran no test: ${summary:-no test result line}"
        elif echo "$out" | grep -q "SKIP:"; then
            result=SKIP; skip=$((skip + 1))
            note="$(echo "$out" | grep -m1 "SKIP:" | sed 's/.*SKIP: //' | cut -c1-90)"
        else
            result=PASS; pass=$((pass + 1))
            # The largest relative error the test printed, if any.
            note="$(echo "$out" | grep -oE "relative error [0-9.e+-]+" | awk '{print $3}' | sort -g | tail -1)"
            [ -n "$note" ] && note="max rel err $note"
        fi
        rows+=("$(printf "%-6s %-20s %-60s %7ss  %s" "$result" "$suite" "$t" "$secs" "$note")")
    done
done

{
    echo "pregate-kernels GPU check ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
    head -3 "$log" | tail -2
    printf "%-6s %-20s %-60s %8s  %s\n" RESULT SUITE TEST TIME NOTE
    printf "%s\n" "${rows[@]}"
    echo
    echo "$pass passed, $fail failed, $skip skipped"
} | tee "$table"
cat "$table" >>"$log"
echo "log: $log"
# pregate_vllm's ops, when staged beside the binaries.
if [ -f "$(dirname "$bin_dir")/vllm/gpu_check.py" ]; then
    vrc=0
    bash "$root/vllm-ext/gpu-check.sh" run "$(dirname "$bin_dir")/vllm" || vrc=$?
    case $vrc in
        0) ;;
        3) skip=$((skip + 1)) ;;  # no torch: said so above
        *) fail=$((fail + 1)) ;;
    esac
fi
if [ "$mode" = all ]; then
    run_benches
fi
[ $fail -eq 0 ]
