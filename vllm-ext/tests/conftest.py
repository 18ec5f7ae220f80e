"""Tier-1 tests: torch and libpregate.so only. vLLM must never be imported by them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_vllm():
    yield
    assert "vllm" not in sys.modules, "a tier-1 test imported vllm"


@pytest.fixture(scope="session")
def pregate_bin() -> Path:
    path = Path(os.environ.get("PREGATE_BIN", ROOT / "target" / "release" / "pregate"))
    if not path.is_file():
        pytest.skip(f"the pregate CLI is not built ({path}): cargo build --release -p pregate-cli")
    return path


@pytest.fixture(scope="session")
def tiny_h64(pregate_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-h64")
    cmd = [str(pregate_bin), "make-model", "--preset", "tiny-h64", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    return out
