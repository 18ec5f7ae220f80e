"""Fixtures: a tiny and a small pregate model, a model repository and a real tritonserver on free
loopback ports (explicit model control), stopped at the end of the session."""

import json
import os
import shutil
import socket
import subprocess
import time

import numpy as np
import pytest
import requests

HERE = os.path.dirname(os.path.abspath(__file__))

INPUTS_OUTPUTS = """
model_transaction_policy { decoupled: true }
input [
  { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] optional: true },
  { name: "input_ids" data_type: TYPE_INT32 dims: [ -1 ] optional: true },
  { name: "stream" data_type: TYPE_BOOL dims: [ 1 ] optional: true },
  { name: "sampling_parameters" data_type: TYPE_STRING dims: [ 1 ] optional: true },
  { name: "exclude_input_in_output" data_type: TYPE_BOOL dims: [ 1 ] optional: true }
]
output [
  { name: "text_output" data_type: TYPE_STRING dims: [ -1 ] },
  { name: "output_ids" data_type: TYPE_INT32 dims: [ -1 ] }
]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""


def write_model(repo, name, params):
    d = os.path.join(repo, name, "1")
    os.makedirs(d, exist_ok=True)
    lines = [f'name: "{name}"', 'backend: "pregate"', "max_batch_size: 0", INPUTS_OUTPUTS]
    for k, v in params.items():
        lines.append(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}')
    with open(os.path.join(repo, name, "config.pbtxt"), "w") as f:
        f.write("\n".join(lines) + "\n")


# kv2's KV budget in bytes.
KV2_BUDGET = 50000

# The token whose embedding row `tiny_nan` holds NaN.
NAN_TOKEN = 7


def poison_embedding(src, dst, token: int) -> None:
    """Copies the model at `src` to `dst` with NaN in the embedding row of `token`."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(str(src / "model.safetensors"))
    weights["model.embed_tokens.weight"][token, :] = np.nan
    save_file(weights, str(dst / "model.safetensors"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc, http, grpc, metrics, log):
        self.proc, self.http, self.grpc, self.metrics_port, self.log = proc, http, grpc, metrics, log
        self.url = f"http://127.0.0.1:{http}"

    def metrics(self):
        """pregate_* samples as {(name, frozenset(labels)): value}."""
        text = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if not line.startswith("pregate_"):
                continue
            head, value = line.rsplit(" ", 1)
            name, _, labels = head.partition("{")
            pairs = frozenset(
                tuple(p.split("=", 1)) for p in labels.rstrip("}").replace('"', "").split(",") if p
            )
            out[(name, pairs)] = float(value)
        return out

    def metric(self, name, model="tiny", **labels):
        total = 0.0
        for (n, ls), v in self.metrics().items():
            d = dict(ls)
            if n == name and d.get("model") == model and all(d.get(k) == v2 for k, v2 in labels.items()):
                total += v
        return total

    def wait_metric(self, name, want, model="tiny", timeout=10.0, **labels):
        """The metric once it equals `want`, or its last value after `timeout` seconds: the serving
        loop mirrors its counters into Triton just after it sends a request's final response, so a
        client that reads them at once may see the previous values."""
        deadline = time.time() + timeout
        while True:
            v = self.metric(name, model=model, **labels)
            if v == want or time.time() > deadline:
                return v
            time.sleep(0.05)


@pytest.fixture(scope="session")
def tools():
    return {
        "server": os.environ["PREGATE_TRITONSERVER"],
        "pregate": os.environ["PREGATE_BIN"],
        "lib": os.environ["PREGATE_BACKEND_LIB"],
    }


@pytest.fixture(scope="session")
def work(tmp_path_factory, tools):
    w = tmp_path_factory.mktemp("triton")
    for preset in ("tiny", "small"):
        subprocess.run(
            [tools["pregate"], "make-model", "--preset", preset, "--out", str(w / preset)],
            check=True, capture_output=True,
        )
    poison_embedding(w / "tiny", w / "tiny_nan", NAN_TOKEN)
    backends = w / "backends" / "pregate"
    backends.mkdir(parents=True)
    shutil.copy(tools["lib"], backends / "libtriton_pregate.so")
    repo = w / "repo"
    # An expert cache of 2 of the tiny model's 4 experts per layer (CPU: accounting only, so the
    # outputs are unchanged), so the cache metrics see misses and evictions.
    write_model(str(repo), "tiny", {"model_dir": w / "tiny", "max_batch_tokens": 1024,
                                    "cache_capacity": 2, "cache_policy": "belady"})
    # One request at a time, a slower model: cancellation must free the only slot.
    write_model(str(repo), "small1", {"model_dir": w / "small", "max_running": 1})
    # One slot and at most 300 ms of waiting for it: a request behind a long one is refused.
    write_model(str(repo), "queue1", {"model_dir": w / "small", "max_running": 1,
                                      "max_queue_wait_ms": 300})
    # One slot and room for one waiting request (the default 30 s wait): a third is refused at once.
    write_model(str(repo), "full1", {"model_dir": w / "small", "max_running": 1,
                                     "max_waiting_requests": 1})
    # The tiny model with NaN in the embedding of one token: a request with it fails alone.
    write_model(str(repo), "tiny_nan", {"model_dir": w / "tiny_nan"})
    # Room for the KV of two requests of about 45 tokens (512 bytes a token), not three.
    write_model(str(repo), "kv2", {"model_dir": w / "tiny", "kv_memory_bytes": KV2_BUDGET})
    write_model(str(repo), "bad_dir", {"model_dir": w / "does-not-exist"})
    write_model(str(repo), "bad_param", {"model_dir": w / "tiny", "max_batch_tokens": "many"})
    write_model(str(repo), "bad_queue_wait", {"model_dir": w / "tiny", "max_queue_wait_ms": -5})
    return w


@pytest.fixture(scope="session")
def server(work, tools):
    http, grpc, metrics = free_port(), free_port(), free_port()
    log = open(work / "server.log", "w")
    proc = subprocess.Popen(
        [
            tools["server"], f"--model-repository={work / 'repo'}",
            f"--backend-directory={work / 'backends'}", "--model-control-mode=explicit",
            "--load-model=tiny", "--load-model=small1", "--load-model=queue1",
            "--load-model=full1", "--load-model=tiny_nan", "--load-model=kv2",
            "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", f"--http-port={http}",
            f"--grpc-port={grpc}", f"--metrics-port={metrics}", "--exit-timeout-secs=5",
        ],
        stdout=log, stderr=subprocess.STDOUT,
    )
    s = Server(proc, http, grpc, metrics, work / "server.log")
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("tritonserver exited:\n" + open(s.log).read()[-4000:])
        try:
            if requests.get(f"{s.url}/v2/health/ready", timeout=1).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("tritonserver did not become ready:\n" + open(s.log).read()[-4000:])
    yield s
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


def reference(tools, model_dir, prompt, n):
    """`pregate generate --json` greedy output ids and text for `prompt`."""
    out = subprocess.run(
        [tools["pregate"], "generate", "--model", str(model_dir), "--prompt", prompt,
         "--max-new-tokens", str(n), "--ignore-eos", "--json", "--device", "cpu"],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out)
