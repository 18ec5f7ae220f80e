import urllib.error
import urllib.request

import pytest
import torch
from test_ops import make

from pregate_vllm.metrics import CONTENT_TYPE, MetricsServer


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, "", ""


def value(text: str, family: str) -> float:
    (line,) = [x for x in text.splitlines() if x.startswith(family + " ")]
    return float(line.split()[-1])


def test_the_endpoint_serves_the_services_counters_as_they_change():
    svc, _ = make(cache_slots=3)
    server = MetricsServer(svc, "127.0.0.1", 0)
    try:
        status, ctype, text = get(server.url)
        assert status == 200 and ctype == CONTENT_TYPE
        assert value(text, "pregate_moe_layer_calls_total") == 0
        ids = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
        w = torch.full((2, 2), 0.5)
        step = torch.ops.pregate.plan_step(ids, w, svc.handle)
        torch.ops.pregate.moe_layer(torch.randn(2, svc.hidden), ids, w, step, 0, svc.handle)
        _, _, text = get(server.url)
        st = svc.stats()
        assert value(text, "pregate_moe_layer_calls_total") == st["layer_calls"] == 1
        assert value(text, "pregate_moe_cache_misses_total") == st["misses"] > 0
        assert get(server.url.replace("/metrics", "/other"))[0] == 404
        # A closed service answers 503, and the server keeps running.
        svc.close()
        assert get(server.url)[0] == 503
    finally:
        server.close()


def test_a_port_in_use_is_a_clear_error():
    svc, _ = make()
    first = MetricsServer(svc, "127.0.0.1", 0)
    try:
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{first.port}"):
            MetricsServer(svc, "127.0.0.1", first.port)
    finally:
        first.close()
