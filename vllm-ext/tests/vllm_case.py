"""Runs one vLLM case in a fresh process (vLLM keeps process-wide state, so every `LLM` gets its
own) and prints its outcome as the last stdout line, `RESULT <json>`.

    python vllm_case.py '<json spec>'

spec: `model` (directory), `llm` (keyword arguments of `LLM`), `prompts` (lists of token ids),
`max_tokens`, `logprobs` (top-n log-probabilities per step, 0 for none), `metrics_url` (scraped
after generating, when given), `stats` ("readme": `expert_stats`, "stock": `stock_stats` per
rank, none for a model without pregate's experts). `compilation` in the result: vLLM's
compilation counters of this process. A failure propagates (traceback on stderr,
exit status 1).
"""

import dataclasses
import json
import sys
import urllib.request


def main() -> None:
    spec = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=spec["model"], skip_tokenizer_init=True, **spec.get("llm", {}))
    params = SamplingParams(
        temperature=0.0,
        max_tokens=spec["max_tokens"],
        logprobs=spec.get("logprobs") or None,
        detokenize=False,
        ignore_eos=True,
    )
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
    outputs = []
    for out in llm.generate(prompts, params, use_tqdm=False):
        o = out.outputs[0]
        steps = [{str(t): lp.logprob for t, lp in d.items()} for d in (o.logprobs or [])]
        outputs.append({"tokens": list(o.token_ids), "logprobs": steps})
    kind = spec.get("stats", "readme")
    if kind == "readme":
        from pregate_vllm.model import expert_stats

        stats = llm.apply_model(expert_stats)
    elif kind == "stock":
        from pregate_vllm.stock import stock_stats

        stats = llm.apply_model(stock_stats)
    else:
        stats = None
    from vllm.compilation.counter import compilation_counter

    # This process's count of vLLM's compilation work (all zero under enforce_eager; with
    # VLLM_ENABLE_V1_MULTIPROCESSING=0 and one rank the model is compiled in this process).
    compilation = dataclasses.asdict(compilation_counter)
    result = {"outputs": outputs, "stats": stats, "compilation": compilation}
    if spec.get("metrics_url"):
        with urllib.request.urlopen(spec["metrics_url"], timeout=10) as r:
            result["metrics"] = r.read().decode()
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
