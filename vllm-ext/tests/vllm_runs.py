"""What the tier-2 tests share: one vLLM case run in its own process (`vllm_case.py`, or a code
string), its `RESULT` line read back, and `pregate generate`'s greedy tokens as the reference."""

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Each case in one process (no engine subprocess), offline, a small KV cache, vLLM's CPU platform.
ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_TARGET_DEVICE": "cpu",
}


def run_case(
    code_or_spec: str | dict, extra_env: dict | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    """Runs a `vllm_case.py` spec (a dict) or Python code (a string) in a fresh interpreter."""
    env = {**os.environ, **ENV, **(extra_env or {})}
    if isinstance(code_or_spec, dict):
        cmd = [sys.executable, str(HERE / "vllm_case.py"), json.dumps(code_or_spec)]
    else:
        cmd = [sys.executable, "-c", code_or_spec]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def case_result(p: subprocess.CompletedProcess) -> dict:
    """The case's last `RESULT {json}` line; the case must have succeeded."""
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    assert p.returncode == 0 and lines, f"the vLLM case failed:\n{p.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


def pregate_generate(
    pregate_bin: Path,
    model: Path,
    prompt: list[int],
    new_tokens: int,
    dump_logits: Path | None = None,
) -> dict:
    """`pregate generate --json` on the CPU, greedy, past EOS (its logits to `dump_logits`)."""
    cmd = [
        str(pregate_bin),
        "generate",
        "--model",
        str(model),
        "--prompt-ids",
        ",".join(map(str, prompt)),
        "--max-new-tokens",
        str(new_tokens),
        "--ignore-eos",
        "--device",
        "cpu",
        "--json",
    ]
    if dump_logits is not None:
        cmd += ["--dump-logits", str(dump_logits)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)
