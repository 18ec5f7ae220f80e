"""triton-backend/serve.sh: `ready` only for its own server, a clear refusal of a taken port, a
non-zero exit when the server fails, and no process left behind in any case."""

import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from conftest import free_port, reference

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SERVE = os.path.join(ROOT, "triton-backend", "serve.sh")


class Serve:
    """serve.sh in its own process group, its stdout lines collected as they come."""

    def __init__(self, tools, *args: str):
        env = dict(os.environ, PREGATE_TRITONSERVER=tools["server"], PREGATE_BIN=tools["pregate"],
                   PREGATE_BACKEND_LIB=tools["lib"])
        self.proc = subprocess.Popen([SERVE, *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env,
                                     start_new_session=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.out: list[str] = []
        self.err = ""
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.out.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.time()))
            except queue.Empty:
                break
            if line is None:
                return False
            if "ready" in line:
                return True
        return False

    def finish(self, timeout: float) -> int:
        """The exit status, within `timeout` seconds (the test fails otherwise)."""
        try:
            _, self.err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.communicate()
            pytest.fail(f"serve.sh {self.proc.args} still running after {timeout} s")
        return self.proc.returncode


def group_members(pgid: int) -> list[str]:
    """Live (not zombie) processes of process group `pgid`, as `pid comm`."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        state, _ppid, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            out.append(f"{pid} {comm}")
    return out


def assert_nothing_left(s: Serve, timeout: float = 5.0) -> None:
    deadline = time.time() + timeout
    while group_members(s.proc.pid) and time.time() < deadline:
        time.sleep(0.1)
    left = group_members(s.proc.pid)
    if left:
        os.killpg(s.proc.pid, signal.SIGKILL)
    assert not left, f"processes left behind by serve.sh: {left}"


class AlwaysReady(BaseHTTPRequestHandler):
    """Another server: 200 to every request, as a second Triton serving `pregate` would."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def taken_port():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), AlwaysReady)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("flag", ["--http-port", "--grpc-port", "--metrics-port"])
def test_a_taken_port_is_refused_by_name(tools, work, taken_port, flag):
    ports = {"--http-port": free_port(), "--grpc-port": free_port(), "--metrics-port": free_port()}
    ports[flag] = taken_port
    args = [a for kv in ports.items() for a in (kv[0], str(kv[1]))]
    s = Serve(tools, "--model", str(work / "tiny"), *args)
    status = s.finish(timeout=30)
    assert status != 0
    assert not any("ready" in line for line in s.out), s.out
    assert f"port {taken_port}" in s.err and flag in s.err, s.err
    assert_nothing_left(s)


def test_a_server_that_fails_to_start_is_reported_and_leaves_nothing(tools, tmp_path):
    # Not a model directory: the backend refuses it, and Triton exits.
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    s = Serve(tools, "--model", str(empty), "--http-port", str(free_port()),
              "--grpc-port", str(free_port()), "--metrics-port", str(free_port()))
    t0 = time.time()
    status = s.finish(timeout=60)
    assert status != 0
    assert time.time() - t0 < 60
    assert not any("ready" in line for line in s.out), s.out
    assert "exited" in s.err, s.err[-2000:]
    assert_nothing_left(s)


def git_status() -> str | None:
    try:
        return subprocess.run(["git", "-C", ROOT, "status", "--porcelain"], capture_output=True,
                              text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_a_normal_start_is_ready_once_serves_and_stops_cleanly(tools, work, stop):
    before = git_status()
    http = free_port()
    s = Serve(tools, "--model", str(work / "tiny"), "--http-port", str(http),
              "--grpc-port", str(free_port()), "--metrics-port", str(free_port()))
    try:
        assert s.wait_ready(timeout=120), s.out
        want = reference(tools, work / "tiny", "Once upon a time", 6)
        r = requests.post(f"http://127.0.0.1:{http}/v2/models/pregate/generate_stream",
                          json={"text_input": "Once upon a time", "stream": True,
                                "sampling_parameters": '{"max_tokens": 6, "ignore_eos": true}'},
                          stream=True, timeout=60)
        assert r.status_code == 200, r.text
        ids = []
        for line in r.iter_lines(decode_unicode=True):
            if line and line.startswith("data: "):
                event = json.loads(line[len("data: "):])
                assert "error" not in event, event
                v = event["output_ids"]
                ids.extend(v if isinstance(v, list) else [v])
        assert ids == want["output_ids"]
    finally:
        if stop == "ctrl-c":
            os.killpg(s.proc.pid, signal.SIGINT)  # what a terminal sends: the whole group
        else:
            s.proc.send_signal(signal.SIGTERM)  # the script alone
        s.finish(timeout=30)
    assert sum("ready" in line for line in s.out) == 1, s.out
    if shutil.which("nvidia-smi") is None:
        # A CPU host: tritonserver's CUDA/NVML lines are explained once, before they come.
        assert s.err.count("errors tritonserver prints next are harmless") == 1, s.err
    assert_nothing_left(s)
    # The model repository and the backend copy were temporary: the work tree is as it was.
    assert git_status() == before
