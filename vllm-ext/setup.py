"""Builds libpregate.so with cargo and bundles it in the package.

setuptools rather than maturin: maturin packages a pyo3 or cffi crate, or a binary, while
libpregate.so is a plain C-ABI cdylib loaded with ctypes; a `build_py` hook that runs cargo needs
nothing beyond setuptools, which works offline (`pip install --no-build-isolation ./vllm-ext`).
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parent.parent


def build_library() -> Path:
    """Runs `cargo build --release -p pregate-adapters` and returns the cdylib it produced."""
    prebuilt = os.environ.get("PREGATE_LIB")
    if prebuilt:
        return Path(prebuilt)
    cmd = ["cargo", "build", "--release", "-p", "pregate-adapters", "--message-format=json"]
    try:
        run = subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True)
    except FileNotFoundError as e:
        raise RuntimeError("building pregate-vllm needs cargo (Rust) on PATH") from e
    for line in run.stdout.splitlines():
        msg = json.loads(line) if line.startswith("{") else {}
        if msg.get("reason") == "compiler-artifact" and "cdylib" in msg["target"]["kind"]:
            for f in msg["filenames"]:
                if f.endswith(".so"):
                    return Path(f)
    raise RuntimeError("cargo built no cdylib for pregate-adapters")


class BuildWithLibrary(build_py):
    """build_py that also places libpregate.so in the package."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "pregate_vllm" / "libpregate.so"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(build_library(), target)


class BinaryDistribution(Distribution):
    """The wheel holds a shared object: tag it for this platform, not as pure Python."""

    def has_ext_modules(self) -> bool:
        return True


setup(cmdclass={"build_py": BuildWithLibrary}, distclass=BinaryDistribution)
