"""Checks of the family reference (families_ref.py) and of the transformers-generated fixtures.

    python3 -m pytest tests/reference -q

Needs only numpy, safetensors and pytest: the generator (make_family_fixtures.py, torch) is
never imported here.
"""

from __future__ import annotations

import copy
import json
import math
import os

import families_ref as fam
import numpy as np
import pytest
import readme_ref as ref
from safetensors.numpy import load_file

HERE = os.path.dirname(os.path.abspath(__file__))

FIXTURES_DIR = os.path.join(os.path.dirname(HERE), "fixtures")
FAMILY_OF = {"mixtral_f32_sharded": "mixtral", "mixtral_swa_f32": "mixtral", "qwen2_moe_f32": "qwen2_moe",
             "qwen3_moe_bf16": "qwen3_moe", "olmoe_f32": "olmoe"}
NAMES = list(FAMILY_OF)
STEPS = 32
PROMPT_LENS = (1, 7, 19)
MIN_GAP = 1e-3
# f32 fixtures, and the bf16 one too: transformers computed in f32 on the bf16-rounded weights,
# which the reference reads exactly, so only f32 rounding (~1e-6 relative) separates the two
LOGIT_RTOL = 1e-4

_models: dict[str, fam.FamilyModel] = {}


def model_dir(name: str) -> str:
    return os.path.join(FIXTURES_DIR, name, "model")


def load(name: str) -> fam.FamilyModel:
    if name not in _models:
        _models[name] = fam.FamilyModel(model_dir(name))
    return _models[name]


def raw_config(name: str) -> dict:
    with open(os.path.join(model_dir(name), "config.json")) as f:
        return json.load(f)


def expected(name: str) -> dict[str, np.ndarray]:
    return load_file(os.path.join(FIXTURES_DIR, name, "expected.safetensors"))


def variant(m: fam.FamilyModel, config: dict | None = None, **tensors: np.ndarray) -> fam.FamilyModel:
    """The same model with config keys and tensors replaced (experts re-stacked)."""
    t = fam.stack_experts(m)
    t.update(tensors)
    return fam.FamilyModel(config=config or m.raw, tensors=t)


def fed_ids(ex: dict[str, np.ndarray], c: int) -> np.ndarray:
    return np.concatenate([ex[f"case{c}.prompt_ids"], ex[f"case{c}.output_ids"][:-1]])


def rel_logit_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


# --------------------------------------------------------------------------
# the fixtures against the reference
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_reference_reproduces_transformers(name):
    m, ex = load(name), expected(name)
    for c in range(3):
        P = len(ex[f"case{c}.prompt_ids"])
        logits, experts, weights = m.forward(fed_ids(ex, c))
        assert rel_logit_err(logits[P - 1:], ex[f"case{c}.logits"]) <= LOGIT_RTOL, (name, c)
        np.testing.assert_array_equal(experts, ex[f"case{c}.experts"], err_msg=f"{name} case{c}")
        np.testing.assert_allclose(weights, ex[f"case{c}.expert_weights"], atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_reference_greedy_decoding_matches(name):
    m, ex = load(name), expected(name)
    c = 1
    g = m.generate(ex[f"case{c}.prompt_ids"], STEPS)
    np.testing.assert_array_equal(g["output_ids"], ex[f"case{c}.output_ids"])
    assert rel_logit_err(g["logits"], ex[f"case{c}.logits"]) <= LOGIT_RTOL
    np.testing.assert_array_equal(g["experts"], ex[f"case{c}.experts"])


@pytest.mark.parametrize("name", NAMES)
def test_fixture_shapes_and_gaps(name):
    m, ex = load(name), expected(name)
    c_ = m.cfg
    L, k, V = c_.num_layers, c_.top_k, c_.vocab_size
    used: set[int] = set()
    for c in range(3):
        P = len(ex[f"case{c}.prompt_ids"])
        assert P == PROMPT_LENS[c]
        assert ex[f"case{c}.prompt_ids"].dtype == np.int64 and np.all(ex[f"case{c}.prompt_ids"] >= 3)
        out, logits = ex[f"case{c}.output_ids"], ex[f"case{c}.logits"]
        assert out.shape == (STEPS,) and out.dtype == np.int64
        assert logits.shape == (STEPS, V) and logits.dtype == np.float32
        e, w = ex[f"case{c}.experts"], ex[f"case{c}.expert_weights"]
        assert e.shape == (L, P + STEPS - 1, k) and e.dtype == np.int64
        assert w.shape == e.shape and w.dtype == np.float32
        np.testing.assert_array_equal(np.argmax(logits, -1), out)
        s = np.sort(logits, -1)
        assert np.min(s[:, -1] - s[:, -2]) >= MIN_GAP
        for layer in range(L):
            if c_.moe_layers[layer]:
                assert np.all((e[layer] >= 0) & (e[layer] < c_.num_experts))
                assert all(len(set(row)) == k for row in e[layer].tolist())
                assert np.all(np.diff(w[layer], axis=-1) <= 0)          # descending
                sums = w[layer].sum(-1)
                if c_.norm_topk_prob:
                    np.testing.assert_allclose(sums, 1.0, atol=1e-6)
                else:
                    assert np.all(sums <= 1.0 + 1e-6) and np.min(sums) < 0.99
                used |= set(e[layer].ravel().tolist())
            else:
                assert np.all(e[layer] == -1) and np.all(w[layer] == 0)
    assert len(used) == c_.num_experts


@pytest.mark.parametrize("name", NAMES)
def test_router_decisions_have_safe_gaps(name):
    """Every top-k choice and order in the fixture is decided by a probability gap >= 1e-3."""
    m, ex = load(name), expected(name)
    smallest = np.inf
    for c in range(3):
        ids = fed_ids(ex, c)
        h_probs = router_probabilities(m, ids)
        for probs in h_probs:
            p = -np.sort(-probs, -1)
            smallest = min(smallest, float(np.min(p[:, :m.cfg.top_k] - p[:, 1:m.cfg.top_k + 1])))
    assert smallest >= MIN_GAP


def router_probabilities(m: fam.FamilyModel, ids: np.ndarray) -> list[np.ndarray]:
    """Every MoE layer's softmax router probabilities, recorded by wrapping router_logits."""
    seen: list[np.ndarray] = []
    orig = m.router_logits

    def spy(l: int, y: np.ndarray) -> np.ndarray:
        out = orig(l, y)
        seen.append(ref.softmax(out, -1))
        return out

    m.router_logits = spy  # type: ignore[method-assign]
    try:
        m.forward(ids)
    finally:
        del m.router_logits
    return seen


# --------------------------------------------------------------------------
# checkpoint layout
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_has_the_hub_layout(name):
    names = fam.checkpoint_tensor_names(model_dir(name))
    assert len(names) == len(set(names))
    cfg = raw_config(name)
    assert set(names) == fam.hub_tensor_names(cfg)
    # transformers' in-memory names must not leak into a saved checkpoint
    assert not any("gate_up_proj" in n or n.endswith("experts.down_proj") for n in names)
    if FAMILY_OF[name] == "mixtral":
        assert "model.layers.0.block_sparse_moe.experts.7.w1.weight" in names


def test_hub_layout_groups_follow_the_config():
    cfg = raw_config("qwen2_moe_f32")
    names = fam.hub_tensor_names(cfg)
    assert "model.layers.1.mlp.gate_proj.weight" in names            # the dense layer
    assert "model.layers.1.mlp.gate.weight" not in names
    assert "model.layers.0.mlp.shared_expert_gate.weight" in names
    assert "model.layers.2.self_attn.q_proj.bias" in names
    assert "model.layers.2.self_attn.o_proj.bias" not in names
    no_bias = fam.hub_tensor_names(dict(cfg, qkv_bias=False, mlp_only_layers=[]))
    assert not any(n.endswith("_proj.bias") for n in no_bias)
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in no_bias
    tied = fam.hub_tensor_names(dict(cfg, tie_word_embeddings=True))
    assert names - tied == {"lm_head.weight"}


def test_fixture_files():
    d = model_dir("mixtral_f32_sharded")
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and not os.path.exists(os.path.join(d, "model.safetensors"))
    for s in shards:
        header, _ = ref.read_header(os.path.join(d, s))
        assert {n: s for n in header} == {n: v for n, v in index["weight_map"].items() if v == s}
    dtypes = {}
    for name in NAMES:
        files = [f for f in os.listdir(model_dir(name)) if f.endswith(".safetensors")]
        dtypes[name] = {v["dtype"] for f in files
                        for v in ref.read_header(os.path.join(model_dir(name), f))[0].values()}
        size = sum(os.path.getsize(os.path.join(dp, f))
                   for dp, _, fs in os.walk(os.path.join(FIXTURES_DIR, name)) for f in fs)
        assert size < 1024 * 1024, name
    assert dtypes == {"mixtral_f32_sharded": {"F32"}, "mixtral_swa_f32": {"F32"}, "qwen2_moe_f32": {"F32"},
                      "qwen3_moe_bf16": {"BF16"}, "olmoe_f32": {"F32"}}
    assert raw_config("qwen3_moe_bf16")["dtype"] == "bfloat16"
    for v in load("qwen3_moe_bf16").t.values():   # values are exactly bf16
        np.testing.assert_array_equal(ref.bf16_bits_to_f32(ref.f32_to_bf16_bits(v.astype(np.float32))), v)
    cfgs = {n: fam.FamilyConfig.from_dict(raw_config(n)) for n in NAMES}
    assert [n for n in NAMES if cfgs[n].tied] == ["olmoe_f32"]
    assert cfgs["qwen2_moe_f32"].eos_token_ids == (2, 3)
    q3 = cfgs["qwen3_moe_bf16"]
    assert q3.head_dim == 32 and q3.hidden_size // q3.num_heads != q3.head_dim
    assert cfgs["qwen2_moe_f32"].moe_layers == (True, False, True)
    assert [n for n in NAMES if cfgs[n].sliding_window != (None,) * cfgs[n].num_layers] == ["mixtral_swa_f32"]
    # the window is shorter than every context but the 1-token prompt's first steps
    assert cfgs["mixtral_swa_f32"].sliding_window == (6, 6)
    assert os.path.exists(os.path.join(model_dir("mixtral_swa_f32"), "model.safetensors"))


# --------------------------------------------------------------------------
# each family's distinctive feature is exercised by its fixture
# --------------------------------------------------------------------------


def _set_to_ones(m: fam.FamilyModel, suffix: str) -> dict[str, np.ndarray]:
    return {n: np.ones_like(v) for n, v in m.t.items() if n.endswith(suffix)}


FEATURE_OFF = {
    "qwen2_moe_f32": [
        ("norm_topk_prob on", lambda m: variant(m, dict(m.raw, norm_topk_prob=True))),
        ("no q/k/v bias", lambda m: variant(m, None, **{n: np.zeros_like(v) for n, v in m.t.items()
                                                        if n.endswith("_proj.bias")})),
        ("shared gate replaced by a constant 1/2", lambda m: variant(m, None, **{
            n: np.zeros_like(v) for n, v in m.t.items() if n.endswith("shared_expert_gate.weight")})),
    ],
    "qwen3_moe_bf16": [
        ("norm_topk_prob off", lambda m: variant(m, dict(m.raw, norm_topk_prob=False))),
        ("q/k norm weights of 1", lambda m: variant(m, None, **_set_to_ones(m, "_norm.weight"))),
    ],
    "olmoe_f32": [
        ("no clip_qkv", lambda m: variant(m, dict(m.raw, clip_qkv=None))),
        ("q/k norm weights of 1", lambda m: variant(m, None, **_set_to_ones(m, "_norm.weight"))),
        ("norm_topk_prob on", lambda m: variant(m, dict(m.raw, norm_topk_prob=True))),
    ],
    "mixtral_f32_sharded": [
        ("rope_theta 1e4", lambda m: variant(m, dict(m.raw, rope_parameters={"rope_theta": 1e4}))),
    ],
    "mixtral_swa_f32": [
        ("no sliding window", lambda m: variant(m, dict(m.raw, sliding_window=None))),
        ("a window one token wider", lambda m: variant(m, dict(m.raw, sliding_window=7))),
    ],
}


@pytest.mark.parametrize("name,what,make",
                         [(n, w, f) for n, fs in FEATURE_OFF.items() for w, f in fs])
def test_fixture_notices_a_missing_feature(name, what, make):
    m, ex = load(name), expected(name)
    other = make(m)
    c = 2
    P = len(ex[f"case{c}.prompt_ids"])
    logits, _, weights = other.forward(fed_ids(ex, c))
    changed = rel_logit_err(logits[P - 1:], ex[f"case{c}.logits"]) > 10 * LOGIT_RTOL
    changed |= bool(np.max(np.abs(weights - ex[f"case{c}.expert_weights"])) > 1e-3)
    assert changed, f"{name}: {what} leaves the fixture unchanged"


def test_olmoe_clip_actually_clips(monkeypatch):
    m, ex = load("olmoe_f32"), expected("olmoe_f32")
    assert m.cfg.clip_qkv is not None
    seen: list[float] = []
    orig = np.clip

    def spy(a, lo, hi, *args, **kw):
        seen.append(float(np.mean(np.abs(a) > hi)))
        return orig(a, lo, hi, *args, **kw)

    monkeypatch.setattr(np, "clip", spy)
    m.forward(fed_ids(ex, 1))
    monkeypatch.undo()
    assert len(seen) == 3 * m.cfg.num_layers
    assert min(seen) > 0.0 and max(seen) < 0.5


# --------------------------------------------------------------------------
# stacked experts
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mixtral_f32_sharded", "qwen2_moe_f32"])
def test_stacked_experts_give_the_same_logits(name, tmp_path):
    m, ex = load(name), expected(name)
    stacked = fam.stack_experts(m)
    assert not any(".experts.0." in n for n in stacked)
    ref.write_safetensors(str(tmp_path / "model.safetensors"), {n: ("F32", v) for n, v in stacked.items()})
    with open(tmp_path / "config.json", "w") as f:
        json.dump(m.raw, f)
    s = fam.FamilyModel(str(tmp_path))
    ids = fed_ids(ex, 2)
    a, b = m.forward(ids), s.forward(ids)
    np.testing.assert_allclose(b[0], a[0], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(b[1], a[1])
    # a stacked tensor whose gate and up halves are swapped is a different model
    l0 = "model.layers.0.mlp.experts.gate_up_proj"
    half = stacked[l0].shape[1] // 2
    swapped = dict(stacked, **{l0: np.concatenate([stacked[l0][:, half:], stacked[l0][:, :half]], 1)})
    assert not np.allclose(fam.FamilyModel(config=m.raw, tensors=swapped).forward(ids)[0], a[0])


# --------------------------------------------------------------------------
# routing on hand-computed cases
# --------------------------------------------------------------------------


def test_route_mixtral_renormalises():
    logits = np.log(np.array([[1.0, 4.0, 2.0, 3.0]]))       # probabilities .1 .4 .2 .3
    e, w = fam.route(logits, 2, renormalize=True)
    assert e.tolist() == [[1, 3]]
    np.testing.assert_allclose(w, [[4 / 7, 3 / 7]], atol=1e-12)


def test_route_without_renormalisation_keeps_softmax_probabilities():
    logits = np.log(np.array([[1.0, 4.0, 2.0, 3.0]]))
    e, w = fam.route(logits, 2, renormalize=False)
    assert e.tolist() == [[1, 3]]
    np.testing.assert_allclose(w, [[0.4, 0.3]], atol=1e-12)
    e3, w3 = fam.route(logits, 3, renormalize=False)
    assert e3.tolist() == [[1, 3, 2]]
    np.testing.assert_allclose(w3.sum(), 0.9, atol=1e-12)


def test_route_ties_go_to_the_lowest_index():
    logits = np.array([[0.0, 2.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 3.0, -1.0]])
    e, w = fam.route(logits, 2, renormalize=True)
    assert e.tolist() == [[1, 2], [0, 1], [0, 2]]
    np.testing.assert_allclose(w, 0.5, atol=1e-12)


def test_qwen2_shared_expert_sigmoid_gate():
    """MoE output = routed experts + sigmoid(shared_expert_gate . y) * shared_expert(y)."""
    m = load("qwen2_moe_f32")
    t = fam.stack_experts(m)
    t["model.layers.0.mlp.experts.down_proj"] = np.zeros_like(t["model.layers.0.mlp.experts.down_proj"])
    y = np.random.default_rng(0).standard_normal((3, m.cfg.hidden_size))
    p = "model.layers.0.mlp."
    g, u, d = (t[p + f"shared_expert.{n}_proj.weight"] for n in ("gate", "up", "down"))
    a = y @ g.T
    shared = (a / (1 + np.exp(-a)) * (y @ u.T)) @ d.T
    for gate_row, factor in ((np.zeros((1, y.shape[1])), 0.5), (np.eye(1, y.shape[1]) * math.log(3.0), None)):
        tt = dict(t, **{p + "shared_expert_gate.weight": gate_row})
        out, _, _ = fam.FamilyModel(config=m.raw, tensors=tt)._moe(0, y)
        f = factor if factor is not None else 1 / (1 + np.exp(-y[:, :1] * math.log(3.0)))
        np.testing.assert_allclose(out, f * shared, atol=1e-12)
    # y[:, 0] = 1 gives a gate logit of ln 3: sigmoid = 3/4
    y1 = np.zeros((1, y.shape[1]))
    y1[0, 0] = 1.0
    tt = dict(t, **{p + "shared_expert_gate.weight": np.eye(1, y.shape[1]) * math.log(3.0)})
    out, _, _ = fam.FamilyModel(config=m.raw, tensors=tt)._moe(0, y1)
    a1 = y1 @ g.T
    np.testing.assert_allclose(out, 0.75 * ((a1 / (1 + np.exp(-a1)) * (y1 @ u.T)) @ d.T), atol=1e-12)


def test_dense_layer_kinds_and_output():
    cfg = dict(raw_config("qwen2_moe_f32"), num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3],
               layer_types=None)
    assert fam.FamilyConfig.from_dict(cfg).moe_layers == (False, True, False, False, False, True)
    m = load("qwen2_moe_f32")
    ids = fed_ids(expected("qwen2_moe_f32"), 1)
    _, experts, weights = m.forward(ids)
    assert np.all(experts[1] == -1) and np.all(weights[1] == 0)
    # the dense layer is a plain SwiGLU of intermediate_size: zeroing its down projection
    # removes it, and differs from the model
    zero = variant(m, None, **{"model.layers.1.mlp.down_proj.weight": np.zeros((64, 96))})
    assert not np.allclose(zero.forward(ids)[0], m.forward(ids)[0])


# --------------------------------------------------------------------------
# building blocks, config parsing, bad input
# --------------------------------------------------------------------------


def test_sliding_window_attention_equals_loops():
    rng = np.random.default_rng(1)
    T, nH, nKV, d, win = 9, 4, 2, 8, 3
    q, k, v = rng.standard_normal((T, nH, d)), rng.standard_normal((T, nKV, d)), rng.standard_normal((T, nKV, d))
    got = fam.attention(q, k, v, 0.5, win)
    want = np.zeros((T, nH, d))
    for h in range(nH):
        kv = h // (nH // nKV)
        for i in range(T):
            js = [j for j in range(T) if i - win < j <= i]
            s = np.array([q[i, h] @ k[j, kv] * 0.5 for j in js])
            p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
            want[i, h] = sum(pj * v[j, kv] for pj, j in zip(p, js))
    np.testing.assert_allclose(got, want.reshape(T, nH * d), atol=1e-12)
    np.testing.assert_allclose(fam.attention(q, k, v, 0.5, T), ref.causal_attention(q, k, v, 0.5), atol=1e-12)


def test_config_accepts_both_conventions():
    v5 = raw_config("qwen3_moe_bf16")
    hub = copy.deepcopy(v5)
    del hub["rope_parameters"], hub["dtype"]
    hub.pop("num_local_experts")
    hub.update(rope_theta=1e6, torch_dtype="bfloat16", num_experts=8, eos_token_id=[2])
    a, b = fam.FamilyConfig.from_dict(v5), fam.FamilyConfig.from_dict(hub)
    assert (a.rope_theta, a.dtype, a.num_experts) == (b.rope_theta, b.dtype, b.num_experts) == (1e6, "bfloat16", 8)
    assert a.eos_token_ids == b.eos_token_ids == (2,)
    no_hd = dict(raw_config("mixtral_f32_sharded"))
    no_hd.pop("head_dim", None)
    assert fam.FamilyConfig.from_dict(no_hd).head_dim == 32
    assert fam.FamilyConfig.from_dict(dict(no_hd, eos_token_id=None)).eos_token_ids == ()
    sw = fam.FamilyConfig.from_dict(dict(no_hd, sliding_window=16))
    assert sw.sliding_window == (16, 16)
    q3 = fam.FamilyConfig.from_dict(dict(v5, use_sliding_window=False, sliding_window=4096))
    assert q3.sliding_window == (None, None)


@pytest.mark.parametrize("change,message", [
    ({"model_type": "llama"}, "model_type"),
    ({"eos_token_id": True}, "token id"),
    ({"eos_token_id": [2, "x"]}, "token id"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "RoPE"),
    ({"num_key_value_heads": 3}, "multiple"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"num_local_experts": 4}, "expert count"),     # conflicts with num_experts 8
])
def test_config_errors_are_clear(change, message):
    cfg = dict(raw_config("olmoe_f32"), **change)
    with pytest.raises(ValueError, match=message):
        fam.FamilyConfig.from_dict(cfg)


def test_bad_checkpoints_are_refused():
    m = load("qwen2_moe_f32")
    t = fam.stack_experts(m)
    with pytest.raises(ValueError, match="unexpected tensors"):
        fam.FamilyModel(config=m.raw, tensors=dict(t, **{"model.layers.0.mlp.experts.gate_up": np.zeros(1)}))
    broken = dict(t)
    del broken["model.layers.2.self_attn.k_proj.bias"]
    with pytest.raises(ValueError, match="missing tensor"):
        fam.FamilyModel(config=m.raw, tensors=broken)
    with pytest.raises(ValueError, match="stacked shapes"):
        fam.FamilyModel(config=m.raw, tensors=dict(
            t, **{"model.layers.0.mlp.experts.down_proj": np.zeros((4, 64, 31))}))
    with pytest.raises(ValueError, match="token id"):
        m.forward([3, 300])
