import pytest
import torch

import pregate_vllm.ops  # noqa: F401  (registers torch.ops.pregate)
from pregate_vllm._lib import PregateError
from pregate_vllm.ops import MoeService


def make(layers=2, experts=4, top_k=2, hidden=16, inter=8, dtype=torch.float32, **kw):
    g = torch.Generator().manual_seed(7)
    weights = [
        [
            (
                torch.randn(inter, hidden, generator=g) * 0.3,
                torch.randn(inter, hidden, generator=g) * 0.3,
                torch.randn(hidden, inter, generator=g) * 0.3,
            )
            for _ in range(experts)
        ]
        for _ in range(layers)
    ]
    svc = MoeService(
        num_layers=layers,
        num_experts=experts,
        top_k=top_k,
        hidden=hidden,
        inter=inter,
        dtype=dtype,
        **kw,
    )
    for layer, ws in enumerate(weights):
        for e, (gate, up, down) in enumerate(ws):
            svc.set_expert(layer, e, gate.to(dtype), up.to(dtype), down.to(dtype))
    svc.finalize()
    return svc, weights


def reference(weights, layer, x, ids, w):
    """Dense reference in f64: sum_j w_j down(silu(gate x) * up x)."""
    x = x.double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            gate, up, down = (m.double() for m in weights[layer][int(ids[t, j])])
            mid = torch.nn.functional.silu(gate @ x[t]) * (up @ x[t])
            out[t] += float(w[t, j]) * (down @ mid)
    return out


def routes(tokens, experts, top_k, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    w = torch.softmax(torch.randn(tokens, top_k, generator=g), dim=-1)
    return ids.to(torch.int32), w


def run_steps(svc, weights, dtype, tol, steps=3, tokens=7):
    layers, experts = len(weights), len(weights[0])
    g = torch.Generator().manual_seed(3)
    for s in range(steps):
        ids, w = routes(tokens, experts, svc.top_k, seed=s)
        x = torch.randn(tokens, svc.hidden, generator=g).to(dtype)
        step = torch.ops.pregate.plan_step(ids, w, svc.handle)
        for layer in range(layers):
            y = torch.ops.pregate.moe_layer(x, ids, w, step, layer, svc.handle)
            assert y.dtype == dtype and y.shape == x.shape
            want = reference(weights, layer, x, ids, w)
            torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)
        svc.end_step(int(step[0]))


def test_f32_every_expert_resident_matches_the_dense_reference():
    svc, weights = make()
    run_steps(svc, weights, torch.float32, 1e-5)
    st = svc.stats()
    assert st["layer_calls"] == 3 * 2 and st["waves"] == st["layer_calls"]
    assert st["misses"] == 0


def test_f32_with_fewer_slots_than_a_layers_experts_runs_waves_and_counts_misses():
    svc, weights = make(layers=2, experts=6, top_k=2, cache_slots=2)
    run_steps(svc, weights, torch.float32, 1e-5)
    st = svc.stats()
    assert st["misses"] > 0 and st["evictions"] > 0
    assert st["waves"] > st["layer_calls"]
    assert f"pregate_moe_cache_misses_total {st['misses']}" in svc.metrics_text()


def test_bf16_matches_the_dense_reference_to_1e_2():
    svc, weights = make(dtype=torch.bfloat16, layer_quota=3)
    # The reference uses the bf16-rounded weights the service was given.
    weights = [[tuple(m.to(torch.bfloat16) for m in e) for e in layer] for layer in weights]
    run_steps(svc, weights, torch.bfloat16, 1e-2)


def test_row_strided_input_is_read_in_place():
    svc, weights = make(layers=1)
    ids, w = routes(5, 4, 2, seed=9)
    wide = torch.randn(5, 40)
    x = wide[:, 8:24]
    assert x.stride(0) == 40
    step = torch.ops.pregate.plan_step(ids, w, svc.handle)
    y = torch.ops.pregate.moe_layer(x, ids, w, step, 0, svc.handle)
    torch.testing.assert_close(y.double(), reference(weights, 0, x, ids, w), rtol=1e-5, atol=1e-5)


def test_errors_carry_the_library_message():
    svc, _ = make(layers=1)
    ids, w = routes(3, 4, 2, seed=1)
    x = torch.randn(3, 16)
    with pytest.raises(PregateError) as e:
        svc.forward(x, ids, w, step=1, layer=0)
    assert e.value.code == "STATE" and "without a plan" in e.value.message
    bad = ids.clone()
    bad[1, 0] = 9
    with pytest.raises(PregateError, match="token 1: expert 9"):
        torch.ops.pregate.plan_step(bad, w, svc.handle)
    with pytest.raises(PregateError, match="INVALID_ARGUMENT"):
        MoeService(num_layers=1, num_experts=4, top_k=5, hidden=16, inter=8)
    missing = MoeService(num_layers=1, num_experts=2, top_k=1, hidden=4, inter=4)
    with pytest.raises(PregateError, match=r"\(layer 0, expert 0, gate\)"):
        missing.finalize()
    svc.close()
    with pytest.raises(PregateError, match="no MoE service"):
        torch.ops.pregate.plan_step(ids, w, svc.handle)


def test_opcheck():
    svc, _ = make(layers=1)
    ids, w = routes(4, 4, 2, seed=2)
    x = torch.randn(4, 16)
    # Each plan_step call opens a new step with a new id, so its outputs differ from call to call
    # by design: the test comparing eager and traced outputs does not apply to it.
    torch.library.opcheck(
        torch.ops.pregate.plan_step.default,
        (ids, w, svc.handle),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    step = torch.ops.pregate.plan_step(ids, w, svc.handle)
    torch.library.opcheck(torch.ops.pregate.moe_layer.default, (x, ids, w, step, 0, svc.handle))


class TwoLayers(torch.nn.Module):
    def __init__(self, handle: int, hidden: int) -> None:
        super().__init__()
        self.handle = handle
        self.norm = torch.nn.RMSNorm(hidden)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        step = torch.ops.pregate.plan_step(ids, w, self.handle)
        for layer in range(2):
            x = x + torch.ops.pregate.moe_layer(self.norm(x), ids, w, step, layer, self.handle)
        return x


def test_torch_compile_fullgraph_matches_eager():
    svc, _ = make()
    model = TwoLayers(svc.handle, 16)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    # Inference, as in a server: the ops have no autograd formula.
    with torch.no_grad():
        check_compiled(compiled, model)
    assert svc.stats()["layer_calls"] == 8


def check_compiled(compiled, model):
    for tokens in (3, 6):
        ids, w = routes(tokens, 4, 2, seed=tokens)
        x = torch.randn(tokens, 16)
        torch.testing.assert_close(compiled(x, ids, w), model(x, ids, w), rtol=1e-6, atol=1e-6)
