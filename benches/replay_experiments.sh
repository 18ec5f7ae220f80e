#!/usr/bin/env bash
# Reproduces the replay figures of BENCHMARKS.md (batching and expert cache). Run from the repository root after
# `cargo build --release -p pregate-cli`. Prints one line per run.
set -euo pipefail
P=${PREGATE:-./target/release/pregate}
AZ=${AZURE_TRACE:-../shared/traces/azure-llm-2023-conv.csv}
fmt='import json,sys; d=json.load(sys.stdin); print(" ".join(f"{k}={d[k]:.4g}" if isinstance(d[k], float) else f"{k}={d[k]}" for k in sys.argv[1:]))'
keys="hit_ratio unique_experts_per_batch_mean tokens_per_batch_mean normalized_latency_mean_s normalized_latency_p95_s max_queue_wait_s stall_seconds throughput_tokens_per_s wall_s"

echo "## Table 4, offline (one fixed step sequence per workload, Belady with its exact future)"
echo "### Azure conversation trace, native rate"
$P replay --trace "$AZ" --cache-capacity 7 --policy lru --batching decode-first --hit-ratio-table | tail -6
echo "### synthetic, 10000 requests at 5 req/s, seed 1"
$P replay --synthetic 10000 --rate 5 --seed 1 --cache-capacity 7 --policy lru --batching decode-first --hit-ratio-table | tail -6

echo "## Table 4, closed loop (the replay's own hit ratio; belady with the online lookahead)"
for w in "azure:--trace $AZ --time-scale 10" "synthetic:--synthetic 10000 --rate 0.5 --seed 1"; do
  name=${w%%:*}; args=${w#*:}
  for c in 2 3 4 5; do
    for p in random lru lfu belady; do
      echo -n "$name cap=$c policy=$p "
      $P replay $args --cache-capacity $c --policy $p --batching decode-first --json | python3 -c "$fmt" hit_ratio unique_experts_per_batch_mean
    done
    echo -n "$name cap=$c policy=belady-oracle "
    $P replay $args --cache-capacity $c --policy belady --lookahead oracle --batching decode-first --json | python3 -c "$fmt" hit_ratio
  done
done

echo "## Batching experiment: cache 4 experts/layer, lru, --max-batch-tokens 32, --max-wait-ms 2000"
for w in "synthetic-0.3:--synthetic 10000 --rate 0.3 --seed 1" "synthetic-0.6:--synthetic 10000 --rate 0.6 --seed 1" "synthetic-1.0:--synthetic 10000 --rate 1.0 --seed 1" "azure-x10:--trace $AZ --time-scale 10" "azure-x20:--trace $AZ --time-scale 20"; do
  name=${w%%:*}; args=${w#*:}
  for b in decode-first prefill-first expert-aware; do
    echo -n "$name $b "
    $P replay $args --cache-capacity 4 --policy lru --batching $b --max-batch-tokens 32 --max-wait-ms 2000 --json | python3 -c "$fmt" $keys
  done
done

echo "## Replay speed: 100000 synthetic requests"
for b in decode-first expert-aware; do
  echo -n "$b "
  $P replay --synthetic 100000 --rate 20 --seed 1 --cache-capacity 5 --policy belady --batching $b --json | python3 -c "$fmt" requests steps tokens_per_batch_mean wall_s
done
