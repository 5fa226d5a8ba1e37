"""The architecture facts the native runner needs, read from a model's ``config.json``.

Which ``model_type`` values are served, and each family's own reading of its config, is the
family registry's (``families/``); this is the Llama-family reading they share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class NativeConfig:
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    qkv_bias: bool  # biases on q, k and v (Qwen2)
    max_positions: int | None
    sliding_window: int | None  # Mistral; attention is full while contexts stay within it

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dict(
        cls, c: dict[str, Any], *, qkv_bias: bool = False, sliding_window_by_default: bool = False
    ) -> NativeConfig:
        """``qkv_bias``: the family always has biases on q, k and v (else ``attention_bias`` says);
        ``sliding_window_by_default``: ``sliding_window`` applies unless ``use_sliding_window`` is
        false (else only when it is true)."""
        heads = int(c["num_attention_heads"])
        hidden = int(c["hidden_size"])
        model_type = str(c["model_type"])
        rope_theta = c.get("rope_theta")
        rope_scaling = c.get("rope_scaling") or c.get("rope_parameters")
        if isinstance(rope_scaling, dict):  # transformers 5 folds rope_theta into rope_parameters
            rope_theta = rope_theta or rope_scaling.get("rope_theta")
            if rope_scaling.get("rope_type", rope_scaling.get("type", "default")) == "default":
                rope_scaling = None
        sliding = c.get("sliding_window") if c.get("use_sliding_window", sliding_window_by_default) else None
        return cls(
            model_type=model_type,
            hidden_size=hidden,
            num_layers=int(c["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or hidden // heads),
            intermediate_size=int(c["intermediate_size"]),
            vocab_size=int(c["vocab_size"]),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta or 10000.0),
            rope_scaling=rope_scaling if isinstance(rope_scaling, dict) else None,
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias or bool(c.get("attention_bias", False)),
            max_positions=int(c["max_position_embeddings"]) if c.get("max_position_embeddings") else None,
            sliding_window=int(sliding) if sliding else None,
        )
