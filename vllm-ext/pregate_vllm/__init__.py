"""pregate for vLLM and torch: the expert runtime of libpregate.so as torch custom ops
(`torch.ops.pregate.plan_step`, `torch.ops.pregate.moe_layer`), and a torch Read-ME router.

`register()` is vLLM's `vllm.general_plugins` entry point. It is idempotent, imports vLLM lazily and
touches no CUDA. It registers the `ReadMEForCausalLM` architecture (`pregate_vllm.model`) and
`PregateMoeForCausalLM` (`pregate_vllm.stock`: stock Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE
checkpoints), imported by vLLM only when a model asks for one.
"""

import importlib.util
import logging

__all__ = ["register"]

ARCHITECTURE = "ReadMEForCausalLM"
MODEL_CLASS = "pregate_vllm.model:ReadMEForCausalLM"
#: Stock Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE checkpoints with pregate's expert cache, selected
#: with `hf_overrides={"architectures": ["PregateMoeForCausalLM"]}`.
STOCK_ARCHITECTURE = "PregateMoeForCausalLM"
STOCK_CLASS = "pregate_vllm.stock:PregateMoeForCausalLM"

_log = logging.getLogger(__name__)
_registered = False


def register() -> bool:
    """Registers pregate's architectures with vLLM; returns whether they are registered."""
    global _registered
    if _registered:
        return True
    if importlib.util.find_spec("vllm") is None:
        # Only vLLM calls this; without it (torch-only use) there is nothing to register with.
        _log.debug("pregate_vllm: vLLM is not installed; %s not registered", ARCHITECTURE)
        return False
    from vllm import ModelRegistry  # lazily: vLLM calls this in every process it starts

    # The string form is imported lazily (no CUDA initialisation in a forked parent).
    supported = ModelRegistry.get_supported_archs()
    for arch, cls in ((ARCHITECTURE, MODEL_CLASS), (STOCK_ARCHITECTURE, STOCK_CLASS)):
        if arch not in supported:
            ModelRegistry.register_model(arch, cls)
    _registered = True
    return True
