#!/usr/bin/env bash
# Reproduces the speculative-prefetch figures of BENCHMARKS.md: per-layer routes of a
# Mixtral-8x7B and a Qwen3-30B-A3B shape through the simulated replay, on-demand loading against
# speculative prefetch under the eager rule (loads issued at once on the in-order link) and the
# guarded rule (exact loads first), at several cache sizes, on a 55 GB/s link and on a 900 GB/s
# one. Run from the repository root after `cargo build --release -p pregate-cli`. Prints one
# markdown table per link and model.
set -euo pipefail
P=${PREGATE:-./target/release/pregate}
# One request at a time (the single-user offloading case), all queued at once, so tokens/s is
# the decode speed the cache and the link allow.
W="--synthetic ${REQUESTS:-20} --rate 100 --seed 1 --max-running 1 --max-batch-tokens 512 --per-layer"
row='import json,sys
d=json.load(sys.stdin); p=d["per_layer"]
rec=" / ".join("%.2f" % r for r in p["recall"]) or "-"
print("| %s | %s | %.1f | %.2f | %.2f | %.2f | %s | %d | %d | %d | %d |" % (sys.argv[1], sys.argv[2],
    d["hit_ratio"] * 100, d["stall_seconds"], d["throughput_tokens_per_s"], d["tpot_p50_s"] * 1e3,
    rec, p["speculative_loads"], p["wasted_loads"], p["cancelled_loads"], p["demand_loads"]))'
B="--policy belady-decay"
for link in "55:mixtral-8x7b:2 3 4 6" "55:qwen3-30b-a3b:8 12 16 32" "900:mixtral-8x7b:3 4" "900:qwen3-30b-a3b:12 16"; do
  gbps=${link%%:*}; rest=${link#*:}; shape=${rest%%:*}; caps=${rest#*:}
  echo "### $shape, ${gbps} GB/s"
  echo "| slots/layer | loading | hit % | stall s | tokens/s | TPOT p50 ms | recall d1 / d2 | spec loads | wasted | cancelled | on-demand loads |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  for c in $caps; do
    for cfg in "on-demand, lru:--policy lru" \
               "on-demand, belady-decay:$B" \
               "eager D=1 m=0:$B --spec-rule eager --spec-depth 1 --spec-extra 0" \
               "eager D=2 m=1:$B --spec-rule eager --spec-depth 2 --spec-extra 1" \
               "guarded D=1 m=0:$B --spec-depth 1 --spec-extra 0" \
               "guarded D=1 m=1:$B --spec-depth 1 --spec-extra 1" \
               "guarded D=2 m=1:$B --spec-depth 2 --spec-extra 1" \
               "guarded D=2 m=0, recall 1:$B --spec-depth 2 --spec-extra 0 --recall 1,1"; do
      name=${cfg%%:*}; flags=${cfg#*:}
      $P replay $W --link-gbps "$gbps" --shape "$shape" --cache-capacity "$c" $flags --json \
        | python3 -c "$row" "$c" "$name"
    done
  done
done
