"""Generate the Hugging Face MoE family fixtures under tests/fixtures/ with transformers.

    /work/venv-tf/bin/python tests/reference/make_family_fixtures.py [--out DIR] [--only NAME ...]

Needs torch and transformers (see tests/reference/README.md for the pinned versions); the tests
never import this file, so CI runs without them.  For each family a tiny random model is built
from fixed seeds, run in float32 with eager attention, and saved with ``save_pretrained`` (Hub
tensor names).  ``tests/fixtures/<name>/expected.safetensors`` holds, per case, the prompt,
32 greedy tokens (EOS ignored), the logits after the prompt and after each fed output token
(one full forward of the whole sequence, no KV cache; checked against cached generation), and
every MoE layer's top-k experts and applied routing weights.  Re-running produces
byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

import families_ref as fam
import numpy as np
import readme_ref as ref
import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))

ROOT = os.path.dirname(os.path.dirname(HERE))
DEFAULT_OUT = os.path.join(ROOT, "tests", "fixtures")

STEPS = 32
PROMPT_LENS = (1, 7, 19)
MIN_GAP = 1e-3          # greedy top-1 vs top-2 logit gap; every router probability gap up to the k+1-th
PROMPT_TRIES = 400
CACHED_LOGIT_RTOL = 1e-4

COMMON: dict[str, Any] = {
    "vocab_size": 256, "hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
    "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    "num_experts_per_tok": 2, "tie_word_embeddings": False,
}


@dataclass
class Spec:
    """One fixture: the family's config class, its config values, and how it is written."""

    family: str
    seed: int
    config: dict[str, Any]
    save_dtype: str = "float32"
    max_shard_size: str | None = None
    router_scale: float = 3.0
    head_gain: float = 2.0
    embed_scale: float = 1.0
    out_gain: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)


FIXTURES: dict[str, Spec] = {
    "mixtral_f32_sharded": Spec(
        "mixtral", 4101,
        dict(COMMON, num_hidden_layers=2, intermediate_size=32, num_local_experts=8,
             rope_parameters={"rope_type": "default", "rope_theta": 1e6}, sliding_window=None,
             rms_norm_eps=1e-5),
        max_shard_size="400KB"),
    # a window shorter than every case's context: prompts of 7 and 19 tokens and 31 fed outputs
    "mixtral_swa_f32": Spec(
        "mixtral", 4105,
        dict(COMMON, num_hidden_layers=2, intermediate_size=32, num_local_experts=8,
             rope_parameters={"rope_type": "default", "rope_theta": 1e6}, sliding_window=6,
             rms_norm_eps=1e-5)),
    "qwen2_moe_f32": Spec(
        "qwen2_moe", 4202,
        dict(COMMON, num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32,
             shared_expert_intermediate_size=48, num_experts=4, norm_topk_prob=False,
             qkv_bias=True, mlp_only_layers=[1], decoder_sparse_step=1, use_sliding_window=False,
             rope_parameters={"rope_type": "default", "rope_theta": 1e6}, rms_norm_eps=1e-6,
             eos_token_id=[2, 3])),
    "qwen3_moe_bf16": Spec(
        "qwen3_moe", 4303,
        dict(COMMON, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             intermediate_size=96, moe_intermediate_size=32, num_experts=8, norm_topk_prob=True,
             attention_bias=False, mlp_only_layers=[], decoder_sparse_step=1,
             use_sliding_window=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
             rms_norm_eps=1e-6),
        save_dtype="bfloat16"),
    "olmoe_f32": Spec(
        "olmoe", 4404,
        dict(COMMON, num_hidden_layers=2, intermediate_size=32, num_experts=8, norm_topk_prob=False,
             clip_qkv=1.5, attention_bias=False, tie_word_embeddings=True,
             rope_parameters={"rope_type": "default", "rope_theta": 1e4}, rms_norm_eps=1e-5),
        # tied head: small embeddings and stronger layer outputs, else greedy decoding settles on
        # one repeated token
        embed_scale=0.25, out_gain=2.0, router_scale=2.0),
}

MODEL_CLASSES = {
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM),
}


# --------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------


def init_weights(model: torch.nn.Module, spec: Spec) -> None:
    """Overwrite every parameter from one NumPy generator, in name order.

    transformers' own init leaves norms at 1 and biases at 0, which would hide a misplaced norm
    or a dropped bias; a NumPy generator also keeps the values independent of torch's RNG."""
    rng = np.random.default_rng(spec.seed)
    params = dict(model.named_parameters())      # tied parameters appear once
    for name in sorted(params):
        p = params[name]
        shape = tuple(p.shape)
        if name.endswith("norm.weight"):
            v = 1.0 + 0.2 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            v = 0.2 * rng.standard_normal(shape)
        elif name == "model.embed_tokens.weight":
            v = spec.embed_scale * rng.standard_normal(shape)
        elif name.endswith("mlp.gate.weight"):
            v = spec.router_scale * rng.standard_normal(shape) / np.sqrt(shape[-1])
        elif name == "lm_head.weight":
            v = spec.head_gain * rng.standard_normal(shape) / np.sqrt(shape[-1])
        elif len(shape) in (2, 3):              # [out, in] or stacked experts [E, out, in]
            gain = spec.out_gain if name.endswith(("o_proj.weight", "down_proj")) else 1.0
            v = gain * rng.standard_normal(shape) / np.sqrt(shape[-1])
        else:
            raise RuntimeError(f"no init rule for {name} {shape}")
        with torch.no_grad():
            p.copy_(torch.from_numpy(v.astype(np.float32)))


def build_model(spec: Spec) -> torch.nn.Module:
    config_cls, model_cls = MODEL_CLASSES[spec.family]
    config = config_cls(**spec.config)
    config._attn_implementation = "eager"
    torch.manual_seed(spec.seed)
    model = model_cls(config).eval()
    init_weights(model, spec)
    if spec.save_dtype == "bfloat16":
        # compute in f32 on exactly the values the bf16 checkpoint stores
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).to(torch.float32))
    return model


class RouteRecorder:
    """Forward hooks on every layer's router: transformers' own top-k indices and weights."""

    def __init__(self, model: torch.nn.Module, num_layers: int) -> None:
        self.layers: dict[int, tuple[torch.Tensor, ...]] = {}
        self.num_layers = num_layers
        self.handles = []
        for name, mod in model.named_modules():
            if type(mod).__name__.endswith("TopKRouter"):
                layer = int(name.split(".")[2])
                self.handles.append(mod.register_forward_hook(self._hook(layer)))

    def _hook(self, layer: int):
        def hook(_mod, _inp, out):
            logits, weights, index = out
            self.layers[layer] = (logits.detach().clone(), weights.detach().clone(),
                                  index.detach().clone())
        return hook

    def clear(self) -> None:
        self.layers = {}


# --------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------


def run_case(model: torch.nn.Module, rec: RouteRecorder, prompt: np.ndarray, k: int,
             num_layers: int) -> dict[str, Any]:
    seq = [int(x) for x in prompt]
    P = len(seq)
    with torch.no_grad():
        for _ in range(STEPS):            # greedy, full recompute each step, EOS ignored
            logits = model(torch.tensor([seq])).logits[0, -1]
            seq.append(int(torch.argmax(logits)))
        fed = torch.tensor([seq[: P + STEPS - 1]])
        rec.clear()
        full = model(fed).logits[0].double().numpy()
    out = np.asarray(seq[P:], dtype=np.int64)
    rows = full[P - 1:]
    T = P + STEPS - 1
    experts = np.full((num_layers, T, k), -1, dtype=np.int64)
    weights = np.zeros((num_layers, T, k), dtype=np.float32)
    router_gap = np.inf
    for layer, (rl, w, idx) in rec.layers.items():
        experts[layer] = idx.numpy()
        weights[layer] = w.float().numpy()
        probs = -np.sort(-ref.softmax(rl.double().numpy()), axis=-1)
        router_gap = min(router_gap, float(np.min(probs[:, :k] - probs[:, 1:k + 1])))
    s = np.sort(rows, axis=-1)
    greedy_gap = float(np.min(s[:, -1] - s[:, -2]))
    return {"prompt_ids": np.asarray(prompt, dtype=np.int64), "output_ids": out,
            "logits": rows.astype(np.float32), "experts": experts, "expert_weights": weights,
            "greedy_gap": greedy_gap, "router_gap": router_gap,
            "argmax_ok": bool(np.array_equal(np.argmax(rows, -1), out))}


def check_cached_generation(model: torch.nn.Module, case: dict[str, Any]) -> bool:
    """Cached greedy generation gives the same tokens and (nearly) the same logits."""
    ids = torch.tensor([case["prompt_ids"].tolist()])
    with torch.no_grad():
        g = model.generate(ids, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                           output_logits=True, return_dict_in_generate=True)
    toks = g.sequences[0, ids.shape[1]:].numpy()
    if not np.array_equal(toks, case["output_ids"]):
        return False
    cached = torch.stack(g.logits)[:, 0].double().numpy()
    ref_rows = case["logits"].astype(np.float64)
    return float(np.max(np.abs(cached - ref_rows))) <= CACHED_LOGIT_RTOL * float(np.max(np.abs(ref_rows)))


# --------------------------------------------------------------------------
# one fixture
# --------------------------------------------------------------------------


def save_checkpoint(model: torch.nn.Module, spec: Spec, model_dir: str) -> None:
    if spec.save_dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    kwargs: dict[str, Any] = {}
    if spec.max_shard_size:
        kwargs["max_shard_size"] = spec.max_shard_size
    model.save_pretrained(model_dir, **kwargs)


def build_fixture(name: str, spec: Spec, out_root: str, verbose: bool = True) -> dict[str, Any]:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    fdir = os.path.join(out_root, name)
    model_dir = os.path.join(fdir, "model")
    model = build_model(spec)
    cfg = model.config
    L = cfg.num_hidden_layers
    k = cfg.num_experts_per_tok
    rec = RouteRecorder(model, L)
    prompt_rng = np.random.default_rng(spec.seed + 1)
    cases = []
    for P in PROMPT_LENS:
        for _ in range(PROMPT_TRIES):
            prompt = prompt_rng.integers(3, cfg.vocab_size, size=P, dtype=np.int64)
            case = run_case(model, rec, prompt, k, L)
            if (case["argmax_ok"] and case["greedy_gap"] >= MIN_GAP and case["router_gap"] >= MIN_GAP
                    and len(np.unique(case["output_ids"])) >= 3 and check_cached_generation(model, case)):
                break
        else:
            raise RuntimeError(f"{name}: no prompt of length {P} with safe gaps in {PROMPT_TRIES} tries")
        cases.append(case)

    if os.path.exists(fdir):
        shutil.rmtree(fdir)
    os.makedirs(fdir)
    save_checkpoint(model, spec, model_dir)
    got = sorted(fam.checkpoint_tensor_names(model_dir))
    with open(os.path.join(model_dir, "config.json")) as f:
        want = sorted(fam.hub_tensor_names(json.load(f)))
    if got != want:
        raise RuntimeError(f"{name}: saved names are not the Hub layout: "
                           f"extra {sorted(set(got) - set(want))[:4]}, missing {sorted(set(want) - set(got))[:4]}")

    expected: dict[str, tuple[str, np.ndarray]] = {}
    for c, case in enumerate(cases):
        for key in ("prompt_ids", "output_ids", "experts"):
            expected[f"case{c}.{key}"] = ("I64", case[key])
        for key in ("logits", "expert_weights"):
            expected[f"case{c}.{key}"] = ("F32", case[key])
    greedy_gap = min(c["greedy_gap"] for c in cases)
    router_gap = min(c["router_gap"] for c in cases)
    ref.write_safetensors(
        os.path.join(fdir, "expected.safetensors"), expected,
        metadata={"fixture": name, "family": spec.family, "steps": str(STEPS),
                  "min_greedy_gap": f"{greedy_gap:.6f}", "min_router_prob_gap": f"{router_gap:.6f}",
                  "generator": "tests/reference/make_family_fixtures.py",
                  "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__})
    if verbose:
        for c, case in enumerate(cases):
            used = np.bincount(case["experts"][case["experts"] >= 0].ravel(), minlength=cfg.num_experts)
            print(f"  case{c}: P={len(case['prompt_ids'])} distinct outputs={len(np.unique(case['output_ids']))} "
                  f"experts used={used.tolist()} greedy gap={case['greedy_gap']:.4f} "
                  f"router gap={case['router_gap']:.4f}")
        size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(fdir) for f in fs)
        print(f"{name}: min greedy gap {greedy_gap:.4f}, min router probability gap {router_gap:.4f}, "
              f"{size} bytes")
    return {"greedy_gap": greedy_gap, "router_gap": router_gap}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("-q", "--quiet", action="store_true")
    a = ap.parse_args(argv)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in a.only or list(FIXTURES):
        build_fixture(name, FIXTURES[name], a.out, verbose=not a.quiet)


if __name__ == "__main__":
    main()
