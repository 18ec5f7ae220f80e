"""Generate the committed test fixtures under tests/fixtures/ (deterministic).

    python3 tests/reference/make_fixtures.py [--out DIR] [--only NAME ...]

Each fixture is tests/fixtures/<name>/model/ (a complete model directory) plus
tests/fixtures/<name>/expected.safetensors, computed by readme_ref.py from the
weights exactly as written to disk (so BF16/F16 rounding is included).
Re-running produces byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import readme_ref as ref

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUT = os.path.join(ROOT, "tests", "fixtures")

STEPS = 40
PROMPT_LENS = (1, 7, 23)
MIN_LOGIT_MARGIN = 1e-3      # greedy top-1 vs top-2 gap, and router ranking gaps
MIN_DISTINCT_EXPERTS = 3

COMMON = {"vocab": 384, "hidden": 64, "layers": 2, "heads": 4, "head_dim": 16, "router_dim": 32,
          "router_heads": 2, "router_inter": 48, "experts": 4, "max_pos": 256, "max_pos_pred": 256,
          "rope_theta": 10000.0, "eps": 1e-5}

FIXTURES = {
    "fused_f32": dict(COMMON, seed=1001, layout="fused", dtype="F32", kv_heads=2, tied=False,
                      top_k=1, normalizer=2.0, intermediate_size=96,
                      expert_inter=(48, 64), sharded=False),
    "residual_bf16_sharded": dict(COMMON, seed=2002, layout="residual", dtype="BF16", kv_heads=1,
                                  tied=True, top_k=2, normalizer=1.0, intermediate_size=96,
                                  expert_inter=(48, 48), residual_inter=(32, 32), sharded=True,
                                  # tied head: small embeddings (O(1) logits) and stronger
                                  # layer outputs, else greedy decoding echoes the input token
                                  embed_scale=0.25, out_gain=2.0),
    "masked_f16": dict(COMMON, seed=3003, layout="masked", dtype="F16", kv_heads=4, tied=False,
                       top_k=1, normalizer=3.0, intermediate_size=96, residual_channels=32,
                       expert_channels=24, expert_residual_overlap=4, sharded=False),
}

TORCH_DTYPE = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
NP_DTYPE = {"F32": np.float32, "F16": np.float16}


# --------------------------------------------------------------------------
# random model
# --------------------------------------------------------------------------


def make_config(s: dict) -> dict:
    return {
        "architectures": ["ReadMEForCausalLM"],
        "model_type": "llama",
        "vocab_size": s["vocab"],
        "hidden_size": s["hidden"],
        "intermediate_size": s["intermediate_size"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"],
        "head_dim": s["head_dim"],
        "hidden_act": "silu",
        "rms_norm_eps": s["eps"],
        "rope_theta": s["rope_theta"],
        "max_position_embeddings": s["max_pos"],
        "tie_word_embeddings": s["tied"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": TORCH_DTYPE[s["dtype"]],
        "add_cluster_predictor": True,
        "N_cluster": s["experts"],
        "embedding_dim": s["router_dim"],
        "inter_dim": s["router_inter"],
        "n_layer": 1,
        "n_head": s["router_heads"],
        "normalizer": s["normalizer"],
        "hidden_act_predictor": "silu",
        "max_position_embeddings_predictor": s["max_pos_pred"],
        "nonautoregressive": False,
        "router_top_k": s["top_k"],
    }


def make_weights(s: dict, rng: np.random.Generator, router_out_scale: float):
    """float64 weights; returns (model tensors, mask tensors)."""
    V, H, L = s["vocab"], s["hidden"], s["layers"]
    nH, nKV, d = s["heads"], s["kv_heads"], s["head_dim"]
    D, F, N = s["router_dim"], s["router_inter"], s["experts"]

    def lin(out, inp, gain=1.0):
        return rng.standard_normal((out, inp)) * (gain / np.sqrt(inp))

    def norm(n):
        return 1.0 + 0.1 * rng.standard_normal(n)

    def bias(n):
        return 0.05 * rng.standard_normal(n)

    t: dict[str, np.ndarray] = {}
    masks: dict[str, np.ndarray] = {}
    t["model.embed_tokens.weight"] = rng.standard_normal((V, H)) * s.get("embed_scale", 1.0)
    for l in range(L):
        p = f"model.layers.{l}."
        t[p + "input_layernorm.weight"] = norm(H)
        t[p + "self_attn.q_proj.weight"] = lin(nH * d, H)
        t[p + "self_attn.k_proj.weight"] = lin(nKV * d, H)
        t[p + "self_attn.v_proj.weight"] = lin(nKV * d, H)
        t[p + "self_attn.o_proj.weight"] = lin(H, nH * d, gain=s.get("out_gain", 1.0))
        t[p + "post_attention_layernorm.weight"] = norm(H)
        if s["layout"] == "masked":
            I = s["intermediate_size"]
            t[p + "mlp.gate_proj.weight"] = lin(I, H)
            t[p + "mlp.up_proj.weight"] = lin(I, H)
            active = s["residual_channels"] + s["expert_channels"]
            t[p + "mlp.down_proj.weight"] = rng.standard_normal((H, I)) / np.sqrt(active)
            perm = rng.permutation(I)
            res_ch = perm[: s["residual_channels"]]
            other = perm[s["residual_channels"]:]
            rmask = np.zeros(I, dtype=np.uint8)
            rmask[res_ch] = 1
            emask = np.zeros((N, I), dtype=np.uint8)
            for e in range(N):
                # per-expert channels (overlapping between experts) ...
                emask[e, rng.choice(other, s["expert_channels"], replace=False)] = 1
                # ... and a few residual channels also flagged in the expert mask,
                # as in Read-ME checkpoints (they must not be counted twice)
                emask[e, rng.choice(res_ch, s["expert_residual_overlap"], replace=False)] = 1
            masks[p + "mlp.residual_mask"] = rmask
            masks[p + "mlp.expert_mask"] = emask
        else:
            Ie = s["expert_inter"][l]
            for e in range(N):
                t[p + f"moe.gate_proj_{e}.weight"] = lin(Ie, H)
                t[p + f"moe.up_proj_{e}.weight"] = lin(Ie, H)
                t[p + f"moe.down_proj_{e}.weight"] = lin(H, Ie, gain=s.get("out_gain", 1.0))
            if s["layout"] == "residual":
                Ir = s["residual_inter"][l]
                t[p + "moe.gate_proj_residual.weight"] = lin(Ir, H)
                t[p + "moe.up_proj_residual.weight"] = lin(Ir, H)
                t[p + "moe.down_proj_residual.weight"] = lin(H, Ir, gain=s.get("out_gain", 1.0))
    t["model.norm.weight"] = norm(H)
    if not s["tied"]:
        t["lm_head.weight"] = lin(V, H, gain=2.0)
    r = ref.ROUTER_PREFIX
    t[r + "embed.weight"] = rng.standard_normal((V, D))
    t[r + "input_layernorm_0.weight"] = norm(D)
    for n in ("q", "k", "v", "o"):
        t[r + f"{n}_proj_0.weight"] = lin(D, D)
        t[r + f"{n}_proj_0.bias"] = bias(D)
    t[r + "post_attention_layernorm_0.weight"] = norm(D)
    t[r + "proj_1_0.weight"] = lin(F, D)
    t[r + "proj_1_0.bias"] = bias(F)
    t[r + "proj_2_0.weight"] = lin(D, F)
    t[r + "proj_2_0.bias"] = bias(D)
    t[r + "out_layernorm.weight"] = norm(D)
    t[r + "proj_out.weight"] = lin(N, D, gain=router_out_scale)
    t[r + "proj_out.bias"] = bias(N)
    return t, masks


# --------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------


def write_tensor_file(path: str, tensors: dict[str, np.ndarray], dtype: str) -> int:
    """Write one weight file; returns the number of data bytes."""
    if dtype == "BF16":
        ref.write_safetensors(path, {k: ("BF16", v) for k, v in tensors.items()},
                              metadata={"format": "pt"})
        return sum(v.size * 2 for v in tensors.values())
    arrs = {k: np.ascontiguousarray(v.astype(NP_DTYPE[dtype])) for k, v in tensors.items()}
    save_file(arrs, path, metadata={"format": "pt"})
    return sum(a.nbytes for a in arrs.values())


def write_model(model_dir: str, s: dict, cfg: dict, t: dict, masks: dict) -> None:
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    if s["sharded"]:
        # shard 1: embeddings + first half of the layers; shard 2: the rest + router
        first = set(range(s["layers"] // 2))
        shards = {1: {}, 2: {}}
        for k, v in t.items():
            in_first = k == "model.embed_tokens.weight" or any(
                k.startswith(f"model.layers.{l}.") for l in first)
            shards[1 if in_first else 2][k] = v
        weight_map, total = {}, 0
        for i, part in shards.items():
            fname = f"model-{i:05d}-of-00002.safetensors"
            total += write_tensor_file(os.path.join(model_dir, fname), part, s["dtype"])
            for k in part:
                weight_map[k] = fname
        index = {"metadata": {"total_size": total},
                 "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(model_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
    else:
        write_tensor_file(os.path.join(model_dir, "model.safetensors"), t, s["dtype"])
    if masks:
        save_file({k: np.ascontiguousarray(v) for k, v in masks.items()},
                  os.path.join(model_dir, "masks.safetensors"))


# --------------------------------------------------------------------------
# checks on the generated outputs
# --------------------------------------------------------------------------


def min_margins(model: ref.Model, gen: dict) -> tuple[float, float]:
    """Smallest greedy top-1/top-2 gap and smallest gap in the router ranking that
    decides the selected experts and their order."""
    s = np.sort(gen["logits"], axis=-1)
    greedy = float(np.min(s[:, -1] - s[:, -2]))
    seq = np.concatenate([gen["prompt_ids"], gen["output_ids"]])
    rl = -np.sort(-model.router_logits(seq), axis=-1)
    k = model.cfg.top_k
    router = float(np.min(rl[:, :k] - rl[:, 1:k + 1]))
    return greedy, router


def build_fixture(name: str, s: dict, out_root: str, verbose: bool = True) -> dict:
    fdir = os.path.join(out_root, name)
    model_dir = os.path.join(fdir, "model")
    cfg = make_config(s)
    router_out_scale = 2.0
    for attempt in range(8):
        rng = np.random.default_rng(s["seed"])
        t, masks = make_weights(s, rng, router_out_scale)
        if os.path.exists(fdir):
            shutil.rmtree(fdir)
        write_model(model_dir, s, cfg, t, masks)
        model = ref.Model(model_dir)
        assert model.layout == s["layout"], (model.layout, s["layout"])
        prompt_rng = np.random.default_rng(s["seed"] + 1)
        cases = []
        for P in PROMPT_LENS:
            for _ in range(100):
                prompt = prompt_rng.integers(3, s["vocab"], size=P, dtype=np.int64)
                gen = model.generate(prompt, STEPS)
                g, r = min_margins(model, gen)
                if g >= MIN_LOGIT_MARGIN and r >= MIN_LOGIT_MARGIN:
                    break
            else:
                raise RuntimeError(f"{name}: no prompt of length {P} with safe margins")
            cases.append((gen, g, r))
        top1 = np.concatenate([c[0]["experts"][:, 0] for c in cases])
        if len(np.unique(top1)) >= MIN_DISTINCT_EXPERTS:
            break
        router_out_scale *= 2.0
    else:
        raise RuntimeError(f"{name}: router keeps choosing fewer than {MIN_DISTINCT_EXPERTS} experts")

    expected = {}
    for c, (gen, g, r) in enumerate(cases):
        out = gen["output_ids"]
        if len(np.unique(out)) < 2:
            raise RuntimeError(f"{name} case {c}: greedy output is one repeated token")
        assert np.array_equal(np.argmax(gen["logits"], axis=-1), out)
        expected[f"case{c}.prompt_ids"] = gen["prompt_ids"].astype(np.int64)
        expected[f"case{c}.output_ids"] = out.astype(np.int64)
        expected[f"case{c}.logits"] = gen["logits"].astype(np.float32)
        expected[f"case{c}.experts"] = gen["experts"].astype(np.int64)
        expected[f"case{c}.expert_weights"] = gen["expert_weights"].astype(np.float32)
        if verbose:
            print(f"  case{c}: P={len(gen['prompt_ids'])} distinct outputs={len(np.unique(out))} "
                  f"experts used={np.bincount(gen['experts'].ravel(), minlength=model.N).tolist()} "
                  f"min greedy margin={g:.4f} min router margin={r:.4f}")
    # own writer: safetensors' save_file orders a multi-key __metadata__ at random
    ref.write_safetensors(
        os.path.join(fdir, "expected.safetensors"),
        {k: ("I64" if v.dtype == np.int64 else "F32", v) for k, v in expected.items()},
        metadata={"fixture": name, "steps": str(STEPS), "layout": s["layout"],
                  "generator": "tests/reference/make_fixtures.py"})
    if verbose:
        print(f"{name}: layout={s['layout']} dtype={s['dtype']} router_out_scale={router_out_scale} "
              f"distinct top-1 experts={len(np.unique(top1))}")
    return expected


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("-q", "--quiet", action="store_true")
    a = ap.parse_args(argv)
    names = a.only or list(FIXTURES)
    for name in names:
        build_fixture(name, FIXTURES[name], a.out, verbose=not a.quiet)


if __name__ == "__main__":
    main()
