"""A GGUF file's projection weights kept as shipped (``--quantization gguf``).

Each linear projection's blocks become a ``quantized.py`` weight without re-quantizing:

    GGUF type   block                                   kept as
    Q8_0        32: d f16 | 32 x int8                   Int8Weight(group 32, scale = d)
    Q4_0        32: d f16 | 16 bytes of nibbles         Q4Weight(offset -8, scale = d)
    Q4_1        32: d f16 | m f16 | 16 bytes            Q4Weight(offset 0, scale = d, min = m)
    Q4_K        256: d f16 | dmin f16 | 12 bytes of     Q4Weight(offset 0, scale = d * sc,
                6-bit sc, m (8 sub-blocks of 32) |      min = -(dmin * m)), nibbles regrouped
                128 bytes of nibbles
    Q5_K        256: as Q4_K | 32 bytes of 5th bits     Int8Weight(group 32, q = 0..31,
                (before the nibbles)                    scale = d * sc, min = -(dmin * m))
    Q6_K        256: 128 bytes low 4 bits | 64 bytes    Int8Weight(group 16, q = -32..31,
                high 2 bits | 16 x int8 sc | d f16      scale = d * sc)

(llama.cpp's ggml-common.h block_q4_K / block_q5_K / block_q6_K and ggml-quants.c's
dequantize_row_q*_K.) Q8_0/Q4_0/Q4_1 keep their bytes and their float16 scales. The K-quants are
repacked at load into the same two layouts, exactly: a sub-block's scale ``d * sc`` (a float16
times a 6- or 8-bit integer) and ``dmin * m`` need at most 19 significant bits, so float32 holds
them exactly, and each weight is then computed as llama.cpp does (``d1 * q - m1`` equals
``q * d1 + (-m1)`` in IEEE arithmetic). Repacking reuses the kernels checked at load instead of
three new ones; its cost is memory: per weight 6 bits for Q4_K (4.5 shipped), 10 for Q5_K (5.5)
and Q6_K (6.56), because the derived scales are float32 and 5/6-bit values take a byte.
Other types (F16, Q2_K, Q3_K, IQ*, ...) are refused at start with an error naming the type and tensor.

llama.cpp's converter permutes the rows of q and k (its RoPE layout); they are permuted back
here exactly as transformers' GGUF loader does, whole rows at a time (blocks run along a row).
A file that cannot be parsed, lacks a tensor, or whose shape or size disagrees with the model's
config is a ``GgufError`` naming the file and the tensor.
"""

from __future__ import annotations

import contextlib
import mmap
from pathlib import Path
from typing import Any

import numpy as np
import torch

from server.engine.native.config import NativeConfig
from server.engine.native.quantized import Int8Weight, Q4Weight, QuantizedWeight

GGUF_EMBED = "embedding (GGUF blocks)"  # read_projection_blocks' key for token_embd
GGUF_HEAD = "lm_head (GGUF blocks)"  # and for an untied LM head (output.weight)
SUPPORTED = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
BLOCK_WEIGHTS = {"Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}

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


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2] -> the little-endian float16 they hold, widened to float32 [...] (exact)."""
    return raw.contiguous().view(torch.float16)[..., 0].float()


def k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> the 8 sub-blocks' 6-bit scales and mins (llama.cpp's
    ``get_scale_min_k4``): packed uint8 [..., 12] -> (sc, m) float32 [..., 8]."""
    b = packed.to(torch.int32)
    low, mid, high = b[..., 0:4], b[..., 4:8], b[..., 8:12]
    sc = torch.cat((low & 63, (high & 15) | ((low >> 6) << 4)), dim=-1)
    m = torch.cat((mid & 63, (high >> 4) | ((mid >> 6) << 4)), dim=-1)
    return sc.float(), m.float()


def _k_scale_min(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K blocks [out, nb, bytes] -> per sub-block scale d * sc and min -(dmin * m),
    float32 [out, nb * 8] (exact products: see the module docstring)."""
    out = blocks.shape[0]
    d, dmin = _f16(blocks[:, :, 0:2]), _f16(blocks[:, :, 2:4])  # [out, nb]
    sc, m = k_scales(blocks[:, :, 4:16])  # [out, nb, 8]
    return (d[..., None] * sc).reshape(out, -1), (-(dmin[..., None] * m)).reshape(out, -1)


def _nibble_pairs(qs: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K nibbles uint8 [out, nb, 128] -> 4-bit values [out, nb * 8, 32] in weight order:
    each 32 bytes hold one sub-block in their low nibbles and the next in their high ones."""
    q = qs.reshape(qs.shape[0], -1, 4, 1, 32)
    return torch.cat((q & 15, q >> 4), dim=3).reshape(qs.shape[0], -1, 32)


def _q6_k(blocks: torch.Tensor, out: int, k: int) -> Int8Weight:
    """Q6_K blocks [out, nb, 210] -> Int8Weight(group 16): weight 32 t + l of each 128 has its
    low 4 bits in ql[32 (t % 2) + l] (nibble t // 2) and its high 2 in qh[l] (bits 2 t)."""
    ql = blocks[:, :, 0:128].reshape(out, -1, 2, 1, 2, 32)  # [out, nb, half, nibble, t % 2, l]
    qh = blocks[:, :, 128:192].reshape(out, -1, 2, 1, 32)  # [out, nb, half, 1, l]
    low = torch.cat((ql & 15, ql >> 4), dim=3).reshape(out, -1, 2, 4, 32)  # [.., half, t, l]
    high = torch.cat([(qh >> (2 * t)) & 3 for t in range(4)], dim=3)  # [out, nb, half, t, l]
    q = (low.to(torch.int16) | (high.to(torch.int16) << 4)) - 32
    sc = blocks[:, :, 192:208].contiguous().view(torch.int8).float()  # [out, nb, 16]
    scale = (_f16(blocks[:, :, 208:210])[..., None] * sc).reshape(out, -1)  # [out, k / 16]
    return Int8Weight(q.to(torch.int8).reshape(out, k), scale.contiguous(), 16, k)


def blocks_to_weight(kind: str, data: np.ndarray, out: int, k: int) -> QuantizedWeight:
    """data: uint8 [out, k / block weights * block bytes] -> the weight (see the module docstring).
    Q8_0/Q4_0/Q4_1 copy only the parts they keep, each once, from ``data`` (often a view of the
    file); the K-quants copy the blocks whole first, then repack them."""
    raw = data.reshape(out, -1, BLOCK_BYTES[kind])  # [out, blocks, bytes]; a view where data is one
    if kind in ("Q6_K", "Q4_K", "Q5_K"):
        blocks = _owned(raw)  # a copy
        if kind == "Q6_K":
            return _q6_k(blocks, out, k)
        scale, minimum = _k_scale_min(blocks)  # [out, k / 32]
        if kind == "Q4_K":
            values = _nibble_pairs(blocks[:, :, 16:144])  # [out, k / 32, 32]
            packed = values[:, :, :16] | (values[:, :, 16:] << 4)  # Q4Weight's byte j: j and j + 16
            return Q4Weight(packed.reshape(out, k // 2).contiguous(), scale, minimum, 0, k)
        qh = blocks[:, :, 16:48].reshape(out, -1, 1, 32)  # [out, nb, 1, l]: bit i is sub-block i's
        fifth = torch.cat([(qh >> i) & 1 for i in range(8)], dim=2).reshape(out, -1, 32)
        values = _nibble_pairs(blocks[:, :, 48:176]) | (fifth << 4)  # [out, k / 32, 32], 0..31
        return Int8Weight(values.to(torch.int8).reshape(out, k), scale, 32, k, minimum)
    d = _owned(raw[:, :, 0:2]).view(torch.float16)[..., 0].contiguous()  # [out, groups] float16
    if kind == "Q8_0":
        return Int8Weight(_owned(raw[:, :, 2:]).view(torch.int8).reshape(out, k), d, 32, k)
    if kind == "Q4_0":
        return Q4Weight(_owned(raw[:, :, 2:]).reshape(out, k // 2), d, None, -8, k)
    m = _owned(raw[:, :, 2:4]).view(torch.float16)[..., 0].contiguous()
    return Q4Weight(_owned(raw[:, :, 4:]).reshape(out, k // 2), d, m, 0, k)


def _owned(part: np.ndarray) -> torch.Tensor:
    """A contiguous uint8 copy of ``part`` (a slice of a read-only file map, often) as a tensor."""
    return torch.from_numpy(np.array(part, dtype=np.uint8, order="C"))


def read_projection_blocks(path: Path, config: NativeConfig) -> dict[str, QuantizedWeight]:
    """Every layer's q/k/v/o/gate/up/down weight from the GGUF file, by checkpoint name
    (``model.layers.{i}.self_attn.q_proj.weight``); the embedding ``token_embd.weight`` under
    ``GGUF_EMBED`` and an untied head ``output.weight`` under ``GGUF_HEAD`` when their blocks are of
    a supported type (the embedded model's tied embedding is Q8_0: a quarter of its float32
    bytes). One of another type (F16, F32, ...) is left out, and the checkpoint's float32 matrix
    serves (the same values)."""
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
            if k % BLOCK_WEIGHTS[kind]:
                raise GgufError(
                    f"{path}: tensor {name} is {kind}, whose blocks hold {BLOCK_WEIGHTS[kind]} weights, "
                    f"but the model's rows have {k} (not a multiple)"
                )
            size = out * (k // BLOCK_WEIGHTS[kind]) * BLOCK_BYTES[kind]
            if shape != (out, k) or tensor.data.dtype != np.uint8 or tensor.data.size != size:
                raise GgufError(
                    f"{path}: tensor {name} is {shape} with {tensor.data.size} bytes of {kind} blocks; "
                    f"the model's config needs ({out}, {k}), {size} bytes"
                )
            data = np.asarray(tensor.data).reshape(out, -1)
            if short in ("attn_q", "attn_k"):
                heads = config.num_heads if short == "attn_q" else config.num_kv_heads
                data = _unpermute_rows(data, heads)
            weights[f"model.layers.{i}.{module}.weight"] = blocks_to_weight(kind, data, out, k)
        _drop_file_pages(reader)
    for name, key in (("token_embd.weight", GGUF_EMBED), ("output.weight", GGUF_HEAD)):
        tensor = tensors.get(name)
        if tensor is None or tensor.tensor_type.name not in SUPPORTED:
            continue
        kind, out, k = tensor.tensor_type.name, config.vocab_size, config.hidden_size
        size = out * (k // BLOCK_WEIGHTS[kind]) * BLOCK_BYTES[kind]
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        if k % BLOCK_WEIGHTS[kind] or shape != (out, k) or tensor.data.size != size:
            raise GgufError(
                f"{path}: tensor {name} is {shape} with {tensor.data.size} bytes of {kind} blocks; "
                f"the model's config needs ({out}, {k}), {size} bytes"
            )
        weights[key] = blocks_to_weight(kind, np.asarray(tensor.data).reshape(out, -1), out, k)
        _drop_file_pages(reader)
    return weights


def _drop_file_pages(reader: Any) -> None:
    """Unmap the pages of the file read so far from this process (they stay in the page cache).

    ``blocks_to_weight`` copies what it keeps; the reader's memory map would otherwise hold every
    page read resident until it is closed, all of the file at the end of the read: the embedded
    model's 93 MB counted in the process's peak RSS beside the copies (``--quantization gguf``'s
    peak RSS 764 MB, against 1471 with float32 weights, measured by ``bench/quantized.py``). A map
    read again later faults its pages back in from the page cache: nothing is lost."""
    mapping = getattr(reader.data, "_mmap", None)  # numpy.memmap's mmap.mmap (the reader's file)
    if mapping is not None:
        with contextlib.suppress(AttributeError, OSError, ValueError):  # madvise: Unix, Python 3.8+
            mapping.madvise(mmap.MADV_DONTNEED)
