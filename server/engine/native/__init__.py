"""The native runner for Llama-family models (Llama, Mistral, Qwen2); see ``runner.py``."""

from server.engine.native.config import SUPPORTED_MODEL_TYPES, NativeConfig
from server.engine.native.layers import rope_supported
from server.engine.native.runner import NativeLlamaRunner


def supports(config: dict) -> bool:
    """True when the native runner runs this ``config.json`` (by ``model_type`` and RoPE kind)."""
    if config.get("model_type") not in SUPPORTED_MODEL_TYPES:
        return False
    try:
        return rope_supported(NativeConfig.from_dict(config).rope_scaling)
    except (KeyError, ValueError, TypeError):
        return False


__all__ = ["SUPPORTED_MODEL_TYPES", "NativeLlamaRunner", "supports"]
