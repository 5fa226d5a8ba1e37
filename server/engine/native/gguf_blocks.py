"""A GGUF file's projection weights kept as shipped (``--quantization gguf``).

Each linear projection's blocks become a ``quantized.py`` weight without re-quantizing:

    GGUF type   block (32 weights)                     kept as
    Q8_0        d f16 | 32 x int8                      Int8Weight(group 32, scale = d)
    Q4_0        d f16 | 16 bytes of nibbles            Q4Weight(offset -8, scale = d)
    Q4_1        d f16 | m f16 | 16 bytes of nibbles    Q4Weight(offset 0, scale = d, min = m)

The nibbles keep their bytes; only the float16 scales are widened to float32 (exact). Other types
(Q4_K, Q5_K, Q6_K, ...) are refused at start with an error naming the type and tensor.

llama.cpp's converter permutes the rows of q and k (its RoPE layout); they are permuted back
here exactly as transformers' GGUF loader does, whole rows at a time (blocks run along a row).
A file that cannot be parsed, lacks a tensor, or whose shape or size disagrees with the model's
config is a ``GgufError`` naming the file and the tensor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from server.engine.native.config import NativeConfig
from server.engine.native.quantized import Int8Weight, Q4Weight, QuantizedWeight

SUPPORTED = ("Q8_0", "Q4_0", "Q4_1")
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}

# GGUF tensor name (per layer) -> Hugging Face module path
NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


class GgufError(ValueError):
    """A GGUF file that cannot be served with --quantization gguf (the message says why)."""


def _expected_shapes(config: NativeConfig) -> dict[str, tuple[int, int]]:
    c = config
    return {
        "attn_q": (c.q_size, c.hidden_size),
        "attn_k": (c.kv_size, c.hidden_size),
        "attn_v": (c.kv_size, c.hidden_size),
        "attn_output": (c.hidden_size, c.q_size),
        "ffn_gate": (c.intermediate_size, c.hidden_size),
        "ffn_up": (c.intermediate_size, c.hidden_size),
        "ffn_down": (c.hidden_size, c.intermediate_size),
    }


def _unpermute_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (transformers' ``_reverse_permute_weights``)."""
    dim = rows.shape[0] // heads // 2
    return rows.reshape(heads, dim, 2, *rows.shape[1:]).swapaxes(2, 1).reshape(rows.shape)


def blocks_to_weight(kind: str, data: np.ndarray, out: int, k: int) -> QuantizedWeight:
    """data: uint8 [out, k / 32 * block bytes] -> the weight, its nibbles and int8s as shipped."""
    groups = k // 32
    blocks = torch.from_numpy(np.array(data, dtype=np.uint8)).view(out, groups, BLOCK_BYTES[kind])  # a copy
    d = blocks[:, :, 0:2].contiguous().view(torch.float16)[..., 0].float()  # [out, groups]
    if kind == "Q8_0":
        q = blocks[:, :, 2:].contiguous().view(torch.int8).reshape(out, k)
        return Int8Weight(q, d.contiguous(), 32, k)
    if kind == "Q4_0":
        return Q4Weight(blocks[:, :, 2:].reshape(out, k // 2), d.contiguous(), None, -8, k)
    m = blocks[:, :, 2:4].contiguous().view(torch.float16)[..., 0].float()
    return Q4Weight(blocks[:, :, 4:].reshape(out, k // 2), d.contiguous(), m.contiguous(), 0, k)


def read_projection_blocks(path: Path, config: NativeConfig) -> dict[str, QuantizedWeight]:
    """Every layer's q/k/v/o/gate/up/down weight from the GGUF file, by checkpoint name
    (``model.layers.{i}.self_attn.q_proj.weight``)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        tensors = {t.name: t for t in reader.tensors}
    except Exception as error:  # the library raises many kinds on a malformed file
        raise GgufError(f"{path} is not a readable GGUF file ({type(error).__name__}: {error})") from error
    expected = _expected_shapes(config)
    weights: dict[str, QuantizedWeight] = {}
    for i in range(config.num_layers):
        for short, module in NAMES.items():
            name = f"blk.{i}.{short}.weight"
            tensor = tensors.get(name)
            if tensor is None:
                raise GgufError(
                    f"{path} has no tensor {name} (the model's config has {config.num_layers} layers)"
                )
            kind = tensor.tensor_type.name
            if kind not in SUPPORTED:
                raise GgufError(
                    f"{path}: tensor {name} is {kind}, which --quantization gguf does not serve "
                    f"(supported: {', '.join(SUPPORTED)}); use --quantization int8 or int4 on a float checkpoint"
                )
            out, k = expected[short]
            shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # GGUF lists dims innermost first
            size = out * (k // 32) * BLOCK_BYTES[kind]
            if shape != (out, k) or k % 32 or tensor.data.dtype != np.uint8 or tensor.data.size != size:
                raise GgufError(
                    f"{path}: tensor {name} is {shape} with {tensor.data.size} bytes of {kind} blocks; "
                    f"the model's config needs ({out}, {k}), {size} bytes"
                )
            data = np.asarray(tensor.data).reshape(out, -1)
            if short in ("attn_q", "attn_k"):
                heads = config.num_heads if short == "attn_q" else config.num_kv_heads
                data = _unpermute_rows(data, heads)
            weights[f"model.layers.{i}.{module}.weight"] = blocks_to_weight(kind, data, out, k)
    return weights
