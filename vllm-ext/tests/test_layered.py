"""Tier 1: the per-layer ops (`begin_step`, `moe_layer_routed`, `speculate`) and the families'
gate (`gating.route`), against a dense reference and hand-computed cases."""

import pytest
import torch
from test_ops import make, reference, routes

import pregate_vllm.ops  # noqa: F401  (registers torch.ops.pregate)
from pregate_vllm._lib import PregateError
from pregate_vllm.gating import route


def test_route_softmax_top_k_by_hand():
    # softmax([0, ln 2, ln 3, ln 2]) = [1, 2, 3, 2] / 8; top-2 = experts 2 (3/8) and 1 (2/8,
    # tied with 3: the lower index wins).
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0, 2.0]]))
    ids, w = route(logits, 2, renormalize=False)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert ids.tolist() == [[2, 1]]
    torch.testing.assert_close(w, torch.tensor([[3 / 8, 2 / 8]]))
    ids, w = route(logits, 2, renormalize=True)
    assert ids.tolist() == [[2, 1]]
    torch.testing.assert_close(w, torch.tensor([[3 / 5, 2 / 5]]))


def test_route_ties_go_to_the_lowest_index():
    logits = torch.zeros(3, 8)
    ids, w = route(logits, 3, renormalize=False)
    assert ids.tolist() == [[0, 1, 2]] * 3
    torch.testing.assert_close(w, torch.full((3, 3), 1 / 8))
    ids, w = route(logits, 1, renormalize=True)
    assert ids.tolist() == [[0]] * 3
    torch.testing.assert_close(w, torch.ones(3, 1))


def test_route_is_computed_in_f32_from_bf16_logits():
    logits = torch.tensor([[0.5, 2.0, -1.0, 2.0]], dtype=torch.bfloat16)
    ids, w = route(logits, 2, renormalize=False)
    p = torch.softmax(logits.float(), dim=-1)
    assert ids.tolist() == [[1, 3]]
    torch.testing.assert_close(w, p[:, [1, 3]])


def test_route_of_a_non_finite_token_has_weight_zero():
    # Row 1 is what vLLM's warm-up can feed a gate: NaN and inf. Row 0 routes as usual.
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5], [float("nan"), 1.0, float("inf"), 0.0]])
    ids, w = route(logits, 2, renormalize=True)
    assert ids[0].tolist() == [2, 1]
    assert torch.isfinite(w).all() and w[1].tolist() == [0.0, 0.0]
    assert len(set(ids[1].tolist())) == 2 and all(0 <= e < 4 for e in ids[1].tolist())
    p = torch.softmax(logits[0], -1)[[2, 1]]
    torch.testing.assert_close(w[0], p / p.sum())


def test_route_refuses_bad_shapes():
    with pytest.raises(ValueError, match="top_k 5"):
        route(torch.zeros(2, 4), 5, renormalize=False)
    with pytest.raises(ValueError, match=r"\[T, E\]"):
        route(torch.zeros(4), 1, renormalize=False)


@pytest.mark.parametrize("slots", [0, 3])
def test_routed_layers_match_the_dense_reference(slots):
    svc, weights = make(layers=3, experts=5, top_k=2, cache_slots=slots)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.randn(4, 16, generator=g)
        step = torch.ops.pregate.begin_step(x, svc.handle)
        for layer in range(3):
            ids, w = routes(4, 5, 2, seed=layer + 10)
            y = torch.ops.pregate.moe_layer_routed(x, ids, w, step, layer, svc.handle)
            torch.testing.assert_close(
                y.double(), reference(weights, layer, x, ids, w), rtol=1e-5, atol=1e-5
            )
    st = svc.stats()
    assert st["layer_calls"] == 6
    if slots:
        assert st["misses"] > 0 and st["evictions"] > 0
    else:
        assert (st["hits"], st["misses"]) == (0, 0)


def test_speculate_loads_ahead_and_counts_recall():
    # 3 layers x 4 experts, top-1, 4 slots; speculation 2 ahead, 1 extra, 2 loads per call.
    svc, weights = make(layers=3, experts=4, top_k=1, hidden=8, inter=4, cache_slots=4)
    svc.configure_speculation(2, extra=1, max_loads=2)
    x = torch.randn(1, 8, generator=torch.Generator().manual_seed(2))
    one = torch.ones(1, 1)
    step = torch.ops.pregate.begin_step(x, svc.handle)
    torch.ops.pregate.moe_layer_routed(x, torch.tensor([[0]]), one, step, 0, svc.handle)
    # Layer 1: top-2 of [.1 .2 .9 .5] = {2, 3}; layer 2: {0, 3}. The budget goes to layer 1.
    scores = torch.tensor([[[0.1, 0.2, 0.9, 0.5]], [[0.8, 0.1, 0.0, 0.3]]])
    step2 = torch.ops.pregate.speculate(scores, step, 0, 1, svc.handle)
    assert int(step2[0]) == int(step[0])
    assert svc.stats()["prefetches"] == 2
    y = torch.ops.pregate.moe_layer_routed(x, torch.tensor([[3]]), one, step2, 1, svc.handle)
    torch.testing.assert_close(y.double(), reference(weights, 1, x, torch.tensor([[3]]), one))
    torch.ops.pregate.moe_layer_routed(x, torch.tensor([[1]]), one, step2, 2, svc.handle)
    st, sp = svc.stats(), svc.speculation_stats()
    assert (st["hits"], st["misses"]) == (1, 2)
    assert sp["depth"] == 2 and sp["hits"] == [1, 0] and sp["misses"] == [0, 1]
    assert sp["recall"] == [1.0, 0.0]
    assert (sp["loads"], sp["used"]) == (2, 1)
    text = svc.metrics_text()
    assert 'pregate_prediction_recall{distance="1"} 1' in text
    assert "pregate_speculative_loads_total 2" in text


def test_speculate_refuses_bad_input_and_keeps_the_step():
    svc, _ = make(layers=3, experts=4, top_k=1, hidden=8, inter=4, cache_slots=4)
    x = torch.randn(2, 8)
    step = torch.ops.pregate.begin_step(x, svc.handle)
    scores = torch.rand(1, 2, 4)
    with pytest.raises(PregateError, match="configure_speculation"):
        torch.ops.pregate.speculate(scores, step, 0, 1, svc.handle)
    with pytest.raises(PregateError, match="inside a per-layer step"):
        svc.configure_speculation(1)
    svc.end_step(int(step[0]))
    svc.configure_speculation(1)
    step = torch.ops.pregate.begin_step(x, svc.handle)
    with pytest.raises(PregateError, match="INVALID_ARGUMENT: .*depth 2 after layer 0"):
        torch.ops.pregate.speculate(torch.rand(2, 2, 4), step, 0, 1, svc.handle)
    with pytest.raises(PregateError, match="begun for 2"):
        torch.ops.pregate.speculate(torch.rand(1, 3, 4), step, 0, 1, svc.handle)
    # A planned (Read-ME) op on a per-layer step is refused by name.
    ids, w = torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, 1)
    with pytest.raises(PregateError, match="layer_forward_routed"):
        torch.ops.pregate.moe_layer(x, ids, w, step, 0, svc.handle)
    torch.ops.pregate.speculate(scores, step, 0, 1, svc.handle)
    torch.ops.pregate.moe_layer_routed(x, ids, w, step, 1, svc.handle)
    assert svc.speculation_stats()["misses"][0] + svc.speculation_stats()["hits"][0] == 1


def test_layered_ops_pass_opcheck():
    svc, _ = make(layers=2, experts=4, top_k=2)
    x = torch.randn(3, 16)
    ids, w = routes(3, 4, 2, seed=5)
    step = torch.ops.pregate.begin_step(x, svc.handle)
    torch.library.opcheck(
        torch.ops.pregate.moe_layer_routed.default,
        (x, ids, w, step, 0, svc.handle),
        test_utils=("test_schema", "test_faketensor"),
    )
    torch.library.opcheck(
        torch.ops.pregate.begin_step.default,
        (x, svc.handle),
        test_utils=("test_schema", "test_faketensor"),
    )
