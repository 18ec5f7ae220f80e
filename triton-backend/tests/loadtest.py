"""Bounded load test: a fixed request rate against a running pregate model on loopback.

    python3 triton-backend/tests/loadtest.py --url http://127.0.0.1:8000 --model pregate \
        --pid $(pgrep -f bin/tritonserver) --rate 4 --duration 60 --max-tokens 32

Checks every stream: no errors, exactly max_tokens tokens (ignore_eos), and the same ids as the
first stream of the same prompt (greedy: no lost or duplicated tokens). Samples the server's RSS.
Prints throughput and p50/p95/p99 latency (first token and full request)."""

import argparse
import json
import threading
import time

import requests

PROMPTS = ["Once upon a time", "The capital of France is", "Experts and routers", "A small model"]


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def one(url, model, prompt, n):
    t0 = time.perf_counter()
    first = None
    ids = []
    body = {"text_input": prompt, "stream": True,
            "sampling_parameters": json.dumps({"max_tokens": n, "ignore_eos": True})}
    with requests.post(f"{url}/v2/models/{model}/generate_stream", json=body, stream=True,
                       timeout=120) as r:
        if r.status_code != 200:
            return None, r.text, 0, 0
        for line in r.iter_lines(decode_unicode=True):
            if line and line.startswith("data: "):
                ev = json.loads(line[6:])
                if "error" in ev:
                    return None, ev["error"], 0, 0
                first = first or time.perf_counter() - t0
                v = ev.get("output_ids", [])
                ids.extend(v if isinstance(v, list) else [v])
    return ids, None, first or 0.0, time.perf_counter() - t0


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="pregate")
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--rate", type=float, default=4.0)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    a = ap.parse_args()
    results, lock, threads = [], threading.Lock(), []

    def worker(i):
        r = one(a.url, a.model, PROMPTS[i % len(PROMPTS)], a.max_tokens)
        with lock:
            results.append((i, *r))

    rss = [rss_mib(a.pid)]
    start = time.perf_counter()
    i = 0
    while time.perf_counter() - start < a.duration:
        due = start + i / a.rate
        time.sleep(max(0.0, due - time.perf_counter()))
        t = threading.Thread(target=worker, args=(i,))
        t.start()
        threads.append(t)
        i += 1
        if i % int(max(1, a.rate * 5)) == 0:
            rss.append(rss_mib(a.pid))
    for t in threads:
        t.join(timeout=180)
    wall = time.perf_counter() - start
    rss.append(rss_mib(a.pid))
    errors = [r for r in results if r[2] is not None]
    ref, bad = {}, 0
    for idx, ids, err, _, _ in results:
        if err is None:
            key = PROMPTS[idx % len(PROMPTS)]
            ref.setdefault(key, ids)
            bad += (len(ids) != a.max_tokens) or ids != ref[key]
    lat = [r[4] for r in results if r[2] is None]
    ttft = [r[3] for r in results if r[2] is None]
    tokens = sum(len(r[1]) for r in results if r[2] is None)
    print(json.dumps({
        "requests": len(results), "sent": i, "errors": len(errors), "wrong_streams": bad,
        "wall_s": round(wall, 1), "req_per_s": round(len(lat) / wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "latency_s": {p: round(pct(lat, p), 3) for p in (50, 95, 99)},
        "ttft_s": {p: round(pct(ttft, p), 3) for p in (50, 95, 99)},
        "rss_mib": {"start": round(rss[0], 1), "max": round(max(rss), 1), "end": round(rss[-1], 1)},
        "first_errors": [e[2][:200] for e in errors[:3]],
    }, indent=1))
    raise SystemExit(1 if errors or bad or len(results) != i else 0)


if __name__ == "__main__":
    main()
