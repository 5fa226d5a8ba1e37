"""GGUF K-quants (Q4_K, Q5_K, Q6_K) with --quantization gguf (server/engine/native/gguf_blocks.py).

The reference dequantizers below are written from llama.cpp's block layouts (ggml-common.h
block_q4_K / block_q5_K / block_q6_K) and its dequantize_row_q*_K loops, one weight at a time in
float32 as the C code computes them, vectorized over blocks only. The repacked weights must equal
them bit for bit (and gguf-py's own dequantizer), the kernels must multiply them, and a GGUF file
mixing the types as a Q4_K_M file does must load and generate what the dense model generates.
"""

from __future__ import annotations

import copy
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize
from transformers import AutoModelForCausalLM

from server.engine.lora_linear import BASE_SLOT
from server.engine.native import NativeLlamaRunner, quantized
from server.engine.native.gguf_blocks import BLOCK_BYTES, GgufError, blocks_to_weight
from server.engine.native.quantized import StackedWeight
from server.engine.runner import DecodeInput, PrefillInput
from tests.conftest import tiny_llama_config
from tests.unit.test_quantized import (
    GGUF_NAMES,
    _avx2_fma_present,
    _llama_cpp_permute,
    dot,
    int8_inputs,
    needs_kernel,
)

F32 = np.float32
# the kernel tests' fixture (fails, never skips, without AVX2/FMA); --quant-dot float, then int
__all__ = ["_avx2_fma_present", "dot"]
KQUANTS = ("Q4_K", "Q5_K", "Q6_K")

# ------------------------------------------------------------------------ reference (the spec)


def _half(raw: np.ndarray) -> np.ndarray:
    """uint8 [n, 2] -> float16 as float32 [n]."""
    return np.ascontiguousarray(raw).view(np.float16)[:, 0].astype(F32)


def _scale_min_k4(j: int, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's get_scale_min_k4 on the 12 scale bytes q [n, 12] (uint8)."""
    q = q.astype(np.int32)
    if j < 4:
        return q[:, j] & 63, q[:, j + 4] & 63
    return (q[:, j + 4] & 0xF) | ((q[:, j - 4] >> 6) << 4), (q[:, j + 4] >> 4) | ((q[:, j] >> 6) << 4)


def ref_q4_k(b: np.ndarray) -> np.ndarray:
    """blocks uint8 [n, 144]: d f16, dmin f16, scales[12], qs[128] -> float32 [n, 256]."""
    d, dmin, scales, qs = _half(b[:, 0:2]), _half(b[:, 2:4]), b[:, 4:16], b[:, 16:144].astype(np.int32)
    y = np.zeros((b.shape[0], 256), F32)
    for j in range(4):  # 64 weights: 32 low nibbles, then the same bytes' high nibbles
        for half in range(2):
            sc, m = _scale_min_k4(2 * j + half, scales)
            d1, m1 = d * sc.astype(F32), dmin * m.astype(F32)
            for w in range(32):
                q = (qs[:, 32 * j + w] >> (4 * half)) & 0xF
                y[:, 64 * j + 32 * half + w] = d1 * q.astype(F32) - m1
    return y


def ref_q5_k(b: np.ndarray) -> np.ndarray:
    """blocks uint8 [n, 176]: d, dmin, scales[12], qh[32], qs[128] -> float32 [n, 256]."""
    d, dmin, scales = _half(b[:, 0:2]), _half(b[:, 2:4]), b[:, 4:16]
    qh, qs = b[:, 16:48].astype(np.int32), b[:, 48:176].astype(np.int32)
    y = np.zeros((b.shape[0], 256), F32)
    for j in range(4):
        for half in range(2):
            sc, m = _scale_min_k4(2 * j + half, scales)
            d1, m1 = d * sc.astype(F32), dmin * m.astype(F32)
            u = 1 << (2 * j + half)  # u1 = 1, u2 = 2, shifted left by 2 per 64
            for w in range(32):
                q = ((qs[:, 32 * j + w] >> (4 * half)) & 0xF) + np.where(qh[:, w] & u, 16, 0)
                y[:, 64 * j + 32 * half + w] = d1 * q.astype(F32) - m1
    return y


def ref_q6_k(b: np.ndarray) -> np.ndarray:
    """blocks uint8 [n, 210]: ql[128], qh[64], scales int8[16], d f16 -> float32 [n, 256]."""
    ql, qh = b[:, 0:128].astype(np.int32), b[:, 128:192].astype(np.int32)
    sc, d = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(F32), _half(b[:, 208:210])
    y = np.zeros((b.shape[0], 256), F32)
    for n in range(2):  # 128 weights: ql += 64, qh += 32, sc += 8
        for w in range(32):
            i = w // 16
            q1 = ((ql[:, 64 * n + w] & 0xF) | (((qh[:, 32 * n + w] >> 0) & 3) << 4)) - 32
            q2 = ((ql[:, 64 * n + w + 32] & 0xF) | (((qh[:, 32 * n + w] >> 2) & 3) << 4)) - 32
            q3 = ((ql[:, 64 * n + w] >> 4) | (((qh[:, 32 * n + w] >> 4) & 3) << 4)) - 32
            q4 = ((ql[:, 64 * n + w + 32] >> 4) | (((qh[:, 32 * n + w] >> 6) & 3) << 4)) - 32
            for at, q, s in ((0, q1, i), (32, q2, i + 2), (64, q3, i + 4), (96, q4, i + 6)):
                y[:, 128 * n + at + w] = d * sc[:, 8 * n + s] * q.astype(F32)
    return y


REFERENCE = {"Q4_K": ref_q4_k, "Q5_K": ref_q5_k, "Q6_K": ref_q6_k}


def random_blocks(kind: str, n: int, rng: np.random.Generator, size: float = 1e-4) -> np.ndarray:
    """n blocks of random bytes with float16 scales of about ``size`` (some subnormal)."""
    b = rng.integers(0, 256, size=(n, BLOCK_BYTES[kind]), dtype=np.uint8)
    d = (np.abs(rng.standard_normal(n)) * size).astype(np.float16)
    d[:: max(1, n // 3)] = np.float16(2**-20)  # subnormal float16 scales widen exactly too
    fields = [208] if kind == "Q6_K" else [0, 2]
    for at in fields:
        b[:, at : at + 2] = d.view(np.uint8).reshape(n, 2)
        d = (np.abs(rng.standard_normal(n)) * size).astype(np.float16)
    return b


# ---------------------------------------------------------------------------- synthetic blocks


@pytest.mark.parametrize("kind", KQUANTS)
def test_repacked_k_quants_equal_the_spec_reference(kind: str) -> None:
    rng = np.random.default_rng(1)
    out, k = 7, 768  # 3 super-blocks per row
    blocks = random_blocks(kind, out * k // 256, rng)
    expected = torch.from_numpy(REFERENCE[kind](blocks).reshape(out, k))
    weight = blocks_to_weight(kind, blocks.reshape(out, -1), out, k)
    assert torch.equal(weight.dequantize(), expected)  # bit for bit
    library = dequantize(blocks.reshape(out, -1), getattr(gguf.GGMLQuantizationType, kind))
    assert torch.equal(torch.from_numpy(library), expected)  # gguf-py agrees with the spec reading
    assert torch.equal(weight.dequantize(2, 5), expected[2:5])
    shipped = out * k // 256 * BLOCK_BYTES[kind]
    assert weight.nbytes <= {"Q4_K": 1.34, "Q5_K": 1.82, "Q6_K": 1.53}[kind] * shipped  # see gguf_blocks


@needs_kernel
@pytest.mark.parametrize("n", [1, 3, 4, 5, 16, 64, 65])
def test_k_quant_kernels_equal_the_dense_product(n: int, dot: str) -> None:
    """The repacked K-quants through the kernels (float and integer dot products) equal the dense
    product of the reference weights (with the integer ones: on the inputs quantized to int8 as
    they are, ``quantized.quantized_activations``)."""
    rng = np.random.default_rng(n)
    gen = torch.Generator().manual_seed(n)  # fixed inputs: an unseeded draw failed ~1 run in 5 at 1e-4
    out, k = 11, 512
    x = torch.randn(n, k, generator=gen)
    xs = quantized.quantized_activations(x) if dot == "int" and n <= 64 else x  # 65 rows: PyTorch's matmul
    for kind in KQUANTS:
        blocks = random_blocks(kind, out * k // 256, rng, size=1e-2)
        dense = torch.from_numpy(REFERENCE[kind](blocks).reshape(out, k))
        weight = blocks_to_weight(kind, blocks.reshape(out, -1), out, k)
        torch.testing.assert_close(quantized.linear(x, weight), xs @ dense.t(), rtol=1e-4, atol=1e-4)
        base = torch.randn(n, out + 4, generator=gen)
        got = base.clone()
        quantized.linear(x, weight, out=got[:, 2 : 2 + out], accumulate=True)
        torch.testing.assert_close(
            got[:, 2 : 2 + out], base[:, 2 : 2 + out] + xs @ dense.t(), rtol=1e-4, atol=1e-4
        )
        assert torch.equal(got[:, :2], base[:, :2]) and torch.equal(got[:, 2 + out :], base[:, 2 + out :])


@needs_kernel
def test_parts_of_different_types_stack_into_one_projection(dot: str) -> None:
    rng = np.random.default_rng(3)
    parts = [(kind, 5 + i) for i, kind in enumerate(("Q4_K", "Q6_K", "Q4_K"))]  # q, k, v-like
    weights, dense = [], []
    for kind, out in parts:
        blocks = random_blocks(kind, out, rng, size=1e-2)  # k = 256
        weights.append(blocks_to_weight(kind, blocks.reshape(out, -1), out, 256))
        dense.append(torch.from_numpy(REFERENCE[kind](blocks)))
    fused = quantized.cat_rows(weights)
    assert isinstance(fused, StackedWeight) and fused.shape == (18, 256)
    expected = torch.cat(dense)
    assert torch.equal(fused.dequantize(), expected) and torch.equal(fused.dequantize(3, 14), expected[3:14])
    x = torch.randn(3, 256)
    xs = quantized.quantized_activations(x) if dot == "int" else x  # the integer kernels' inputs
    torch.testing.assert_close(quantized.linear(x, fused), xs @ expected.t(), rtol=1e-4, atol=1e-4)
    assert torch.equal(fused.rows(5, 11).dequantize(), expected[5:11])


# ------------------------------------------------------------------------- a file that generates

# a Q4_K_M-like mix: Q4_K, with v and down Q6_K; o as Q5_K to cover the third type
MIX = {"v_proj": "Q6_K", "down_proj": "Q6_K", "o_proj": "Q5_K"}


def _write_k_gguf(model, path: Path, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """Random K-quant blocks for every projection, written with gguf's writer (q/k stored
    permuted, as llama.cpp's converter does); returns each module's dequantized weight."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    weights = {}
    for i in range(c.num_hidden_layers):
        for module, short in GGUF_NAMES.items():
            part = "self_attn" if short.startswith("attn") else "mlp"
            name = f"model.layers.{i}.{part}.{module}"
            out, k = model.get_submodule(name).weight.shape
            kind = MIX.get(module, "Q4_K")
            blocks = random_blocks(kind, out * k // 256, rng, size=2e-4 if kind != "Q6_K" else 2e-5)
            dense = REFERENCE[kind](blocks).reshape(out, k)
            rows = blocks.reshape(out, -1)
            if module in ("q_proj", "k_proj"):  # the file holds permuted rows; the model the plain ones
                heads = c.num_attention_heads if module == "q_proj" else c.num_key_value_heads
                rows = _llama_cpp_permute(rows, heads)
            weights[name] = torch.from_numpy(dense)
            writer.add_tensor(
                f"blk.{i}.{short}.weight", rows, raw_dtype=getattr(gguf.GGMLQuantizationType, kind)
            )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


def test_a_k_quant_gguf_file_loads_and_generates_what_the_dense_model_does(tmp_path, dot) -> None:
    """The dense model's greedy tokens and logits (float32 rounding); with --quant-dot int, the
    dense model with its projections' inputs quantized to int8 as the integer kernels do."""
    torch.manual_seed(7)
    config = tiny_llama_config(512, hidden_size=256, intermediate_size=512)  # rows of 256-blocks
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path)
    file = tmp_path / "model.Q4_K_M.gguf"
    weights = _write_k_gguf(model, file, np.random.default_rng(0))
    runner = NativeLlamaRunner(tmp_path, quantization="gguf", gguf_file=file, kv_cache_tokens=256)
    dense = copy.deepcopy(model)
    for name, target in runner.weight_targets.items():
        assert torch.equal(target.read(), weights[name]), name  # exactly the shipped values, unpermuted
        dense.get_submodule(name).weight.data = weights[name].clone()
    if dot == "int":
        int8_inputs(dense, list(runner.weight_targets))
    qkv = runner.model.layers[0].qkv._quant
    assert isinstance(qkv, StackedWeight)  # Q4_K q/k beside a Q6_K v
    prompt = [1, 15, 27, 300, 41, 9]
    tokens = []
    logits = runner.prefill([PrefillInput(0, prompt, 0, BASE_SLOT)]).logits[0]
    steps = [logits]
    for _ in range(7):
        tokens.append(int(steps[-1].argmax()))
        steps.append(runner.decode([DecodeInput(0, tokens[-1], BASE_SLOT, 1.0)])[0])
    tokens.append(int(steps[-1].argmax()))
    with torch.no_grad():
        expected = dense.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0)[
            0, len(prompt) :
        ]
        full = dense(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1 :]
    assert tokens == expected.tolist()
    torch.testing.assert_close(torch.stack(steps), full, rtol=1e-4, atol=1e-4)


def test_k_quants_on_rows_that_do_not_fill_a_super_block_are_a_clear_error(tmp_path) -> None:
    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(512, hidden_size=64, intermediate_size=96))
    model.save_pretrained(tmp_path)
    writer = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    for i in range(model.config.num_hidden_layers):
        for module, short in GGUF_NAMES.items():
            part = "self_attn" if short.startswith("attn") else "mlp"
            w = model.get_submodule(f"model.layers.{i}.{part}.{module}").weight.detach().numpy()
            if i == 0 and module == "q_proj":  # one super-block per row: 256 weights for rows of 64
                blocks = random_blocks("Q4_K", w.shape[0], np.random.default_rng(0))
                writer.add_tensor(f"blk.{i}.{short}.weight", blocks, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
            else:
                q8 = gguf.GGMLQuantizationType.Q8_0
                writer.add_tensor(f"blk.{i}.{short}.weight", gguf.quants.quantize(w, q8), raw_dtype=q8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        GgufError, match=r"blk\.0\.attn_q\.weight is Q4_K, whose blocks hold 256 weights.*have 64"
    ):
        NativeLlamaRunner(tmp_path, quantization="gguf", gguf_file=tmp_path / "bad.gguf", kv_cache_tokens=64)
