"""Triton request parameters: the sampling values as top-level keys of an HTTP `generate` /
`generate_stream` body (tritonserver turns a key that names no input into a request parameter) and
in a gRPC request's `parameters`, read by the same parsers as `sampling_parameters`."""

import json
import queue

import numpy as np
import requests
import tritonclient.grpc as grpcclient
from conftest import reference
from test_triton import ids_of, sse

PROMPT = "Once upon a time"


def test_max_tokens_as_a_top_level_key_bounds_the_stream(server, tools, work):
    want = reference(tools, work / "tiny", PROMPT, 3)
    events, err = sse(server, {"text_input": PROMPT, "stream": True, "max_tokens": 3,
                               "ignore_eos": True})
    assert err is None, err
    assert ids_of(events) == want["output_ids"]
    assert "".join(e["text_output"] for e in events) == want["text"]


def test_max_tokens_as_a_top_level_key_of_generate(server, tools, work):
    want = reference(tools, work / "tiny", PROMPT, 3)
    r = requests.post(f"{server.url}/v2/models/tiny/generate",
                      json={"text_input": PROMPT, "max_tokens": 3, "ignore_eos": True,
                            "exclude_input_in_output": True}, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["output_ids"] == want["output_ids"]
    assert out["text_output"] == want["text"]


def test_a_string_where_a_number_is_expected_is_refused_by_name(server):
    want = "request parameter temperature must be a number, got \"hot\" (type STRING)"
    body = {"text_input": "hi", "temperature": "hot"}
    r = requests.post(f"{server.url}/v2/models/tiny/generate", json=body, timeout=60)
    assert r.status_code == 400, (r.status_code, r.text)
    assert want in r.json()["error"], r.text
    # generate_stream: tritonserver 2.51 answers HTTP 400 with the message in one SSE event.
    r = requests.post(f"{server.url}/v2/models/tiny/generate_stream",
                      json={**body, "stream": True}, timeout=60)
    assert r.status_code == 400, (r.status_code, r.text)
    assert r.text.startswith("data: "), r.text
    assert want in json.loads(r.text[len("data: "):])["error"], r.text
    events, err = sse(server, {"text_input": "hi", "stream": True, "max_tokens": 2.5})
    assert events == [] and "max_tokens must be a whole number, got 2.5 (type DOUBLE)" in err, err


def test_a_value_given_both_ways_is_refused(server):
    events, err = sse(server, {"text_input": "hi", "stream": True, "max_tokens": 3,
                               "sampling_parameters": '{"max_tokens": 5}'})
    assert events == []
    assert "max_tokens is given both in sampling_parameters and as a request parameter" in err, err


def test_keys_pregate_does_not_read_are_ignored(server):
    events, err = sse(server, {"text_input": "hi", "stream": True, "max_tokens": 2,
                               "ignore_eos": True, "model": "gpt-4o", "user": "someone",
                               "presence_penalty": 0.0})
    assert err is None, err
    assert len(ids_of(events)) == 2


def test_grpc_request_parameters_are_read(server, tools, work):
    want = reference(tools, work / "tiny", PROMPT, 3)
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    q = queue.Queue()
    c.start_stream(callback=lambda result, error: q.put((result, error)))
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([PROMPT.encode()], dtype=object))
    try:
        c.async_stream_infer("tiny", [text], parameters={"max_tokens": 3, "ignore_eos": True,
                                                          "stream": True})
        ids = []
        while len(ids) < 3:
            result, error = q.get(timeout=60)
            assert error is None, error
            ids.extend(result.as_numpy("output_ids").tolist())
        assert ids == want["output_ids"]
        c.async_stream_infer("tiny", [text], parameters={"top_p": "wide"})
        result, error = q.get(timeout=60)
        assert error is not None and "request parameter top_p must be a number" in str(error)
    finally:
        c.stop_stream()
