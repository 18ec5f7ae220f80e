"""libtriton_pregate.so in a real tritonserver: streaming equal to `pregate generate`, batching,
cancellation, bad requests, bad models, unload/reload and metrics."""

import json
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
import tritonclient.grpc as grpcclient
from conftest import HERE, NAN_TOKEN, reference, write_model

PROMPTS = ["Once upon a time", "The capital of France is", "experts", "What is the weather like"]


def sse(server, body, model="tiny", timeout=120):
    """POSTs to generate_stream; returns (events, error)."""
    r = requests.post(f"{server.url}/v2/models/{model}/generate_stream", json=body, stream=True,
                      timeout=timeout)
    if r.status_code != 200:
        try:
            return [], r.json().get("error", r.text)
        except ValueError:
            return [], r.text or f"HTTP {r.status_code}"
    events = []
    for line in r.iter_lines(decode_unicode=True):
        if line and line.startswith("data: "):
            ev = json.loads(line[len("data: "):])
            if "error" in ev:
                return events, ev["error"]
            events.append(ev)
    return events, None


def ids_of(events):
    out = []
    for e in events:
        v = e.get("output_ids", [])
        out.extend(v if isinstance(v, list) else [v])
    return out


def gen_body(prompt, n, **extra):
    sp = {"max_tokens": n, "ignore_eos": True}
    return {"text_input": prompt, "stream": True, "sampling_parameters": json.dumps(sp), **extra}


def test_http_generate_stream_equals_pregate_generate(server, tools, work):
    for prompt in PROMPTS[:2]:
        want = reference(tools, work / "tiny", prompt, 12)
        events, err = sse(server, gen_body(prompt, 12))
        assert err is None, err
        assert ids_of(events) == want["output_ids"]
        assert "".join(e["text_output"] for e in events) == want["text"]


def test_stop_string_is_held_back_while_streaming(server):
    """A stop string spanning two tokens: no streamed chunk holds any of it, the stream ends with
    the text cut right before it, and it adds up to the non-streamed output."""
    prompt, n = PROMPTS[1], 24
    events, err = sse(server, gen_body(prompt, n))
    assert err is None, err
    deltas = [e["text_output"] for e in events]
    full = "".join(deltas)
    starts = [len("".join(deltas[:i])) for i in range(n)]
    # The first pair of tokens with text whose first occurrence starts at the first of them: the
    # model is greedy, so the same tokens come again and the stop string is reached there.
    k = next(k for k in range(1, n - 2)
             if deltas[k] and deltas[k + 1] and full.find(deltas[k] + deltas[k + 1]) == starts[k])
    stop = deltas[k] + deltas[k + 1]
    cut = full[:starts[k]]
    body = gen_body(prompt, n)
    sp = json.loads(body["sampling_parameters"])
    sp["stop"] = [stop]
    body["sampling_parameters"] = json.dumps(sp)
    events, err = sse(server, body)
    assert err is None, err
    sent = ""
    for e in events:
        sent += e["text_output"]
        assert cut.startswith(sent), (stop, sent)
    assert sent == cut
    assert len(ids_of(events)) == k + 2
    # Not streamed: one response with the same text.
    events, err = sse(server, {**body, "stream": False, "exclude_input_in_output": True})
    assert err is None, err
    assert [e["text_output"] for e in events] == [cut]


def grpc_start(server, prompt, n, model):
    """Sends one request on a new gRPC bidirectional stream; returns (client, queue of
    (result, error))."""
    q = queue.Queue()
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    c.start_stream(callback=lambda result, error: q.put((result, error)))
    inputs = [
        grpcclient.InferInput("text_input", [1], "BYTES"),
        grpcclient.InferInput("stream", [1], "BOOL"),
        grpcclient.InferInput("sampling_parameters", [1], "BYTES"),
    ]
    inputs[0].set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    inputs[1].set_data_from_numpy(np.array([True]))
    sp = json.dumps({"max_tokens": n, "ignore_eos": True})
    inputs[2].set_data_from_numpy(np.array([sp.encode()], dtype=np.object_))
    c.async_stream_infer(model, inputs, enable_empty_final_response=True)
    return c, q


def grpc_generate(server, prompt, n, model="tiny", cancel_after=None):
    """One request on the gRPC bidirectional stream; returns (ids, error, final_seen)."""
    c, q = grpc_start(server, prompt, n, model)
    ids, err, final = [], None, False
    while True:
        result, error = q.get(timeout=120)
        if error is not None:
            err = str(error)
            break
        resp = result.get_response()
        if resp.parameters["triton_final_response"].bool_param:
            final = True
        out = result.as_numpy("output_ids")
        if out is not None:
            ids.extend(int(x) for x in out)
        if cancel_after is not None and len(ids) >= cancel_after:
            c.stop_stream(cancel_requests=True)
            return ids, None, False
        if final:
            break
    c.stop_stream()
    c.close()
    return ids, err, final


def test_grpc_stream_equals_pregate_generate(server, tools, work):
    for prompt in PROMPTS[2:]:
        want = reference(tools, work / "tiny", prompt, 10)
        ids, err, final = grpc_generate(server, prompt, 10)
        assert err is None, err
        assert final
        assert ids == want["output_ids"]


def test_32_concurrent_streams_complete_and_are_batched(server, tools, work):
    before_max = server.metric("pregate_batch_requests_max")
    jobs = [(f"{PROMPTS[i % 4]} {i}", 8 + (i * 7) % 40) for i in range(32)]
    with ThreadPoolExecutor(32) as ex:
        refs = list(ex.map(lambda j: reference(tools, work / "tiny", *j), jobs))
        barrier = threading.Barrier(32)

        def run(j):
            barrier.wait()
            return sse(server, gen_body(*j))

        got = list(ex.map(run, jobs))
    for (events, err), want, (_, n) in zip(got, refs, jobs):
        assert err is None, err
        assert ids_of(events) == want["output_ids"]
        assert len(want["output_ids"]) == n
    steps = server.metric("pregate_steps_total")
    batched = server.metric("pregate_step_requests_total")
    assert server.metric("pregate_batch_requests_max") >= max(8, before_max), "not batched together"
    assert batched > steps, "every step ran one request"


def test_cancelled_stream_stops_and_frees_its_slot(server):
    cancelled = server.metric("pregate_requests_total", model="small1", outcome="cancelled")
    ids, _, _ = grpc_generate(server, "Once upon a time", 1500, model="small1", cancel_after=3)
    assert len(ids) >= 3
    deadline = time.time() + 30
    while time.time() < deadline:
        if server.metric("pregate_requests_total", model="small1", outcome="cancelled") > cancelled:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the cancellation was not seen")
    generated = server.metric("pregate_generated_tokens_total", model="small1")
    time.sleep(0.5)
    assert server.metric("pregate_generated_tokens_total", model="small1") == generated
    assert server.metric("pregate_requests_active", model="small1") == 0
    # The only slot (max_running 1) is free: a new request runs to completion.
    events, err = sse(server, gen_body("hello", 4), model="small1")
    assert err is None, err
    assert len(ids_of(events)) == 4


def test_a_request_waiting_past_max_queue_wait_fails_as_overloaded(server):
    """queue1 admits one request at a time and lets a request wait 300 ms for admission: one queued
    behind a long generation fails as overloaded and is counted, while the long one streams on;
    once the slot is free, requests are admitted again."""
    before = server.metric("pregate_admission_timeouts_total", model="queue1")
    cancelled = server.metric("pregate_requests_total", model="queue1", outcome="cancelled")
    c, q = grpc_start(server, "Once upon a time", 1500, "queue1")

    def more_ids(ids, n):
        while len(ids) < n:
            result, error = q.get(timeout=120)
            assert error is None, error
            out = result.as_numpy("output_ids")
            ids.extend(int(x) for x in (out if out is not None else []))

    ids = []
    more_ids(ids, 3)
    t = time.time()
    events, err = sse(server, gen_body("queued behind", 4), model="queue1")
    assert time.time() - t >= 0.3
    assert not events
    assert err is not None and "for admission (max_queue_wait 0.3 s)" in err, err
    assert "overloaded" in err, err
    more_ids(ids, len(ids) + 3)  # the admitted request is unaffected
    c.stop_stream(cancel_requests=True)
    deadline = time.time() + 30
    while server.metric("pregate_requests_total", model="queue1", outcome="cancelled") == cancelled:
        assert time.time() < deadline, "the cancellation was not seen"
        time.sleep(0.1)
    events, err = sse(server, gen_body("admitted now", 4), model="queue1")
    assert err is None, err
    assert len(ids_of(events)) == 4
    assert server.metric("pregate_admission_timeouts_total", model="queue1") == before + 1


def test_a_request_beyond_the_waiting_bound_is_refused_at_once_as_unavailable(server):
    """full1 admits one request at a time and lets one more wait: a third is refused at once
    (not after the 30 s queue wait) with UNAVAILABLE's message, and the waiting one is unaffected."""
    c1, q1 = grpc_start(server, "Once upon a time", 1500, "full1")
    result, error = q1.get(timeout=120)
    assert error is None, error
    c2, q2 = grpc_start(server, "waiting its turn", 4, "full1")
    deadline = time.time() + 30
    while server.metric("pregate_requests_waiting", model="full1") < 1:
        assert time.time() < deadline, "the second request never waited"
        time.sleep(0.05)
    t = time.time()
    r = requests.post(f"{server.url}/v2/models/full1/generate_stream",
                      json=gen_body("one too many", 4), stream=True, timeout=60)
    assert time.time() - t < 5
    # tritonserver 2.51 answers an error of any code (here UNAVAILABLE) on generate_stream with
    # HTTP 400 and one SSE event carrying the message, which tells overload apart.
    assert r.status_code == 400, (r.status_code, r.text)
    assert r.text.startswith("data: "), r.text
    err = json.loads(r.text[len("data: "):])["error"]
    assert "server overloaded: 1 requests already wait for admission (max_waiting 1)" in err, err
    c1.stop_stream(cancel_requests=True)
    ids = []
    while True:
        result, error = q2.get(timeout=120)
        assert error is None, error
        out = result.as_numpy("output_ids")
        ids.extend(int(x) for x in (out if out is not None else []))
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    assert len(ids) == 4
    c2.stop_stream()


def grpc_ids_start(server, ids, n, model):
    """Sends token ids on a new gRPC bidirectional stream; returns (client, queue)."""
    q = queue.Queue()
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    c.start_stream(callback=lambda result, error: q.put((result, error)))
    x = grpcclient.InferInput("input_ids", [len(ids)], "INT32")
    x.set_data_from_numpy(np.array(ids, dtype=np.int32))
    sp = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
    sp.set_data_from_numpy(
        np.array([json.dumps({"max_tokens": n, "ignore_eos": True}).encode()], dtype=np.object_))
    c.async_stream_infer(model, [x, sp], enable_empty_final_response=True)
    return c, q


def grpc_ids_finish(c, q):
    """Reads a stream started by grpc_ids_start to its end; returns (ids, error)."""
    ids, err = [], None
    while True:
        result, error = q.get(timeout=120)
        if error is not None:
            err = str(error)
            break
        out = result.as_numpy("output_ids")
        ids.extend(int(x) for x in (out if out is not None else []))
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    c.stop_stream()
    c.close()
    return ids, err


def test_a_request_with_nan_logits_fails_alone(server):
    """tiny_nan has NaN in one token's embedding: of requests sent together, the one whose prompt
    holds that token fails with the model-data error, and the others get the tokens the clean
    model gives them."""
    prompts = [[1, 20, 30], [1, 21, NAN_TOKEN, 31], [1, 22, 32], [1, 23, 33, 43]]
    started = [grpc_ids_start(server, p, 8, "tiny_nan") for p in prompts]
    results = [grpc_ids_finish(c, q) for c, q in started]
    for i, (ids, err) in enumerate(results):
        if i == 1:
            assert err is not None and "logits are empty or NaN" in err, err
            assert ids == []
        else:
            assert err is None, (i, err)
            want, want_err = grpc_ids_finish(*grpc_ids_start(server, prompts[i], 8, "tiny"))
            assert want_err is None and len(want) == 8
            assert ids == want, i


def test_bad_requests_get_errors_and_the_server_keeps_serving(server):
    bad = [
        ({"stream": True}, "text_input"),
        ({"text_input": "hi", "sampling_parameters": "{max_tokens: 3"}, "JSON"),
        ({"text_input": "hi", "sampling_parameters": json.dumps({"max_tokens": 100000})}, "context"),
        ({"text_input": "hi", "stream": "yes please"}, ""),
        ({"text_input": "hi", "sampling_parameters": json.dumps({"temperature": -2})}, "temperature"),
    ]
    for body, want in bad:
        events, err = sse(server, body)
        assert err is not None, body
        assert want in err, (body, err)
    # Wrong dtype on the gRPC path: input_ids as FP32.
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    q = queue.Queue()
    c.start_stream(callback=lambda result, error: q.put(error))
    x = grpcclient.InferInput("input_ids", [2], "FP32")
    x.set_data_from_numpy(np.array([1.0, 2.0], dtype=np.float32))
    c.async_stream_infer("tiny", [x])
    assert q.get(timeout=30) is not None
    c.stop_stream()
    events, err = sse(server, gen_body("still serving", 3))
    assert err is None and len(ids_of(events)) == 3


def test_bad_models_fail_their_load_clearly_and_reload_works(server):
    r = requests.post(f"{server.url}/v2/repository/models/bad_dir/load", timeout=60)
    assert r.status_code != 200
    assert "cannot open model directory" in r.text, r.text
    r = requests.post(f"{server.url}/v2/repository/models/bad_param/load", timeout=60)
    assert r.status_code != 200
    assert "max_batch_tokens" in r.text, r.text
    r = requests.post(f"{server.url}/v2/repository/models/bad_queue_wait/load", timeout=60)
    assert r.status_code != 200
    assert "max_queue_wait_ms" in r.text, r.text
    events, err = sse(server, gen_body("others keep serving", 3))
    assert err is None and len(ids_of(events)) == 3
    assert requests.post(f"{server.url}/v2/repository/models/tiny/unload", timeout=60).status_code == 200
    deadline = time.time() + 30
    while requests.get(f"{server.url}/v2/models/tiny/ready", timeout=5).status_code == 200:
        assert time.time() < deadline
        time.sleep(0.1)
    _, err = sse(server, gen_body("gone", 3))
    assert err is not None
    assert requests.post(f"{server.url}/v2/repository/models/tiny/load", timeout=60).status_code == 200
    events, err = sse(server, gen_body("back again", 3))
    assert err is None and len(ids_of(events)) == 3


def test_metrics_have_the_pregate_families_with_moving_values(server):
    m = server.metrics()
    names = {n for n, _ in m}
    for family in ["pregate_requests_total", "pregate_generated_tokens_total", "pregate_steps_total",
                   "pregate_step_requests_total", "pregate_batch_requests_max",
                   "pregate_requests_active", "pregate_requests_waiting",
                   "pregate_requests_scheduled", "pregate_prompt_tokens_total"]:
        assert family in names, family
    before = server.metric("pregate_generated_tokens_total")
    sse(server, gen_body("count me", 5))
    assert server.wait_metric("pregate_generated_tokens_total", before + 5) == before + 5
    assert server.metric("pregate_requests_total", outcome="finished") > 0


LIBRARY_FAMILIES = [
    "pregate_expert_cache_hits_total", "pregate_expert_cache_misses_total",
    "pregate_expert_cache_evictions_total", "pregate_expert_load_bytes_total",
    "pregate_expert_cache_resident_slots", "pregate_expert_stall_seconds_total",
    "pregate_batch_unique_experts_bucket", "pregate_batch_unique_experts_count",
    "pregate_batch_tokens_bucket", "pregate_batch_tokens_sum", "pregate_batch_tokens_count",
    "pregate_queue_wait_seconds_bucket", "pregate_queue_wait_seconds_count",
    "pregate_requests_waiting", "pregate_requests_running", "pregate_admission_timeouts_total",
    "pregate_sampling_seconds_total", "pregate_routing_seconds_total",
]


def test_library_cache_and_batch_families_are_on_triton_and_move(server):
    """The library's families (expert cache of 2 of 4 experts per layer, batches, queue waits)
    mirrored on Triton's endpoint with the model label, each once, moving with traffic."""
    def lib():
        return {k: server.metric(k) for k in LIBRARY_FAMILIES if not k.endswith("_bucket")}
    sse(server, gen_body("warm the cache", 3))
    time.sleep(0.5)  # the loop mirrors its metrics just after it streams a request's last token
    before = lib()
    steps_before = server.metric("pregate_steps_total")
    with ThreadPoolExecutor(4) as pool:
        for events, err in pool.map(lambda p: sse(server, gen_body(p, 8)), PROMPTS):
            assert err is None and len(ids_of(events)) == 8
    time.sleep(0.5)
    m = server.metrics()
    for family in LIBRARY_FAMILIES:
        series = [ls for (n, ls) in m if n == family and dict(ls).get("model") == "tiny"]
        assert series, family
        if not family.endswith("_bucket"):
            # One series per model: the instance's ServeStats families do not share these names.
            assert len(series) == 1, (family, series)
    after = lib()
    steps = server.metric("pregate_steps_total") - steps_before
    assert steps > 0
    for moved in ["pregate_expert_cache_hits_total", "pregate_expert_cache_misses_total",
                  "pregate_expert_cache_evictions_total", "pregate_expert_load_bytes_total",
                  "pregate_batch_tokens_sum", "pregate_sampling_seconds_total",
                  "pregate_routing_seconds_total"]:
        assert after[moved] > before[moved], moved
    assert after["pregate_batch_tokens_count"] - before["pregate_batch_tokens_count"] == steps
    assert after["pregate_batch_unique_experts_count"] - before["pregate_batch_unique_experts_count"] == steps
    assert after["pregate_queue_wait_seconds_count"] - before["pregate_queue_wait_seconds_count"] >= steps
    # 2 of 4 experts at each of the tiny model's 2 layers.
    assert 0 < after["pregate_expert_cache_resident_slots"] <= 4
    assert server.metric("pregate_batch_tokens_bucket", le="+Inf") == after["pregate_batch_tokens_count"]
    assert after["pregate_requests_running"] == 0 and after["pregate_requests_waiting"] == 0


def test_a_huge_prompt_is_refused_by_size_fast_and_does_not_delay_others(server):
    """A 30 MB text is refused by its size (tiny's 512-token context allows 16384 bytes) before
    any tokenization, and a small request sent meanwhile is answered at once: neither waits for
    a tokenization that used to take Triton's instance thread 10 s and more."""
    huge = "once upon a time " * (30_000_000 // 17)
    out = {}

    def send_huge():
        t = time.time()
        out["huge"] = sse(server, gen_body(huge, 4))
        out["huge_s"] = time.time() - t

    th = threading.Thread(target=send_huge)
    th.start()
    time.sleep(0.3)
    t = time.time()
    events, err = sse(server, gen_body("hello", 4))
    small_s = time.time() - t
    th.join()
    assert err is None, err
    assert len(ids_of(events)) == 4
    events, err = out["huge"]
    assert events == [] and err is not None
    assert "over the limit of 16384 bytes" in err and "max_prompt_bytes" in err, err
    assert out["huge_s"] < 8, out["huge_s"]
    assert small_s < 3, small_s


def test_a_kv_budget_bounds_concurrency_and_refuses_what_never_fits(server):
    from conftest import KV2_BUDGET

    with ThreadPoolExecutor(6) as ex:
        got = list(ex.map(lambda i: sse(server, gen_body(f"hello {i}", 40), model="kv2"), range(6)))
    for events, err in got:
        assert err is None, err
        assert len(ids_of(events)) == 40
    assert server.metric("pregate_kv_budget_bytes", model="kv2") == KV2_BUDGET
    peak = server.metric("pregate_kv_bytes_max", model="kv2")
    assert 2 * 41 * 512 <= peak <= KV2_BUDGET, peak
    assert server.metric("pregate_batch_requests_max", model="kv2") == 2
    assert server.wait_metric("pregate_kv_bytes_in_use", 0, model="kv2") == 0
    events, err = sse(server, gen_body("hi", 118), model="kv2")
    assert events == []
    assert f"more than the whole KV budget of {KV2_BUDGET} bytes" in err, err


def test_out_of_range_sampling_numbers_are_named_not_clamped(server):
    for sp, want in [({"temperature": "1e300"}, "temperature is too large, got \\\"1e300\\\""),
                     ({"max_tokens": 1e300}, "max_tokens is too large, got 1e+300")]:
        events, err = sse(server, {"text_input": "hi", "stream": True,
                                   "sampling_parameters": json.dumps(sp)})
        assert events == [] and want in err, err
        assert "inf" not in err and "9223372036854775807" not in err, err


def test_a_dropped_non_streamed_grpc_request_stops_early(server):
    """A non-streamed request (`stream` false: one response at the end) on the gRPC stream, whose
    client cancels before any response: the serving loop polls Triton's cancellation flag every
    iteration, for streamed and non-streamed requests alike, so it stops well before max_tokens
    and frees its slot."""
    n = 400
    cancelled = server.metric("pregate_requests_total", model="small1", outcome="cancelled")
    generated = server.metric("pregate_generated_tokens_total", model="small1")
    q = queue.Queue()
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    c.start_stream(callback=lambda result, error: q.put((result, error)))
    inputs = [grpcclient.InferInput("text_input", [1], "BYTES"),
              grpcclient.InferInput("stream", [1], "BOOL"),
              grpcclient.InferInput("sampling_parameters", [1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([b"Once upon a time"], dtype=np.object_))
    inputs[1].set_data_from_numpy(np.array([False]))
    sp = json.dumps({"max_tokens": n, "ignore_eos": True}).encode()
    inputs[2].set_data_from_numpy(np.array([sp], dtype=np.object_))
    c.async_stream_infer("small1", inputs)
    deadline = time.time() + 30
    while server.metric("pregate_generated_tokens_total", model="small1") < generated + 5:
        assert time.time() < deadline, "the request did not start"
        time.sleep(0.05)
    c.stop_stream(cancel_requests=True)
    c.close()
    assert server.wait_metric("pregate_requests_total", cancelled + 1, model="small1",
                              outcome="cancelled") == cancelled + 1
    done = server.metric("pregate_generated_tokens_total", model="small1") - generated
    assert done < n / 2, done
    time.sleep(0.5)
    assert server.metric("pregate_generated_tokens_total", model="small1") - generated == done
    assert server.wait_metric("pregate_requests_active", 0, model="small1") == 0


def test_a_mixtral_checkpoint_is_served_with_the_read_me_model_configuration(server, work):
    """The Mixtral fixture (transformers' own checkpoint, two shards, no tokenizer) under the same
    config.pbtxt as the Read-ME models, loaded on demand: its three cases, sent together as token
    ids, come back as the greedy tokens transformers produced."""
    from safetensors.numpy import load_file

    fixture = Path(HERE).parents[1] / "tests" / "fixtures" / "mixtral_f32_sharded"
    write_model(str(work / "repo"), "mixtral", {"model_dir": fixture / "model"})
    r = requests.post(f"{server.url}/v2/repository/models/mixtral/load", timeout=120)
    assert r.status_code == 200, r.text
    try:
        expected = load_file(str(fixture / "expected.safetensors"))
        cases = [
            ([int(t) for t in expected[f"case{c}.prompt_ids"]],
             [int(t) for t in expected[f"case{c}.output_ids"]])
            for c in range(3)
        ]
        streams = [grpc_ids_start(server, prompt, len(want), "mixtral") for prompt, want in cases]
        for (prompt, want), (c, q) in zip(cases, streams):
            ids, err = grpc_ids_finish(c, q)
            assert err is None, err
            assert len(want) == 32
            assert ids == want, f"prompt {prompt}"
    finally:
        requests.post(f"{server.url}/v2/repository/models/mixtral/unload", timeout=60)
