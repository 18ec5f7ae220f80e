#!/usr/bin/env bash
# Builds the fuzz targets with AFL++ instrumentation (afl.rs, stable Rust) and runs each for SECONDS
# (default 600), then prints executions, paths found and crashes/hangs per target. Exits non-zero if
# any target crashed or hung; the inputs are kept under the output folder (printed) for a regression test.
#
#   tests/fuzz/run.sh [SECONDS] [TARGET...]     targets: safetensors config tokenizer trace request
#
# Environment: FUZZ_JOBS (targets run at once, default 1), FUZZ_OUT (output folder, default
# target/fuzz-out), FUZZ_TIMEOUT_MS (per-input time limit, default 1000: longer is a hang),
# FUZZ_MEM_MB (memory limit, default 2048: a larger allocation aborts and counts as a crash).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"
seconds="${1:-600}"
shift || true
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=(safetensors config tokenizer trace request)
jobs="${FUZZ_JOBS:-1}"
out="${FUZZ_OUT:-$root/target/fuzz-out}"
afl_version=0.18.2

# cargo-afl (its install builds AFL++ from the sources it ships, with the C compiler here).
if ! cargo afl --version 2>/dev/null | grep -q "$afl_version"; then
    echo "== installing cargo-afl $afl_version"
    cargo install --quiet --locked cargo-afl --version "$afl_version"
fi
cargo afl config --build >/dev/null 2>&1 || true

# A target folder of its own: the instrumentation flags would otherwise invalidate the normal build.
export CARGO_TARGET_DIR="$root/target/afl"
echo "== building the fuzz targets (instrumented)"
cargo afl build --quiet --release --features afl -p pregate-fuzz
bin="$CARGO_TARGET_DIR/release"

# Neither a core-dump handler nor the CPU governor is ours to change on a shared machine.
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1 AFL_QUIET=1
export AFL_NO_AFFINITY=1

run_one() {
    local t="$1" dir="$out/$1"
    rm -rf "$dir"
    mkdir -p "$dir"
    PREGATE_FUZZ_SCRATCH="$dir/scratch.safetensors" \
        timeout --kill-after=30 $((seconds + 60)) \
        cargo afl fuzz -V "$seconds" -t "${FUZZ_TIMEOUT_MS:-1000}" -m "${FUZZ_MEM_MB:-2048}" \
        -i "$here/seeds/$t" -o "$dir" -- "$bin/fuzz_$t" >"$dir/afl.log" 2>&1 || true
}

echo "== fuzzing ${targets[*]} for $seconds s each, $jobs at a time (output: $out)"
running=0
for t in "${targets[@]}"; do
    [ -x "$bin/fuzz_$t" ] || { echo "no target $t" >&2; exit 2; }
    run_one "$t" &
    running=$((running + 1))
    if [ "$running" -ge "$jobs" ]; then
        wait -n || true
        running=$((running - 1))
    fi
done
wait

stat() { sed -n "s/^$2 *: //p" "$1" | head -n1; }
status=0
printf '%-12s %10s %10s %8s %8s %8s %8s\n' target seconds execs exec/s corpus crashes hangs
for t in "${targets[@]}"; do
    f="$out/$t/default/fuzzer_stats"
    if [ ! -f "$f" ]; then
        printf '%-12s did not run; see %s\n' "$t" "$out/$t/afl.log"
        status=1
        continue
    fi
    crashes="$(stat "$f" saved_crashes)" hangs="$(stat "$f" saved_hangs)"
    printf '%-12s %10s %10s %8s %8s %8s %8s\n' "$t" "$(stat "$f" run_time)" "$(stat "$f" execs_done)" \
        "$(stat "$f" execs_per_sec)" "$(stat "$f" corpus_count)" "$crashes" "$hangs"
    if [ "${crashes:-0}" != 0 ] || [ "${hangs:-0}" != 0 ]; then
        echo "   inputs: $out/$t/default/crashes $out/$t/default/hangs"
        status=1
    fi
done
exit "$status"
