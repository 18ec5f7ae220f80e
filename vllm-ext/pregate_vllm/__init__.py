"""pregate for vLLM and torch: the expert runtime of libpregate.so as torch custom ops
(`torch.ops.pregate.plan_step`, `torch.ops.pregate.moe_layer`), and a torch Read-ME router.

`register()` is vLLM's `vllm.general_plugins` entry point. It is idempotent, imports vLLM lazily and
touches no CUDA. It registers the `ReadMEForCausalLM` architecture (`pregate_vllm.model`, imported
by vLLM only when a model asks for it).
"""

import importlib.util
import logging

__all__ = ["register"]

ARCHITECTURE = "ReadMEForCausalLM"
MODEL_CLASS = "pregate_vllm.model:ReadMEForCausalLM"

_log = logging.getLogger(__name__)
_registered = False


def register() -> bool:
    """Registers pregate's architecture with vLLM; returns whether it is registered."""
    global _registered
    if _registered:
        return True
    if importlib.util.find_spec("vllm") is None:
        # Only vLLM calls this; without it (torch-only use) there is nothing to register with.
        _log.debug("pregate_vllm: vLLM is not installed; %s not registered", ARCHITECTURE)
        return False
    from vllm import ModelRegistry  # lazily: vLLM calls this in every process it starts

    # The string form is imported lazily (no CUDA initialisation in a forked parent).
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    _registered = True
    return True
