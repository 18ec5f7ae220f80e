"""Checks of the NumPy reference itself and of the committed fixtures.

    python3 -m pytest tests/reference -q
"""

from __future__ import annotations

import copy
import json
import math
import os

import make_fixtures as mf
import numpy as np
import pytest
import readme_ref as ref
import safetensors
from safetensors.numpy import load_file

HERE = os.path.dirname(os.path.abspath(__file__))

FIXTURES_DIR = os.path.join(os.path.dirname(HERE), "fixtures")
NAMES = list(mf.FIXTURES)


def model_dir(name):
    return os.path.join(FIXTURES_DIR, name, "model")


def load(name) -> ref.Model:
    return ref.Model(model_dir(name))


def expected(name):
    return load_file(os.path.join(FIXTURES_DIR, name, "expected.safetensors"))


def with_config(model: ref.Model, **changes) -> ref.Model:
    cfg = copy.deepcopy(model.cfg.raw)
    cfg.update(changes)
    return ref.Model(config=cfg, tensors=model.t)


# --------------------------------------------------------------------------
# safetensors / bf16
# --------------------------------------------------------------------------


def test_bf16_rounding_is_nearest_even():
    f = np.float32
    cases = {
        1.0: 0x3F80,
        -2.5: 0xC020,
        1.0 + 2.0 ** -8: 0x3F80,                  # tie -> even (down)
        1.0 + 3 * 2.0 ** -8: 0x3F82,              # tie -> even (up)
        1.0 + 2.0 ** -8 + 2.0 ** -20: 0x3F81,     # above the tie -> up
        1.0 + 2.0 ** -9: 0x3F80,                  # below the tie -> down
        0.0: 0x0000,
    }
    got = ref.f32_to_bf16_bits(np.array(list(cases), dtype=f))
    assert [int(x) for x in got] == list(cases.values())
    back = ref.bf16_bits_to_f32(got)
    assert back[0] == 1.0 and back[1] == -2.5


def test_writer_is_read_by_the_safetensors_library(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a.bf16": ("BF16", rng.standard_normal((3, 5))),
        "b.f16": ("F16", rng.standard_normal(7).astype(np.float16)),
        "c.f32": ("F32", rng.standard_normal((2, 2)).astype(np.float32)),
        "d.i64": ("I64", np.arange(5, dtype=np.int64) - 2),
        "e.u8": ("U8", np.array([0, 1, 1, 0], dtype=np.uint8)),
    }
    path = str(tmp_path / "x.safetensors")
    ref.write_safetensors(path, tensors, metadata={"k": "v"})
    with open(path, "rb") as fh:
        parsed = dict(safetensors.deserialize(fh.read()))
    assert set(parsed) == set(tensors)
    for name, (dtype, arr) in tensors.items():
        assert parsed[name]["dtype"].upper() == dtype or (dtype, parsed[name]["dtype"]) == ("BF16", "bfloat16")
        assert list(parsed[name]["shape"]) == list(arr.shape)
    # alignment: every tensor starts at a multiple of its element size
    header, start = ref.read_header(path)
    for name, info in header.items():
        assert (start + info["data_offsets"][0]) % np.dtype(ref._DTYPE_BYTES[info["dtype"]]).itemsize == 0
    back = ref.read_safetensors(path)
    bf = ref.bf16_bits_to_f32(ref.f32_to_bf16_bits(tensors["a.bf16"][1].astype(np.float32)))
    np.testing.assert_array_equal(back["a.bf16"], bf.astype(np.float64))
    assert np.max(np.abs(back["a.bf16"] - tensors["a.bf16"][1])) < 2 ** -7 * 4
    np.testing.assert_array_equal(back["b.f16"], tensors["b.f16"][1].astype(np.float64))
    np.testing.assert_array_equal(back["c.f32"], tensors["c.f32"][1].astype(np.float64))
    np.testing.assert_array_equal(back["d.i64"], tensors["d.i64"][1])
    np.testing.assert_array_equal(back["e.u8"], tensors["e.u8"][1])


# --------------------------------------------------------------------------
# building blocks against slow, differently written versions
# --------------------------------------------------------------------------


def test_rope_equals_complex_rotation_and_is_relative():
    rng = np.random.default_rng(1)
    T, nh, d, theta = 9, 3, 16, 10000.0
    x = rng.standard_normal((T, nh, d))
    pos = np.arange(T) + 5
    got = ref.rope(x, pos, theta)
    z = x[..., : d // 2] + 1j * x[..., d // 2:]
    freq = np.array([theta ** (-2.0 * i / d) for i in range(d // 2)])
    zr = z * np.exp(1j * pos[:, None, None] * freq[None, None, :])
    np.testing.assert_allclose(got, np.concatenate([zr.real, zr.imag], -1), atol=1e-12)
    # q(m).k(n) depends only on m - n
    q, k = rng.standard_normal((1, 1, d)), rng.standard_normal((1, 1, d))
    dots = [float(np.sum(ref.rope(q, np.array([m + 3]), theta) * ref.rope(k, np.array([m]), theta)))
            for m in (0, 7, 40)]
    np.testing.assert_allclose(dots, dots[0], rtol=1e-10)
    np.testing.assert_allclose(ref.rope(x, np.zeros(T, int), theta), x)


def slow_attention(q, k, v, scale):
    T, nH, d = q.shape
    nKV = k.shape[1]
    out = np.zeros((T, nH, d))
    for h in range(nH):
        kv = h // (nH // nKV)
        for i in range(T):
            s = [float(q[i, h] @ k[j, kv]) * scale for j in range(i + 1)]
            m = max(s)
            w = [math.exp(x - m) for x in s]
            tot = sum(w)
            out[i, h] = sum(w[j] / tot * v[j, kv] for j in range(i + 1))
    return out.reshape(T, nH * d)


@pytest.mark.parametrize("nkv", [1, 2, 4])
def test_attention_equals_loops(nkv):
    rng = np.random.default_rng(2)
    q = rng.standard_normal((6, 4, 8))
    k = rng.standard_normal((6, nkv, 8))
    v = rng.standard_normal((6, nkv, 8))
    np.testing.assert_allclose(ref.causal_attention(q, k, v, 0.3), slow_attention(q, k, v, 0.3), atol=1e-12)


def slow_router(model: ref.Model, ids):
    """Token-by-token router written out by hand (explicit heads, explicit RoPE)."""
    c, t, r = model.cfg.raw, model.t, ref.ROUTER_PREFIX
    D, nh = c["embedding_dim"], c["n_head"]
    hd = D // nh
    theta = c.get("rope_theta", 10000.0)

    def norm(x, w):
        return x / math.sqrt(float(np.mean(x * x)) + 1e-6) * w

    def lin(x, n):
        return t[r + n + ".weight"] @ x + t[r + n + ".bias"]

    def rot(x, p):
        y = np.empty_like(x)
        for i in range(hd // 2):
            a = p * theta ** (-2.0 * i / hd)
            y[i] = x[i] * math.cos(a) - x[i + hd // 2] * math.sin(a)
            y[i + hd // 2] = x[i + hd // 2] * math.cos(a) + x[i] * math.sin(a)
        return y

    xs = [t[r + "embed.weight"][i] for i in ids]
    a = [norm(x, t[r + "input_layernorm_0.weight"]) for x in xs]
    qs = [lin(x, "q_proj_0") for x in a]
    ks = [lin(x, "k_proj_0") for x in a]
    vs = [lin(x, "v_proj_0") for x in a]
    out = []
    for i in range(len(ids)):
        heads = []
        for h in range(nh):
            sl = slice(h * hd, (h + 1) * hd)
            qi = rot(qs[i][sl], i)
            s = np.array([qi @ rot(ks[j][sl], j) / c["normalizer"] for j in range(i + 1)])
            w = np.exp(s - s.max())
            w /= w.sum()
            heads.append(sum(w[j] * vs[j][sl] for j in range(i + 1)))
        h1 = xs[i] + lin(np.concatenate(heads), "o_proj_0")
        m = norm(h1, t[r + "post_attention_layernorm_0.weight"])
        p1 = lin(m, "proj_1_0")
        h2 = h1 + lin(p1 / (1 + np.exp(-p1)), "proj_2_0")
        out.append(lin(norm(h2, t[r + "out_layernorm.weight"]), "proj_out"))
    return np.stack(out)


@pytest.mark.parametrize("name", NAMES)
def test_router_equals_loops(name):
    m = load(name)
    ids = np.random.default_rng(3).integers(0, m.cfg.vocab_size, 12)
    np.testing.assert_allclose(m.router_logits(ids), slow_router(m, ids), atol=1e-10)


def slow_backbone(model: ref.Model, ids, experts, weights):
    """Backbone for a fused/residual model, token by token with a hand-rolled KV list."""
    c, t = model.cfg.raw, model.t
    H, nH = c["hidden_size"], c["num_attention_heads"]
    nKV, d = c.get("num_key_value_heads", nH), c.get("head_dim", H // nH)
    eps, theta = c["rms_norm_eps"], c.get("rope_theta", 10000.0)

    def norm(x, w):
        return x / math.sqrt(float(np.mean(x * x)) + eps) * w

    def rot(x, p):
        z = (x[: d // 2] + 1j * x[d // 2:]) * np.exp(1j * p * theta ** (-np.arange(0, d, 2) / d))
        return np.concatenate([z.real, z.imag])

    def ffn(y, l, e):
        p = f"model.layers.{l}.moe."
        g, u, dn = (t[p + f"{n}_proj_{e}.weight"] for n in ("gate", "up", "down"))
        a = g @ y
        return dn @ (a / (1 + np.exp(-a)) * (u @ y))

    caches = [[] for _ in range(model.L)]
    logits = []
    for i, tok in enumerate(ids):
        h = t["model.embed_tokens.weight"][tok].copy()
        for l in range(model.L):
            p = f"model.layers.{l}."
            a = norm(h, t[p + "input_layernorm.weight"])
            q = (t[p + "self_attn.q_proj.weight"] @ a).reshape(nH, d)
            k = (t[p + "self_attn.k_proj.weight"] @ a).reshape(nKV, d)
            v = (t[p + "self_attn.v_proj.weight"] @ a).reshape(nKV, d)
            caches[l].append(([rot(k[j], i) for j in range(nKV)], v))
            att = []
            for hh in range(nH):
                kv = hh * nKV // nH
                s = np.array([rot(q[hh], i) @ kk[kv] / math.sqrt(d) for kk, _ in caches[l]])
                w = np.exp(s - s.max())
                w /= w.sum()
                att.append(sum(w[j] * caches[l][j][1][kv] for j in range(len(w))))
            h = h + t[p + "self_attn.o_proj.weight"] @ np.concatenate(att)
            y = norm(h, t[p + "post_attention_layernorm.weight"])
            for e, wgt in zip(experts[i], weights[i]):
                h = h + wgt * ffn(y, l, e)
            if model.layout == "residual":
                h = h + ffn(y, l, "residual")
        hn = norm(h, t["model.norm.weight"])
        head = t["model.embed_tokens.weight"] if c.get("tie_word_embeddings") else t["lm_head.weight"]
        logits.append(head @ hn)
    return np.stack(logits)


@pytest.mark.parametrize("name", ["fused_f32", "residual_bf16_sharded"])
def test_backbone_equals_incremental_loops(name):
    m = load(name)
    ids = np.random.default_rng(4).integers(3, m.cfg.vocab_size, 10)
    e, w = m.route(ids)
    np.testing.assert_allclose(m.forward(ids, e, w), slow_backbone(m, ids, e, w), atol=1e-9)


# --------------------------------------------------------------------------
# routing
# --------------------------------------------------------------------------


def test_topk_selection_weights_and_ties():
    logits = np.array([[0.5, 2.0, 2.0, -1.0],
                       [1.0, 1.0, 1.0, 1.0],
                       [3.0, -2.0, 0.0, 2.9]])
    e1, w1 = ref.select_experts(logits, 1)
    assert e1[:, 0].tolist() == [1, 0, 0] and np.all(w1 == 1.0)
    e2, w2 = ref.select_experts(logits, 2)
    assert e2.tolist() == [[1, 2], [0, 1], [0, 3]]
    np.testing.assert_allclose(w2[0], [0.5, 0.5])
    np.testing.assert_allclose(w2[2], [1 / (1 + math.exp(-0.1)), 1 / (1 + math.exp(0.1))])
    rng = np.random.default_rng(5)
    big = rng.standard_normal((200, 7)) * 3
    for k in (1, 2, 3, 7):
        e, w = ref.select_experts(big, k)
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-12)
        assert np.all(np.diff(w, axis=-1) <= 1e-15)               # descending
        chosen = np.take_along_axis(big, e, -1)
        rest_max = np.max(np.where(np.isin(np.arange(7)[None], e), -np.inf, big), -1) if k < 7 else None
        if rest_max is not None:
            assert np.all(chosen[:, -1] >= rest_max)
        assert all(len(set(row)) == k for row in e.tolist())


@pytest.mark.parametrize("name", NAMES)
def test_router_and_backbone_are_causal(name):
    m = load(name)
    rng = np.random.default_rng(6)
    ids = rng.integers(3, m.cfg.vocab_size, 20)
    other = ids.copy()
    other[12:] = rng.integers(3, m.cfg.vocab_size, 8)
    r1, r2 = m.router_logits(ids), m.router_logits(other)
    np.testing.assert_allclose(r1[:12], r2[:12], atol=1e-12)
    assert not np.allclose(r1[12:], r2[12:])
    np.testing.assert_allclose(m.router_logits(ids[:7]), r1[:7], atol=1e-12)
    l1, l2 = m.forward(ids), m.forward(other)
    np.testing.assert_allclose(l1[:12], l2[:12], atol=1e-10)
    np.testing.assert_allclose(m.forward(ids[:7]), l1[:7], atol=1e-10)


def test_normalizer_scales_router_attention():
    m = load("fused_f32")
    ids = np.arange(3, 15)
    base = m.router_logits(ids)
    # one token: attention weight is 1 whatever the scale
    np.testing.assert_allclose(with_config(m, normalizer=7.0).router_logits(ids[:1]), base[:1], atol=1e-12)
    assert not np.allclose(with_config(m, normalizer=7.0).router_logits(ids)[1:], base[1:])


@pytest.mark.parametrize("name", NAMES)
def test_fixture_notices_wrong_router_scaling(name):
    """The fixture's expert choices change if the router divides by sqrt(head size)
    (or by 1) instead of by `normalizer` (when they differ)."""
    m, ex = load(name), expected(name)
    hd = m.cfg.embedding_dim // m.cfg.n_head
    for wrong in {1.0, math.sqrt(hd)} - {float(m.cfg.normalizer)}:
        mw = with_config(m, normalizer=wrong)
        changed = 0
        for c in range(3):
            seq = np.concatenate([ex[f"case{c}.prompt_ids"], ex[f"case{c}.output_ids"]])
            changed += int(np.sum(mw.route(seq)[0] != ex[f"case{c}.experts"]))
        assert changed > 0, (name, wrong)


# --------------------------------------------------------------------------
# expert layouts
# --------------------------------------------------------------------------


def test_masked_channels_are_union_counted_once():
    m = load("masked_f16")
    t = m.t
    rng = np.random.default_rng(7)
    y = rng.standard_normal((5, m.cfg.hidden_size))
    overlap_seen = False
    for l in range(m.L):
        p = f"model.layers.{l}.mlp."
        res = t[p + "residual_mask"] != 0
        em = t[p + "expert_mask"] != 0
        overlap_seen |= bool(np.any(em & res[None]))
        g, u, dn = t[p + "gate_proj.weight"], t[p + "up_proj.weight"], t[p + "down_proj.weight"]
        for e in range(m.N):
            # dense MLP with the inactive channels multiplied by 0
            act = (res | em[e]).astype(np.float64)
            a = y @ g.T
            dense = (a / (1 + np.exp(-a)) * (y @ u.T) * act) @ dn.T
            np.testing.assert_allclose(ref.ffn(y, *m.expert_weights(l, e)), dense, atol=1e-12)
            ch = m.expert_channels(l, e)
            assert np.all(np.diff(ch) > 0)
    assert overlap_seen, "fixture should flag some residual channels in expert masks too"


@pytest.mark.parametrize("layout", ["fused", "residual"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_masked_equals_split_layouts(layout, top_k):
    masked = with_config(load("masked_f16"), router_top_k=top_k)
    split = ref.Model(config=masked.cfg.raw, tensors=ref.masked_to_split(masked, layout))
    assert split.layout == layout
    ids = np.random.default_rng(8).integers(3, masked.cfg.vocab_size, 25)
    np.testing.assert_allclose(split.forward(ids), masked.forward(ids), atol=1e-10)
    ex = expected("masked_f16")
    if top_k == 1:
        g = split.generate(ex["case1.prompt_ids"], 10)
        np.testing.assert_array_equal(g["output_ids"], ex["case1.output_ids"][:10])


def test_fused_and_residual_differ_by_shared_part():
    """Residual layout = fused layout whose experts also hold the shared channels."""
    m = load("residual_bf16_sharded")
    t = dict(m.t)
    for l in range(m.L):
        p = f"model.layers.{l}.moe."
        for e in range(m.N):
            t[p + f"gate_proj_{e}.weight"] = np.concatenate([t[p + f"gate_proj_{e}.weight"], t[p + "gate_proj_residual.weight"]])
            t[p + f"up_proj_{e}.weight"] = np.concatenate([t[p + f"up_proj_{e}.weight"], t[p + "up_proj_residual.weight"]])
            t[p + f"down_proj_{e}.weight"] = np.concatenate([t[p + f"down_proj_{e}.weight"], t[p + "down_proj_residual.weight"]], 1)
        for n in ("gate", "up", "down"):
            del t[p + f"{n}_proj_residual.weight"]
    fused = ref.Model(config=m.cfg.raw, tensors=t)
    assert fused.layout == "fused"
    ids = np.random.default_rng(9).integers(3, m.cfg.vocab_size, 15)
    np.testing.assert_allclose(fused.forward(ids), m.forward(ids), atol=1e-10)


# --------------------------------------------------------------------------
# the committed fixtures
# --------------------------------------------------------------------------

REQUIRED_CONFIG = ["architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
                   "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                   "torch_dtype", "add_cluster_predictor", "N_cluster", "embedding_dim", "inter_dim",
                   "n_layer", "n_head", "normalizer", "hidden_act_predictor",
                   "max_position_embeddings_predictor", "nonautoregressive", "router_top_k"]


@pytest.mark.parametrize("name", NAMES)
def test_fixture_is_self_consistent(name):
    spec = mf.FIXTURES[name]
    with open(os.path.join(model_dir(name), "config.json")) as f:
        cfg = json.load(f)
    assert [k for k in REQUIRED_CONFIG if k not in cfg] == []
    assert cfg["architectures"] == ["ReadMEForCausalLM"]
    m, ex = load(name), expected(name)
    assert m.layout == spec["layout"]
    k = m.cfg.top_k
    distinct = set()
    for c in range(3):
        P = len(ex[f"case{c}.prompt_ids"])
        assert P == mf.PROMPT_LENS[c]
        out, logits = ex[f"case{c}.output_ids"], ex[f"case{c}.logits"]
        assert out.shape == (mf.STEPS,) and logits.shape == (mf.STEPS, cfg["vocab_size"])
        assert logits.dtype == np.float32 and out.dtype == np.int64
        assert ex[f"case{c}.experts"].shape == (P + mf.STEPS, k)
        assert ex[f"case{c}.expert_weights"].shape == (P + mf.STEPS, k)
        assert np.all(ex[f"case{c}.prompt_ids"] >= 3)
        np.testing.assert_array_equal(np.argmax(logits, -1), out)
        assert len(np.unique(out)) > 1
        seq = np.concatenate([ex[f"case{c}.prompt_ids"], out])
        e, w = m.route(seq)
        np.testing.assert_array_equal(e, ex[f"case{c}.experts"])
        np.testing.assert_allclose(w, ex[f"case{c}.expert_weights"], atol=1e-6)
        np.testing.assert_allclose(ex[f"case{c}.expert_weights"].sum(-1), 1.0, atol=1e-6)
        distinct |= set(e[:, 0].tolist())
        # spot-check rows against a fresh full forward
        for i in (0, mf.STEPS // 2, mf.STEPS - 1):
            row = m.forward(seq[: P + i])[-1]
            np.testing.assert_allclose(logits[i], row, rtol=1e-6, atol=1e-5)
    assert len(distinct) >= mf.MIN_DISTINCT_EXPERTS


def test_fixture_files_and_layouts():
    d = model_dir("residual_bf16_sharded")
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert "metadata" in index
    shards = sorted(set(index["weight_map"].values()))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert "lm_head.weight" not in index["weight_map"]
    assert not os.path.exists(os.path.join(d, "model.safetensors"))
    for s in shards:
        header, _ = ref.read_header(os.path.join(d, s))
        assert {v["dtype"] for v in header.values()} == {"BF16"}
        assert {k: s for k in header} == {k: v for k, v in index["weight_map"].items() if v == s}
    m = load("residual_bf16_sharded")
    for v in m.t.values():   # values are exactly bf16
        np.testing.assert_array_equal(ref.bf16_bits_to_f32(ref.f32_to_bf16_bits(v.astype(np.float32))), v)
    header, _ = ref.read_header(os.path.join(model_dir("fused_f32"), "model.safetensors"))
    assert {v["dtype"] for v in header.values()} == {"F32"} and "lm_head.weight" in header
    sizes = {header[f"model.layers.{l}.moe.gate_proj_0.weight"]["shape"][0] for l in range(2)}
    assert len(sizes) == 2          # expert width differs between layers
    header, _ = ref.read_header(os.path.join(model_dir("masked_f16"), "model.safetensors"))
    assert {v["dtype"] for v in header.values()} == {"F16"}
    mh, _ = ref.read_header(os.path.join(model_dir("masked_f16"), "masks.safetensors"))
    assert {v["dtype"] for v in mh.values()} == {"U8"}


def test_fixtures_fit_the_size_budget():
    for name in os.listdir(FIXTURES_DIR):      # every fixture, the family ones too
        size = sum(os.path.getsize(os.path.join(dp, f))
                   for dp, _, fs in os.walk(os.path.join(FIXTURES_DIR, name)) for f in fs)
        assert size < 1024 * 1024, name


def test_regeneration_reproduces_committed_fixtures(tmp_path):
    mf.main(["--out", str(tmp_path), "-q"])
    for name in NAMES:
        new_dir = tmp_path / name / "model"
        old_files = sorted(os.listdir(model_dir(name)))
        assert sorted(os.listdir(new_dir)) == old_files
        for fn in old_files:   # model files: byte-identical
            with open(os.path.join(model_dir(name), fn), "rb") as a, open(new_dir / fn, "rb") as b:
                assert a.read() == b.read(), (name, fn)
        old, new = expected(name), load_file(str(tmp_path / name / "expected.safetensors"))
        assert sorted(old) == sorted(new)
        for key in old:
            if old[key].dtype == np.int64:
                np.testing.assert_array_equal(old[key], new[key], err_msg=key)
            else:   # float64 math may differ in the last bits between BLAS builds
                np.testing.assert_allclose(old[key], new[key], rtol=1e-6, atol=1e-6, err_msg=key)
