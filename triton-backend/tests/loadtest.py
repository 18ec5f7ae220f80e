"""Load test: a fixed request rate against a running pregate model on loopback.

    python3 triton-backend/tests/loadtest.py --url http://127.0.0.1:8000 --model pregate \
        --pid $(pgrep -f bin/tritonserver) --rate 4 --duration 60 --max-tokens 32

Checks every admitted stream: exactly max_tokens tokens (ignore_eos), and the same ids as the first
stream of the same prompt (greedy: no lost or duplicated tokens). A request the server sheds as
overloaded ("server overloaded", code UNAVAILABLE) is counted apart, with its HTTP status; with
--allow-shed shedding is expected (a rate above what the server sustains, admission bounded by
the model's max_queue_wait_ms) and only other errors fail the run. Samples the server's RSS
before and after each of --runs back-to-back runs. Prints throughput and p50/p95/p99 latency
(first token and full request) of the admitted requests.

--find-rate runs --duration seconds at --rate, then 1.5 times that, and so on, and reports the
highest rate the server sustained: every request admitted and answered, the answered rate within
5 % of the offered one (the server keeps up), and, with --p99-bound, p99 latency within that many
seconds."""

import argparse
import json
import threading
import time

import requests

PROMPTS = ["Once upon a time", "The capital of France is", "Experts and routers", "A small model"]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def error_of(text: str) -> str:
    """The message of an error body: JSON, or an SSE `data: {"error": ...}` event."""
    for line in text.splitlines() or [text]:
        line = line.removeprefix("data: ").strip()
        try:
            return str(json.loads(line).get("error", line))
        except (ValueError, AttributeError):
            continue
    return text


def one(url: str, model: str, prompt: str, n: int) -> tuple:
    """(ids, error, http status, seconds to first token, seconds in all)."""
    t0 = time.perf_counter()
    first = None
    ids: list[int] = []
    body = {"text_input": prompt, "stream": True,
            "sampling_parameters": json.dumps({"max_tokens": n, "ignore_eos": True})}
    with requests.post(f"{url}/v2/models/{model}/generate_stream", json=body, stream=True,
                       timeout=300) as r:
        if r.status_code != 200:
            return None, error_of(r.text), r.status_code, 0.0, time.perf_counter() - t0
        for line in r.iter_lines(decode_unicode=True):
            if line and line.startswith("data: "):
                ev = json.loads(line[6:])
                if "error" in ev:
                    return None, ev["error"], r.status_code, 0.0, time.perf_counter() - t0
                first = first or time.perf_counter() - t0
                v = ev.get("output_ids", [])
                ids.extend(v if isinstance(v, list) else [v])
    return ids, None, 200, first or 0.0, time.perf_counter() - t0


def pct(xs: list, p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


def run(a, rate: float, duration: float) -> dict:
    results, lock, threads = [], threading.Lock(), []

    def worker(i: int) -> None:
        r = one(a.url, a.model, PROMPTS[i % len(PROMPTS)], a.max_tokens)
        with lock:
            results.append((i, *r))

    rss_before = rss_mib(a.pid)
    start = time.perf_counter()
    i = 0
    while time.perf_counter() - start < duration:
        due = start + i / rate
        time.sleep(max(0.0, due - time.perf_counter()))
        t = threading.Thread(target=worker, args=(i,))
        t.start()
        threads.append(t)
        i += 1
    for t in threads:
        t.join(timeout=600)
    wall = time.perf_counter() - start
    rss_after = rss_mib(a.pid)
    ok = [r for r in results if r[2] is None]
    shed = [r for r in results if r[2] is not None and "overloaded" in r[2]]
    errors = [r for r in results if r[2] is not None and "overloaded" not in r[2]]
    ref, bad = {}, 0
    for idx, ids, *_ in ok:
        key = PROMPTS[idx % len(PROMPTS)]
        ref.setdefault(key, ids)
        bad += (len(ids) != a.max_tokens) or ids != ref[key]
    lat = [r[5] for r in ok]
    ttft = [r[4] for r in ok]
    statuses: dict[str, int] = {}
    for r in shed:
        statuses[str(r[3])] = statuses.get(str(r[3]), 0) + 1
    return {
        "rate": rate, "sent": i, "answered": len(results), "admitted": len(ok),
        "shed": len(shed), "shed_http_status": statuses, "errors": len(errors),
        "wrong_streams": bad, "wall_s": round(wall, 1),
        "admitted_per_s": round(len(ok) / wall, 2),
        "tokens_per_s": round(sum(len(r[1]) for r in ok) / wall, 1),
        "latency_s": {p: round(pct(lat, p), 3) for p in (50, 95, 99)},
        "ttft_s": {p: round(pct(ttft, p), 3) for p in (50, 95, 99)},
        "shed_after_s": {p: round(pct([r[5] for r in shed], p), 3) for p in (50, 99)},
        "rss_mib": {"before": round(rss_before, 1), "after": round(rss_after, 1)},
        "first_errors": [e[2][:200] for e in errors[:3]],
        "first_shed": [e[2][:200] for e in shed[:1]],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="pregate")
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--rate", type=float, default=4.0)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--allow-shed", action="store_true")
    ap.add_argument("--find-rate", action="store_true")
    ap.add_argument("--p99-bound", type=float, default=None)
    a = ap.parse_args()
    if a.find_rate:
        rate, best = a.rate, None
        while True:
            r = run(a, rate, a.duration)
            held = (r["admitted"] == r["sent"] and not r["wrong_streams"]
                    and r["admitted_per_s"] >= 0.95 * rate * min(1.0, a.duration / r["wall_s"])
                    and (a.p99_bound is None or r["latency_s"][99] <= a.p99_bound))
            print(json.dumps({"sustained": held, **r}))
            if not held:
                break
            best = rate
            rate = round(rate * 1.5, 2)
        print(json.dumps({"sustainable_rate": best}))
        raise SystemExit(0 if best else 1)
    failed = False
    for _ in range(a.runs):
        r = run(a, a.rate, a.duration)
        print(json.dumps(r, indent=1))
        failed |= bool(r["errors"] or r["wrong_streams"] or r["answered"] != r["sent"]
                       or (r["shed"] and not a.allow_shed))
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
