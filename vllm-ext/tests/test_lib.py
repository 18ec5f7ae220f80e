import sys

import pytest

import pregate_vllm
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
    first = pregate_vllm.register()
    assert pregate_vllm.register() == first
    # Tier 1 runs without vLLM: there is nothing to register with, and vLLM is never imported.
    assert first is False
    assert "vllm" not in sys.modules
