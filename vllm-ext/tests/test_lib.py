import subprocess
import sys

import pytest

from pregate_vllm import _lib


def test_library_loads_and_its_abi_version_matches():
    lib = _lib.load()
    assert lib.pregate_abi_version() == _lib.ABI_VERSION


def test_a_missing_library_names_the_path_tried(monkeypatch, tmp_path):
    missing = tmp_path / "nowhere" / "libpregate.so"
    monkeypatch.setenv(_lib.LIB_ENV, str(missing))
    with pytest.raises(_lib.PregateError) as e:
        _lib.load()
    assert e.value.code == "LOAD" and e.value.path == missing
    assert str(missing) in str(e.value)


def test_a_file_that_is_not_a_library_is_refused(monkeypatch, tmp_path):
    bogus = tmp_path / "libpregate.so"
    bogus.write_text("not an ELF file")
    monkeypatch.setenv(_lib.LIB_ENV, str(bogus))
    with pytest.raises(_lib.PregateError, match="cannot load"):
        _lib.load()


def test_register_is_idempotent_and_imports_no_vllm():
    # Tier 1 may share its environment with tier 2, where vLLM is installed and register() rightly
    # imports it; so the no-vLLM path is checked in a child process in which vLLM cannot be found.
    code = (
        "import importlib.util, sys\n"
        "find = importlib.util.find_spec\n"
        "importlib.util.find_spec = (\n"
        "    lambda n, *a: None if n.split('.')[0] == 'vllm' else find(n, *a))\n"
        "import pregate_vllm\n"
        "first = pregate_vllm.register()\n"
        "print(first, pregate_vllm.register(), 'vllm' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    # Without vLLM there is nothing to register with, the answer is stable, and vLLM is never
    # imported.
    assert out.stdout.split() == ["False", "False", "False"]
