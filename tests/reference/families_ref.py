"""Independent NumPy (float64) reference of four Hugging Face MoE families: Mixtral, Qwen2-MoE,
Qwen3-MoE and OLMoE, as transformers 5.23 computes them.

Written to be obviously correct rather than fast: every forward pass recomputes the whole
sequence (no KV cache) and every weight is upcast to float64.  It reads a model directory itself:
config.json in either convention (``rope_theta`` or ``rope_parameters.rope_theta``,
``torch_dtype`` or ``dtype``, optional ``head_dim``, ``eos_token_id`` int or list), single-file
or sharded safetensors (BF16 decoded from the raw bytes by readme_ref), experts stored per
expert (the Hub names) or stacked (``experts.gate_up_proj [E, 2I, H]``,
``experts.down_proj [E, H, I]``, transformers' in-memory layout).

    python3 tests/reference/families_ref.py MODEL_DIR 5 17 42 --steps 8
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import readme_ref as ref

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
LAYOUTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hub_layouts.json")

# --------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------


def _int_list(v: object) -> tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, int) and not isinstance(v, bool):
        return (v,)
    if isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return tuple(v)
    raise ValueError(f"token id must be an integer or a list of integers, got {v!r}")


@dataclass(frozen=True)
class FamilyConfig:
    """What the forward pass needs from config.json, with each family's defaults."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tied: bool
    num_experts: int
    top_k: int
    expert_inter: int
    norm_topk_prob: bool
    shared_inter: int               # 0: no shared expert
    dense_inter: int                # width of dense layers (0 when there are none)
    moe_layers: tuple[bool, ...]
    qkv_bias: bool
    o_bias: bool
    qk_norm: str                    # "none", "head" (per head over head_dim) or "full" (whole q / k)
    clip_qkv: float | None
    sliding_window: tuple[int | None, ...]   # per layer; None = full causal attention
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    dtype: str | None

    @classmethod
    def from_dict(cls, raw: dict) -> FamilyConfig:
        """Parse a config.json dict; raises ValueError on anything this reference does not model."""
        family = raw.get("model_type")
        if family not in FAMILIES:
            raise ValueError(f"model_type {family!r} is not one of {FAMILIES}")

        def need(key: str) -> object:
            if key not in raw or raw[key] is None:
                raise ValueError(f"{family} config lacks {key}")
            return raw[key]

        H = int(need("hidden_size"))
        nH = int(need("num_attention_heads"))
        nKV = int(raw.get("num_key_value_heads") or nH)
        if nH % nKV:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        head_dim = int(raw.get("head_dim") or H // nH)
        L = int(need("num_hidden_layers"))
        rope = raw.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default" or raw.get("rope_scaling"):
            raise ValueError("only the default RoPE is modelled")
        theta = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError("only hidden_act = silu is modelled")
        bos = raw.get("bos_token_id")
        if bos is not None and (isinstance(bos, bool) or not isinstance(bos, int)):
            raise ValueError(f"bos_token_id must be an integer, got {bos!r}")

        # transformers' attribute_map aliases the expert count: Hub Qwen3-MoE configs say
        # num_experts, transformers 5.23 writes num_local_experts for it (Mixtral the reverse)
        counts = {raw[k] for k in ("num_experts", "num_local_experts") if raw.get(k) is not None}
        if len(counts) != 1:
            raise ValueError(f"{family} config needs one expert count (num_experts / num_local_experts)")
        E = int(counts.pop())
        shared_inter = dense_inter = 0
        clip = None
        qk_norm = "none"
        o_bias = False
        if family == "mixtral":
            inter = int(need("intermediate_size"))
            norm_topk = True                     # MixtralTopKRouter always renormalises
            qkv_bias = False
            moe = (True,) * L
            sw = raw.get("sliding_window")
            windows: tuple[int | None, ...] = (int(sw) if sw else None,) * L
        else:
            norm_topk = bool(raw.get("norm_topk_prob", False))
            if family == "olmoe":
                inter = int(need("intermediate_size"))      # OLMoE has no moe_intermediate_size
                moe = (True,) * L
                qk_norm = "full"
                qkv_bias = o_bias = bool(raw.get("attention_bias", False))
                if raw.get("clip_qkv") is not None:
                    clip = float(raw["clip_qkv"])
                    if clip <= 0:
                        raise ValueError("clip_qkv must be positive")
                if head_dim != H // nH:
                    raise ValueError("OLMoE's k_norm assumes head_dim = hidden_size / num_attention_heads")
                windows = (None,) * L
            else:
                inter = int(need("moe_intermediate_size"))
                only = set(raw.get("mlp_only_layers") or [])
                step = int(raw.get("decoder_sparse_step", 1))
                moe = tuple(l not in only and E > 0 and (l + 1) % step == 0 for l in range(L))
                if not all(moe):
                    dense_inter = int(need("intermediate_size"))
                use_sw = bool(raw.get("use_sliding_window", False))
                sw = raw.get("sliding_window") if use_sw else None
                if family == "qwen2_moe":
                    shared_inter = int(need("shared_expert_intermediate_size"))
                    qkv_bias = bool(raw.get("qkv_bias", True))
                    types = raw.get("layer_types") or [
                        "sliding_attention" if (l + 1) % 2 and l < int(raw.get("max_window_layers", 28))
                        and use_sw else "full_attention" for l in range(L)]
                    windows = tuple(int(sw) if sw and t == "sliding_attention" else None for t in types)
                else:
                    qk_norm = "head"
                    qkv_bias = o_bias = bool(raw.get("attention_bias", False))
                    windows = (int(sw) if sw else None,) * L
        k = int(need("num_experts_per_tok"))
        if any(moe) and not 1 <= k <= E:
            raise ValueError(f"num_experts_per_tok={k} outside 1..{E}")
        if len(windows) != L:
            raise ValueError("layer_types must have one entry per layer")
        return cls(family=family, vocab_size=int(need("vocab_size")), hidden_size=H, num_layers=L,
                   num_heads=nH, num_kv_heads=nKV, head_dim=head_dim,
                   rms_norm_eps=float(need("rms_norm_eps")), rope_theta=theta,
                   tied=bool(raw.get("tie_word_embeddings", False)), num_experts=E, top_k=k,
                   expert_inter=inter, norm_topk_prob=norm_topk, shared_inter=shared_inter,
                   dense_inter=dense_inter, moe_layers=moe, qkv_bias=qkv_bias, o_bias=o_bias,
                   qk_norm=qk_norm, clip_qkv=clip, sliding_window=windows, bos_token_id=bos,
                   eos_token_ids=_int_list(raw.get("eos_token_id")),
                   dtype=raw.get("dtype") or raw.get("torch_dtype"))


# --------------------------------------------------------------------------
# checkpoint names
# --------------------------------------------------------------------------


def hub_tensor_names(raw_config: dict) -> set[str]:
    """Every tensor name a Hub checkpoint of this config holds (hub_layouts.json)."""
    c = FamilyConfig.from_dict(raw_config)
    with open(LAYOUTS_FILE) as f:
        lay = json.load(f)[c.family]
    names = set(lay["model"])
    if not c.tied:
        names |= set(lay["untied_head"])
    for l in range(c.num_layers):
        groups = ["layer"] + (["qkv_bias"] if c.qkv_bias else []) + (["o_bias"] if c.o_bias else [])
        groups += ["moe_layer", "shared_expert"] if c.moe_layers[l] else ["dense_layer"]
        for g in groups:
            names |= {n.format(l=l) for n in lay[g]}
        if c.moe_layers[l]:
            names |= {n.format(l=l, e=e) for n in lay["expert"] for e in range(c.num_experts)}
    return names


def checkpoint_tensor_names(model_dir: str) -> list[str]:
    """Tensor names stored in a model directory (single file or the shards of its index)."""
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(single):
        files = [single]
    else:
        with open(os.path.join(model_dir, "model.safetensors.index.json")) as f:
            files = [os.path.join(model_dir, s) for s in sorted(set(json.load(f)["weight_map"].values()))]
    names: list[str] = []
    for path in files:
        header, _ = ref.read_header(path)
        names += list(header)
    return names


# --------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------


def route(logits: np.ndarray, k: int, renormalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """softmax over all experts -> the k most probable (descending; ties to the lower index)
    -> optionally divided by their sum.  logits [T, E] -> experts [T, k] int64, weights [T, k]."""
    p = ref.softmax(np.asarray(logits, dtype=np.float64), axis=-1)
    order = np.argsort(-p, axis=-1, kind="stable")[:, :k].astype(np.int64)
    w = np.take_along_axis(p, order, axis=-1)
    if renormalize:
        w = w / w.sum(axis=-1, keepdims=True)
    return order, w


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float,
              window: int | None) -> np.ndarray:
    """Causal GQA attention; with a window, query i sees keys j with i - window < j <= i
    (transformers' sliding_window_overlay).  q [T, nH, d], k/v [T, nKV, d] -> [T, nH*d]."""
    if window is None:
        return ref.causal_attention(q, k, v, scale)
    T, nH, d = q.shape
    kv_of_head = np.arange(nH) // (nH // k.shape[1])
    scores = np.einsum("qhd,khd->hqk", q, k[:, kv_of_head]) * scale
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    scores = np.where(((j <= i) & (j > i - window))[None], scores, -np.inf)
    return np.einsum("hqk,khd->qhd", ref.softmax(scores, axis=-1), v[:, kv_of_head]).reshape(T, nH * d)


# --------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------


class FamilyModel:
    """A Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE model held entirely in float64."""

    def __init__(self, model_dir: str | None = None, *, config: dict | None = None,
                 tensors: dict[str, np.ndarray] | None = None) -> None:
        if model_dir is not None:
            with open(os.path.join(model_dir, "config.json")) as f:
                config = json.load(f)
            tensors = ref.load_model_tensors(model_dir)
        if config is None or tensors is None:
            raise ValueError("give a model directory or both config and tensors")
        self.raw = config
        self.cfg = FamilyConfig.from_dict(config)
        self.t = dict(tensors)
        self.experts: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._take_experts()
        self._check()

    # -- loading ------------------------------------------------------------
    def _moe_prefix(self, l: int) -> str:
        """Mixtral's Hub names use block_sparse_moe, transformers' modules use mlp: accept both."""
        p = f"model.layers.{l}."
        if self.cfg.family == "mixtral" and any(k.startswith(p + "block_sparse_moe.") for k in self.t):
            return p + "block_sparse_moe."
        return p + "mlp."

    def _take_experts(self) -> None:
        """Move every expert's (gate [I, H], up [I, H], down [H, I]) out of the tensor dict,
        from per-expert tensors or from the stacked pair."""
        c = self.cfg
        for l in range(c.num_layers):
            if not c.moe_layers[l]:
                continue
            p = self._moe_prefix(l) + "experts."
            if p + "gate_up_proj" in self.t or p + "down_proj" in self.t:
                gu = self.t.pop(p + "gate_up_proj", None)
                dn = self.t.pop(p + "down_proj", None)
                if gu is None or dn is None:
                    raise ValueError(f"{p}: stacked experts need both gate_up_proj and down_proj")
                E, I, H = c.num_experts, c.expert_inter, c.hidden_size
                if gu.shape != (E, 2 * I, H) or dn.shape != (E, H, I):
                    raise ValueError(f"{p}: stacked shapes {gu.shape}, {dn.shape}, expected "
                                     f"{(E, 2 * I, H)}, {(E, H, I)}")
                for e in range(E):
                    # gate rows first, then up rows (transformers: linear(x, gate_up[e]).chunk(2))
                    self.experts[(l, e)] = (gu[e, :I], gu[e, I:], dn[e])
                continue
            names = ("w1", "w3", "w2") if c.family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
            for e in range(c.num_experts):
                keys = [p + f"{e}.{n}.weight" for n in names]
                missing = [k for k in keys if k not in self.t]
                if missing:
                    raise ValueError(f"missing tensor {missing[0]}")
                g, u, d = (self.t.pop(k) for k in keys)
                self.experts[(l, e)] = (g, u, d)

    def _check(self) -> None:
        """Every tensor the forward pass reads is present with its shape, and nothing else is
        stored (a tensor this reference would silently ignore is an error)."""
        c, t = self.cfg, self.t
        H, V, d = c.hidden_size, c.vocab_size, c.head_dim
        nH, nKV = c.num_heads, c.num_kv_heads
        exp: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
        if not c.tied:
            exp["lm_head.weight"] = (V, H)
        for l in range(c.num_layers):
            p = f"model.layers.{l}."
            a = p + "self_attn."
            exp[p + "input_layernorm.weight"] = (H,)
            exp[p + "post_attention_layernorm.weight"] = (H,)
            exp[a + "q_proj.weight"] = (nH * d, H)
            exp[a + "k_proj.weight"] = (nKV * d, H)
            exp[a + "v_proj.weight"] = (nKV * d, H)
            exp[a + "o_proj.weight"] = (H, nH * d)
            if c.qkv_bias:
                exp[a + "q_proj.bias"] = (nH * d,)
                exp[a + "k_proj.bias"] = (nKV * d,)
                exp[a + "v_proj.bias"] = (nKV * d,)
            if c.o_bias:
                exp[a + "o_proj.bias"] = (H,)
            if c.qk_norm == "head":
                exp[a + "q_norm.weight"] = (d,)
                exp[a + "k_norm.weight"] = (d,)
            elif c.qk_norm == "full":
                exp[a + "q_norm.weight"] = (nH * d,)
                exp[a + "k_norm.weight"] = (nKV * d,)
            if c.moe_layers[l]:
                m = self._moe_prefix(l)
                exp[m + "gate.weight"] = (c.num_experts, H)
                if c.shared_inter:
                    S = c.shared_inter
                    exp[m + "shared_expert.gate_proj.weight"] = (S, H)
                    exp[m + "shared_expert.up_proj.weight"] = (S, H)
                    exp[m + "shared_expert.down_proj.weight"] = (H, S)
                    exp[m + "shared_expert_gate.weight"] = (1, H)
                for e in range(c.num_experts):
                    g, u, dn = self.experts[(l, e)]
                    I = c.expert_inter
                    if g.shape != (I, H) or u.shape != (I, H) or dn.shape != (H, I):
                        raise ValueError(f"layer {l} expert {e}: shapes {g.shape}, {u.shape}, {dn.shape}")
            else:
                D = c.dense_inter
                exp[p + "mlp.gate_proj.weight"] = (D, H)
                exp[p + "mlp.up_proj.weight"] = (D, H)
                exp[p + "mlp.down_proj.weight"] = (H, D)
        for name, shape in exp.items():
            if name not in t:
                raise ValueError(f"missing tensor {name}")
            if tuple(t[name].shape) != shape:
                raise ValueError(f"{name}: shape {tuple(t[name].shape)}, expected {shape}")
        extra = sorted(set(t) - set(exp))
        if extra:
            raise ValueError(f"unexpected tensors (not read by {c.family}): {extra[:5]}")

    # -- layers -------------------------------------------------------------
    def _attention(self, l: int, x: np.ndarray) -> np.ndarray:
        c, t = self.cfg, self.t
        a = f"model.layers.{l}.self_attn."
        T, d, eps = x.shape[0], c.head_dim, c.rms_norm_eps

        def proj(n: str) -> np.ndarray:
            y = x @ t[a + f"{n}_proj.weight"].T
            return y + t[a + f"{n}_proj.bias"] if c.qkv_bias else y

        q, k, v = proj("q"), proj("k"), proj("v")
        if c.qk_norm == "full":          # OLMoE: over the whole projected vector, then clip
            q = ref.rmsnorm(q, t[a + "q_norm.weight"], eps)
            k = ref.rmsnorm(k, t[a + "k_norm.weight"], eps)
        if c.clip_qkv is not None:
            q, k, v = (np.clip(z, -c.clip_qkv, c.clip_qkv) for z in (q, k, v))
        q = q.reshape(T, c.num_heads, d)
        k = k.reshape(T, c.num_kv_heads, d)
        v = v.reshape(T, c.num_kv_heads, d)
        if c.qk_norm == "head":          # Qwen3: per head over head_dim, before RoPE
            q = ref.rmsnorm(q, t[a + "q_norm.weight"], eps)
            k = ref.rmsnorm(k, t[a + "k_norm.weight"], eps)
        pos = np.arange(T)
        q = ref.rope(q, pos, c.rope_theta)
        k = ref.rope(k, pos, c.rope_theta)
        out = attention(q, k, v, 1.0 / math.sqrt(d), c.sliding_window[l]) @ t[a + "o_proj.weight"].T
        return out + t[a + "o_proj.bias"] if c.o_bias else out

    def router_logits(self, l: int, y: np.ndarray) -> np.ndarray:
        """Layer l's router logits [T, E] for its post-attention-norm input y [T, H]."""
        return y @ self.t[self._moe_prefix(l) + "gate.weight"].T

    def _moe(self, l: int, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c, t = self.cfg, self.t
        experts, weights = route(self.router_logits(l, y), c.top_k, c.norm_topk_prob)
        out = np.zeros_like(y)
        for e in range(c.num_experts):
            w = np.where(experts == e, weights, 0.0).sum(axis=-1)
            if np.any(w):
                out += w[:, None] * ref.ffn(y, *self.experts[(l, e)])
        if c.shared_inter:
            m = self._moe_prefix(l)
            shared = ref.ffn(y, t[m + "shared_expert.gate_proj.weight"], t[m + "shared_expert.up_proj.weight"],
                             t[m + "shared_expert.down_proj.weight"])
            out += sigmoid(y @ t[m + "shared_expert_gate.weight"].T) * shared
        return out, experts, weights

    # -- whole model -------------------------------------------------------
    def forward(self, ids: np.ndarray | list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[T] ids -> logits [T, V], experts [L, T, k] (-1 rows for dense layers) and their
        weights [L, T, k] (0 for dense layers).  Full causal recompute, positions from 0."""
        c, t = self.cfg, self.t
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError("ids must be a non-empty 1-D sequence")
        if np.any(ids < 0) or np.any(ids >= c.vocab_size):
            raise ValueError(f"token id outside [0, {c.vocab_size})")
        T = ids.shape[0]
        experts = np.full((c.num_layers, T, c.top_k), -1, dtype=np.int64)
        weights = np.zeros((c.num_layers, T, c.top_k))
        h = t["model.embed_tokens.weight"][ids]
        for l in range(c.num_layers):
            p = f"model.layers.{l}."
            h = h + self._attention(l, ref.rmsnorm(h, t[p + "input_layernorm.weight"], c.rms_norm_eps))
            y = ref.rmsnorm(h, t[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
            if c.moe_layers[l]:
                out, experts[l], weights[l] = self._moe(l, y)
            else:
                out = ref.ffn(y, t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"],
                              t[p + "mlp.down_proj.weight"])
            h = h + out
        h = ref.rmsnorm(h, t["model.norm.weight"], c.rms_norm_eps)
        head = t["model.embed_tokens.weight"] if c.tied else t["lm_head.weight"]
        return h @ head.T, experts, weights

    def generate(self, prompt: np.ndarray | list[int], steps: int) -> dict[str, np.ndarray]:
        """Greedy decoding ignoring EOS, by full recompute at every step.

        Returns output_ids [S]; logits [S, V] (row i after the prompt and output tokens < i);
        experts / expert_weights [L, P+S-1, k] for every fed token (the last output token is
        never fed)."""
        seq = [int(x) for x in prompt]
        if not seq or steps < 1:
            raise ValueError("need a non-empty prompt and steps >= 1")
        P = len(seq)
        out = []
        for _ in range(steps):
            logits = self.forward(seq)[0][-1]
            out.append(int(np.argmax(logits)))
            seq.append(out[-1])
        logits, experts, weights = self.forward(seq[:-1])
        return {"prompt_ids": np.asarray(prompt, dtype=np.int64),
                "output_ids": np.asarray(out, dtype=np.int64),
                "logits": logits[P - 1:], "experts": experts, "expert_weights": weights}


def stack_experts(model: FamilyModel) -> dict[str, np.ndarray]:
    """The model's tensors with every MoE layer's experts stacked as transformers holds them:
    ``model.layers.{l}.mlp.experts.gate_up_proj [E, 2I, H]`` and ``...down_proj [E, H, I]``
    (router and shared expert under ``mlp.`` too)."""
    c = model.cfg
    out: dict[str, np.ndarray] = {}
    for name, v in model.t.items():
        out[name.replace(".block_sparse_moe.", ".mlp.")] = v
    for l in range(c.num_layers):
        if not c.moe_layers[l]:
            continue
        ex = [model.experts[(l, e)] for e in range(c.num_experts)]
        p = f"model.layers.{l}.mlp.experts."
        out[p + "gate_up_proj"] = np.stack([np.concatenate([g, u]) for g, u, _ in ex])
        out[p + "down_proj"] = np.stack([d for _, _, d in ex])
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("ids", type=int, nargs="+")
    ap.add_argument("--steps", type=int, default=16)
    a = ap.parse_args(argv)
    m = FamilyModel(a.model_dir)
    g = m.generate(a.ids, a.steps)
    print("family:", m.cfg.family)
    print("output_ids:", " ".join(map(str, g["output_ids"])))
    for l in range(m.cfg.num_layers):
        print(f"layer {l} experts:", g["experts"][l].tolist())


if __name__ == "__main__":
    main()
