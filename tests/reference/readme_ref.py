"""Independent NumPy (float64) reference of the Read-ME model as specified in
plugin/docs/model-format.md.

Deliberately simple: every forward pass recomputes the whole sequence (no KV
cache), every weight is upcast to float64, and nothing is shared with the Rust
engine.  Use it as a library (``Model``) or from the command line:

    python3 tests/reference/readme_ref.py MODEL_DIR 5 17 42 --steps 8
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import numpy as np
from safetensors import safe_open

ROUTER_EPS = 1e-6
ROUTER_PREFIX = "cluster_predictor."

# --------------------------------------------------------------------------
# safetensors I/O
# --------------------------------------------------------------------------

FLOAT_DTYPES = ("BF16", "F16", "F32")


def read_header(path: str) -> tuple[dict, int]:
    """Return (header dict without __metadata__, byte offset of the data section)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n).decode("utf-8"))
    header.pop("__metadata__", None)
    return header, 8 + n


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 -> f32 is exact: the 16 bits become the high half of the f32."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even f32 -> bf16 (finite inputs only)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError("f32_to_bf16_bits: non-finite input")
    u = x.view(np.uint32).astype(np.uint64)
    rounded = (u + np.uint64(0x7FFF) + ((u >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)
    return rounded.astype(np.uint16)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Read every tensor of one file.  BF16/F16/F32 become float64; any other
    dtype (masks, ids) is returned as stored."""
    header, data_start = read_header(path)
    out: dict[str, np.ndarray] = {}
    bf16_names = [k for k, v in header.items() if v["dtype"] == "BF16"]
    other_names = [k for k, v in header.items() if v["dtype"] != "BF16"]
    if other_names:
        with safe_open(path, framework="numpy") as f:
            for name in other_names:
                t = f.get_tensor(name)
                if header[name]["dtype"] in FLOAT_DTYPES:
                    t = t.astype(np.float64)
                out[name] = t
    if bf16_names:
        with open(path, "rb") as f:
            for name in bf16_names:
                info = header[name]
                begin, end = info["data_offsets"]
                f.seek(data_start + begin)
                raw = f.read(end - begin)
                bits = np.frombuffer(raw, dtype="<u2")
                shape = tuple(info["shape"])
                if bits.size != int(np.prod(shape, dtype=np.int64)):
                    raise ValueError(f"{path}: {name}: size does not match shape {shape}")
                out[name] = bf16_bits_to_f32(bits).astype(np.float64).reshape(shape)
    return out


_DTYPE_BYTES = {"BF16": "<u2", "F16": "<f2", "F32": "<f4", "F64": "<f8", "I64": "<i8",
                "I32": "<i4", "U8": "u1", "I8": "i1", "BOOL": "u1"}


def write_safetensors(path: str, tensors: dict[str, tuple[str, np.ndarray]],
                      metadata: dict[str, str] | None = None) -> None:
    """Minimal deterministic safetensors writer.

    ``tensors`` maps name -> (dtype, array).  For "BF16" the array holds the
    values (any float dtype); they are rounded to nearest even.  Tensors are laid
    out by decreasing element size, then name (so every tensor is aligned to its
    element size, as the safetensors library does); the header is padded with
    spaces to a multiple of 8.
    """
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    blobs = []
    offset = 0
    size = {k: np.dtype(_DTYPE_BYTES[v[0]]).itemsize for k, v in tensors.items()}
    for name in sorted(tensors, key=lambda k: (-size[k], k)):
        dtype, arr = tensors[name]
        arr = np.asarray(arr)
        if dtype == "BF16":
            raw = f32_to_bf16_bits(arr.astype(np.float32)).astype("<u2").tobytes()
        else:
            raw = np.ascontiguousarray(arr).astype(_DTYPE_BYTES[dtype]).tobytes()
        header[name] = {"dtype": dtype, "shape": [int(s) for s in arr.shape],
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * ((8 - len(hb) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        f.writelines(blobs)


def load_model_tensors(model_dir: str) -> dict[str, np.ndarray]:
    single = os.path.join(model_dir, "model.safetensors")
    index = os.path.join(model_dir, "model.safetensors.index.json")
    tensors: dict[str, np.ndarray] = {}
    if os.path.exists(single):
        tensors.update(read_safetensors(single))
    elif os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        for shard in sorted(set(weight_map.values())):
            part = read_safetensors(os.path.join(model_dir, shard))
            for name, t in part.items():
                if weight_map.get(name) != shard:
                    raise ValueError(f"{name} found in {shard} but weight_map says {weight_map.get(name)}")
                tensors[name] = t
        missing = set(weight_map) - set(tensors)
        if missing:
            raise ValueError(f"tensors listed in weight_map but absent: {sorted(missing)[:5]}")
    else:
        raise FileNotFoundError(f"{model_dir}: neither model.safetensors nor model.safetensors.index.json")
    masks = os.path.join(model_dir, "masks.safetensors")
    if os.path.exists(masks):
        for name, t in read_safetensors(masks).items():
            tensors[name] = t
    return tensors


# --------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """HF rotate-half RoPE.  x: [T, heads, d]; positions: [T]."""
    d = x.shape[-1]
    half = d // 2
    inv_freq = theta ** (-(2.0 * np.arange(half, dtype=np.float64)) / d)
    ang = positions.astype(np.float64)[:, None] * inv_freq[None, :]      # [T, d/2]
    cos = np.cos(ang)[:, None, :]
    sin = np.sin(ang)[:, None, :]
    x1 = x[..., :half]
    x2 = x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """q: [T, nH, d]; k, v: [T, nKV, d] (GQA: query head h reads KV head h // (nH/nKV)).
    Returns [T, nH*d]."""
    T, nH, d = q.shape
    nKV = k.shape[1]
    if nH % nKV:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
    group = nH // nKV
    kv_of_head = np.arange(nH) // group
    kk = k[:, kv_of_head, :]                                   # [T, nH, d]
    vv = v[:, kv_of_head, :]
    scores = np.einsum("qhd,khd->hqk", q, kk) * scale          # [nH, T, T]
    mask = np.triu(np.ones((T, T), dtype=bool), k=1)           # True above diagonal = future
    scores = np.where(mask[None], -np.inf, scores)
    p = softmax(scores, axis=-1)
    out = np.einsum("hqk,khd->qhd", p, vv)
    return out.reshape(T, nH * d)


def ffn(y: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    return (silu(y @ gate.T) * (y @ up.T)) @ down.T


def select_experts(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """logits: [T, N] -> experts [T, k] (int64) and weights [T, k] (float64).
    k = 1: argmax (lowest index on ties), weight 1.  k > 1: the k largest logits
    in descending order (ties: lower index first), softmax over those k."""
    T, N = logits.shape
    if not 1 <= k <= N:
        raise ValueError(f"router_top_k={k} outside 1..{N}")
    if k == 1:
        e = np.argmax(logits, axis=-1).astype(np.int64)[:, None]
        return e, np.ones((T, 1))
    # stable sort of the negated logits keeps lower indices first among equals
    order = np.argsort(-logits, axis=-1, kind="stable")[:, :k].astype(np.int64)
    chosen = np.take_along_axis(logits, order, axis=-1)
    return order, softmax(chosen, axis=-1)


# --------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------


@dataclass
class Config:
    raw: dict

    def __getattr__(self, name):  # convenience
        try:
            return self.raw[name]
        except KeyError as e:
            raise AttributeError(name) from e

    @property
    def n_kv(self) -> int:
        return int(self.raw.get("num_key_value_heads") or self.raw["num_attention_heads"])

    @property
    def head_dim_(self) -> int:
        hd = self.raw.get("head_dim")
        return int(hd) if hd else self.raw["hidden_size"] // self.raw["num_attention_heads"]

    @property
    def theta(self) -> float:
        return float(self.raw.get("rope_theta", 10000.0))

    @property
    def tied(self) -> bool:
        return bool(self.raw.get("tie_word_embeddings", False))

    @property
    def top_k(self) -> int:
        return int(self.raw.get("router_top_k", 1))


class Model:
    """A Read-ME model held entirely in float64."""

    def __init__(self, model_dir: str | None = None, *, config: dict | None = None,
                 tensors: dict[str, np.ndarray] | None = None):
        if model_dir is not None:
            with open(os.path.join(model_dir, "config.json")) as f:
                config = json.load(f)
            tensors = load_model_tensors(model_dir)
        assert config is not None and tensors is not None
        self.cfg = Config(config)
        self.t = tensors
        c = self.cfg
        if not config.get("add_cluster_predictor", True):
            raise ValueError("model has no cluster_predictor")
        if int(config.get("n_layer", 1)) != 1:
            raise ValueError("only n_layer == 1 routers are specified")
        if config.get("nonautoregressive", False):
            raise ValueError("nonautoregressive routers are not specified")
        if config.get("hidden_act_predictor", "silu") != "silu":
            raise ValueError("only hidden_act_predictor = silu is specified")
        self.L = int(c.num_hidden_layers)
        self.N = int(c.N_cluster)
        self.layout = self._detect_layout()
        self._check_shapes()

    # -- layout ---------------------------------------------------------------
    def _detect_layout(self) -> str:
        t = self.t
        if "model.layers.0.mlp.gate_proj.weight" in t:
            return "masked"
        if "model.layers.0.moe.gate_proj_residual.weight" in t:
            return "residual"
        if "model.layers.0.moe.gate_proj_0.weight" in t:
            return "fused"
        raise ValueError("cannot detect the expert layout")

    def _check_shapes(self) -> None:
        c, t = self.cfg, self.t
        H, V = c.hidden_size, c.vocab_size
        nH, nKV, d = c.num_attention_heads, c.n_kv, c.head_dim_
        D, F, N = c.embedding_dim, c.inter_dim, self.N
        exp = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
        if not c.tied:
            exp["lm_head.weight"] = (V, H)
        for l in range(self.L):
            p = f"model.layers.{l}."
            exp[p + "input_layernorm.weight"] = (H,)
            exp[p + "post_attention_layernorm.weight"] = (H,)
            exp[p + "self_attn.q_proj.weight"] = (nH * d, H)
            exp[p + "self_attn.k_proj.weight"] = (nKV * d, H)
            exp[p + "self_attn.v_proj.weight"] = (nKV * d, H)
            exp[p + "self_attn.o_proj.weight"] = (H, nH * d)
            if self.layout == "masked":
                I = c.intermediate_size
                exp[p + "mlp.gate_proj.weight"] = (I, H)
                exp[p + "mlp.up_proj.weight"] = (I, H)
                exp[p + "mlp.down_proj.weight"] = (H, I)
                exp[p + "mlp.residual_mask"] = (I,)
                exp[p + "mlp.expert_mask"] = (N, I)
            else:
                Ie = t[p + "moe.gate_proj_0.weight"].shape[0]
                for e in range(N):
                    exp[p + f"moe.gate_proj_{e}.weight"] = (Ie, H)
                    exp[p + f"moe.up_proj_{e}.weight"] = (Ie, H)
                    exp[p + f"moe.down_proj_{e}.weight"] = (H, Ie)
                if self.layout == "residual":
                    Ir = t[p + "moe.gate_proj_residual.weight"].shape[0]
                    exp[p + "moe.gate_proj_residual.weight"] = (Ir, H)
                    exp[p + "moe.up_proj_residual.weight"] = (Ir, H)
                    exp[p + "moe.down_proj_residual.weight"] = (H, Ir)
        r = ROUTER_PREFIX
        exp[r + "embed.weight"] = (V, D)
        for n in ("input_layernorm_0", "post_attention_layernorm_0", "out_layernorm"):
            exp[r + n + ".weight"] = (D,)
        for n in ("q", "k", "v", "o"):
            exp[r + f"{n}_proj_0.weight"] = (D, D)
            exp[r + f"{n}_proj_0.bias"] = (D,)
        exp[r + "proj_1_0.weight"] = (F, D)
        exp[r + "proj_1_0.bias"] = (F,)
        exp[r + "proj_2_0.weight"] = (D, F)
        exp[r + "proj_2_0.bias"] = (D,)
        exp[r + "proj_out.weight"] = (N, D)
        exp[r + "proj_out.bias"] = (N,)
        for name, shape in exp.items():
            if name not in t:
                raise ValueError(f"missing tensor {name}")
            if tuple(t[name].shape) != tuple(shape):
                raise ValueError(f"{name}: shape {t[name].shape}, expected {shape}")
        if D % c.n_head:
            raise ValueError("embedding_dim must be a multiple of n_head")

    # -- router -------------------------------------------------------------
    def router_logits(self, ids) -> np.ndarray:
        """[T] token ids -> [T, N] router logits (float64)."""
        c, t, r = self.cfg, self.t, ROUTER_PREFIX
        ids = np.asarray(ids, dtype=np.int64)
        T = ids.shape[0]
        D, nh = int(c.embedding_dim), int(c.n_head)
        hd = D // nh
        if T > int(c.raw.get("max_position_embeddings_predictor", 4096)):
            raise ValueError("sequence longer than max_position_embeddings_predictor")

        def lin(x, name):
            return x @ t[r + name + ".weight"].T + t[r + name + ".bias"]

        x = t[r + "embed.weight"][ids]                             # [T, D]
        a = rmsnorm(x, t[r + "input_layernorm_0.weight"], ROUTER_EPS)
        pos = np.arange(T)
        q = rope(lin(a, "q_proj_0").reshape(T, nh, hd), pos, c.theta)
        k = rope(lin(a, "k_proj_0").reshape(T, nh, hd), pos, c.theta)
        v = lin(a, "v_proj_0").reshape(T, nh, hd)
        att = causal_attention(q, k, v, scale=1.0 / float(c.normalizer))
        h = x + lin(att, "o_proj_0")
        m = rmsnorm(h, t[r + "post_attention_layernorm_0.weight"], ROUTER_EPS)
        h = h + lin(silu(lin(m, "proj_1_0")), "proj_2_0")
        o = rmsnorm(h, t[r + "out_layernorm.weight"], ROUTER_EPS)
        return lin(o, "proj_out")

    def route(self, ids) -> tuple[np.ndarray, np.ndarray]:
        return select_experts(self.router_logits(ids), self.cfg.top_k)

    # -- experts --------------------------------------------------------------
    def expert_weights(self, l: int, e) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(gate [I_e, H], up [I_e, H], down [H, I_e]) of expert e ('residual' for the
        shared part) at layer l, in the model's own layout."""
        t, p = self.t, f"model.layers.{l}."
        if self.layout == "masked":
            if e == "residual":
                raise ValueError("masked layout has no separate residual part")
            ch = self.expert_channels(l, e)
            return (t[p + "mlp.gate_proj.weight"][ch], t[p + "mlp.up_proj.weight"][ch],
                    t[p + "mlp.down_proj.weight"][:, ch])
        return (t[p + f"moe.gate_proj_{e}.weight"], t[p + f"moe.up_proj_{e}.weight"],
                t[p + f"moe.down_proj_{e}.weight"])

    def expert_channels(self, l: int, e: int) -> np.ndarray:
        """Masked layout: ascending channel indices owned by expert e."""
        p = f"model.layers.{l}.mlp."
        res = np.asarray(self.t[p + "residual_mask"]) != 0
        em = np.asarray(self.t[p + "expert_mask"])[e] != 0
        return np.nonzero(res | em)[0]

    def moe(self, l: int, y: np.ndarray, experts: np.ndarray, weights: np.ndarray) -> np.ndarray:
        out = np.zeros_like(y)
        for e in range(self.N):
            w = np.where(experts == e, weights, 0.0).sum(axis=-1)      # [T]
            if not np.any(w):
                continue
            out += w[:, None] * ffn(y, *self.expert_weights(l, e))
        if self.layout == "residual":
            out += ffn(y, *self.expert_weights(l, "residual"))
        return out

    # -- backbone -------------------------------------------------------------
    def forward(self, ids, experts: np.ndarray | None = None,
                weights: np.ndarray | None = None) -> np.ndarray:
        """[T] ids -> [T, V] logits, full causal recompute.  Routes default to
        this model's router on the same ids."""
        c, t = self.cfg, self.t
        ids = np.asarray(ids, dtype=np.int64)
        T = ids.shape[0]
        if experts is None:
            experts, weights = self.route(ids)
        nH, nKV, d = int(c.num_attention_heads), c.n_kv, c.head_dim_
        eps = float(c.rms_norm_eps)
        pos = np.arange(T)
        h = t["model.embed_tokens.weight"][ids]
        for l in range(self.L):
            p = f"model.layers.{l}."
            a = rmsnorm(h, t[p + "input_layernorm.weight"], eps)
            q = rope((a @ t[p + "self_attn.q_proj.weight"].T).reshape(T, nH, d), pos, c.theta)
            k = rope((a @ t[p + "self_attn.k_proj.weight"].T).reshape(T, nKV, d), pos, c.theta)
            v = (a @ t[p + "self_attn.v_proj.weight"].T).reshape(T, nKV, d)
            h = h + causal_attention(q, k, v, 1.0 / math.sqrt(d)) @ t[p + "self_attn.o_proj.weight"].T
            y = rmsnorm(h, t[p + "post_attention_layernorm.weight"], eps)
            h = h + self.moe(l, y, experts, weights)
        h = rmsnorm(h, t["model.norm.weight"], eps)
        head = t["model.embed_tokens.weight"] if c.tied else t["lm_head.weight"]
        return h @ head.T

    # -- generation -----------------------------------------------------------
    def generate(self, prompt, steps: int) -> dict[str, np.ndarray]:
        """Greedy decoding ignoring EOS, by full recompute at every step.

        Returns output_ids [S], logits [S, V] (row i = logits whose argmax is
        output token i), experts / expert_weights [P+S, k] (every prompt token
        and every output token)."""
        seq = [int(x) for x in prompt]
        if not seq:
            raise ValueError("empty prompt")
        P = len(seq)
        rows, out = [], []
        for _ in range(steps):
            experts, weights = self.route(seq)
            logits = self.forward(seq, experts, weights)[-1]
            tok = int(np.argmax(logits))
            rows.append(logits)
            out.append(tok)
            seq.append(tok)
        experts, weights = self.route(seq)
        assert experts.shape[0] == P + steps
        return {"prompt_ids": np.asarray(prompt, dtype=np.int64),
                "output_ids": np.asarray(out, dtype=np.int64),
                "logits": np.stack(rows),
                "experts": experts,
                "expert_weights": weights}


# --------------------------------------------------------------------------
# layout conversion (used by the tests; independent of the forward pass)
# --------------------------------------------------------------------------


def masked_to_split(model: Model, layout: str) -> dict[str, np.ndarray]:
    """Tensors of a masked-layout model rewritten as the fused or residual layout."""
    if model.layout != "masked":
        raise ValueError("not a masked model")
    t = {k: v for k, v in model.t.items() if ".mlp." not in k}
    for l in range(model.L):
        p = f"model.layers.{l}."
        g, u, dn = (model.t[p + f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
        res = np.asarray(model.t[p + "mlp.residual_mask"]) != 0
        em = np.asarray(model.t[p + "mlp.expert_mask"]) != 0
        if layout == "residual":
            ch = np.nonzero(res)[0]
            t[p + "moe.gate_proj_residual.weight"] = g[ch]
            t[p + "moe.up_proj_residual.weight"] = u[ch]
            t[p + "moe.down_proj_residual.weight"] = dn[:, ch]
        for e in range(model.N):
            sel = (em[e] & ~res) if layout == "residual" else (em[e] | res)
            ch = np.nonzero(sel)[0]
            t[p + f"moe.gate_proj_{e}.weight"] = g[ch]
            t[p + f"moe.up_proj_{e}.weight"] = u[ch]
            t[p + f"moe.down_proj_{e}.weight"] = dn[:, ch]
    return t


def main(argv=None) -> None:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("ids", type=int, nargs="+")
    ap.add_argument("--steps", type=int, default=16)
    a = ap.parse_args(argv)
    m = Model(a.model_dir)
    g = m.generate(a.ids, a.steps)
    print("layout:", m.layout)
    print("output_ids:", " ".join(map(str, g["output_ids"])))
    print("experts:", g["experts"].tolist())


if __name__ == "__main__":
    main()
