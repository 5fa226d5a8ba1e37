"""The native runner: one generic runner for the model families in ``families/`` (Llama,
Mistral, Qwen2); see ``runner.py``."""

from server.engine.native.families import FAMILIES, family_for, supported_model_types
from server.engine.native.layers import rope_supported
from server.engine.native.runner import NativeLlamaRunner

SUPPORTED_MODEL_TYPES = supported_model_types()


def supports(config: dict) -> bool:
    """True when the native runner runs this ``config.json`` (a registered family, a RoPE kind it has)."""
    if config.get("model_type") not in FAMILIES:
        return False
    try:
        return rope_supported(family_for(config).read_config(config).rope_scaling)
    except (KeyError, ValueError, TypeError):
        return False


__all__ = ["SUPPORTED_MODEL_TYPES", "NativeLlamaRunner", "supports"]
