"""Quantized weights of the native runner (``--quantization int8|int4|gguf``): formats, quantizers,
the reference dequantizers, and the linear op (compiled kernel where it builds, else PyTorch).

Two layouts cover every form (``quant_cpu.c`` streams both; k is padded to ``kp``, a multiple of 32):

    Int8Weight  q int8 [out, kp], scale [out, kp / group]     w = q * scale (+ min)
                  int8: per output channel (group = kp), symmetric: scale = max|w| / 127
                  GGUF Q8_0: group = 32, scale = the block's float16 d
                  GGUF Q5_K: group = 32, q = 0..31, scale = d * sc, min = -(dmin * m)
                  GGUF Q6_K: group = 16, q = -32..31, scale = d * sc
    Q4Weight    q uint8 [out, kp / 2], groups of 32            w = (q + offset) * scale (+ min)
                  int4: asymmetric, offset 0, scale = (max - min) / 15, min = the group's min
                  GGUF Q4_0: offset -8, scale = d;  Q4_1: offset 0, scale = d, min = m
                  GGUF Q4_K: offset 0, scale = d * sc, min = -(dmin * m)

Scales and mins are float32 or float16 (one dtype per weight; the kernel widens float16 exactly):
int8/int4 quantize against float16 ones where they fit, GGUF Q8_0/Q4_0/Q4_1 keep theirs, the
K-quants' derived ``d * sc`` need float32 (``gguf_blocks.py``). A fused projection whose parts
have different forms (a GGUF file mixing block types) is a ``StackedWeight`` of its parts.

A group's 16 bytes hold weight j in the low nibble of byte j and weight j + 16 in its high
nibble (GGUF's Q4_0/Q4_1 layout), so those blocks are kept as shipped. ``dequantize`` computes
each weight with the same float32 operations as ``gguf.quants`` (multiply, then add), so a GGUF
model serves exactly its shipped values.

The float32 matrix a projection is quantized from is dropped after quantizing: only the
quantized bytes stay resident.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from server.engine.native import quant_cpu

log = logging.getLogger(__name__)

Quantization = Literal["none", "int8", "int4", "gguf"]
QUANTIZATIONS: tuple[Quantization, ...] = ("none", "int8", "int4", "gguf")
GROUP = 32  # int4 group size along the input dimension


def _padded(k: int) -> int:
    return -(-k // GROUP) * GROUP


def _bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


@dataclass
class Int8Weight:
    q: torch.Tensor  # [out, kp] int8
    scale: torch.Tensor  # [out, kp / group] float32 or float16
    group: int  # 16 or a multiple of 32
    in_features: int
    min: torch.Tensor | None = None  # [out, kp / group], scale's dtype, or None

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.q.shape[0], self.in_features))

    @property
    def nbytes(self) -> int:
        return self.q.numel() + _bytes(self.scale) + _bytes(self.min)

    def dequantize(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Rows [start, end) as float32 [rows, in]: ``q * scale (+ min)``."""
        q, s = self.q[start:end], self.scale[start:end].float()
        w = q.float().view(q.shape[0], -1, self.group) * s[:, :, None]  # [rows, groups, group]
        if self.min is not None:
            w = w + self.min[start:end, :, None].float()
        return w.reshape(q.shape[0], -1)[:, : self.in_features]

    def rows(self, start: int, end: int) -> Int8Weight:
        m = None if self.min is None else self.min[start:end]
        return Int8Weight(self.q[start:end], self.scale[start:end], self.group, self.in_features, m)

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` [N] dequantized: [N, in] float32 (an embedding lookup)."""
        m = None if self.min is None else self.min[index]
        return Int8Weight(self.q[index], self.scale[index], self.group, self.in_features, m).dequantize()


@dataclass
class Q4Weight:
    q: torch.Tensor  # [out, kp / 2] uint8, 16 bytes per group of 32
    scale: torch.Tensor  # [out, kp / 32] float32 or float16
    min: torch.Tensor | None  # [out, kp / 32] scale's dtype, or None
    offset: int  # added to each 4-bit value before scaling (-8 or 0)
    in_features: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.q.shape[0], self.in_features))

    @property
    def nbytes(self) -> int:
        return self.q.numel() + _bytes(self.scale) + _bytes(self.min)

    def values(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """The 4-bit values plus offset, rows [start, end): int32 [rows, kp / 32, 32]."""
        q = self.q[start:end].view(-1, self.q.shape[1] // 16, 16)  # [rows, groups, 16]
        both = torch.cat((q & 15, q >> 4), dim=-1)  # [rows, groups, 32]: low nibbles, then high
        return both.to(torch.int32) + self.offset

    def dequantize(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Rows [start, end) as float32 [rows, in]: ``(q + offset) * scale (+ min)``."""
        w = self.values(start, end).float() * self.scale[start:end, :, None].float()
        if self.min is not None:
            w = w + self.min[start:end, :, None].float()
        return w.reshape(w.shape[0], -1)[:, : self.in_features]

    def rows(self, start: int, end: int) -> Q4Weight:
        m = None if self.min is None else self.min[start:end]
        return Q4Weight(self.q[start:end], self.scale[start:end], m, self.offset, self.in_features)

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` [N] dequantized: [N, in] float32 (an embedding lookup)."""
        m = None if self.min is None else self.min[index]
        return Q4Weight(self.q[index], self.scale[index], m, self.offset, self.in_features).dequantize()


@dataclass
class StackedWeight:
    """Quantized matrices of different forms stacked along the output: a fused projection whose
    GGUF parts have different block types (a Q4_K_M file's Q4_K q/k beside a Q6_K v). Each part
    runs its own kernel into its columns of the output."""

    parts: list[Int8Weight | Q4Weight]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((sum(p.shape[0] for p in self.parts), self.in_features))

    @property
    def in_features(self) -> int:
        return self.parts[0].in_features

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def spans(self) -> list[tuple[int, int, Int8Weight | Q4Weight]]:
        """(start, end, part) along the output."""
        out, start = [], 0
        for part in self.parts:
            out.append((start, start + part.shape[0], part))
            start += part.shape[0]
        return out

    def dequantize(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Rows [start, end) as float32 [rows, in]."""
        end = self.shape[0] if end is None else end
        pieces = [
            p.dequantize(max(start, s) - s, min(end, e) - s)
            for s, e, p in self.spans()
            if s < end and e > start
        ]
        return torch.cat(pieces) if pieces else torch.empty(0, self.in_features)

    def rows(self, start: int, end: int) -> QuantizedWeight:
        parts = [
            p.rows(max(start, s) - s, min(end, e) - s) for s, e, p in self.spans() if s < end and e > start
        ]
        return parts[0] if len(parts) == 1 else StackedWeight(parts)


QuantizedWeight = Int8Weight | Q4Weight | StackedWeight


HALF_MAX = 65504.0  # the largest finite float16


def _half_up(x: torch.Tensor) -> torch.Tensor:
    """x >= 0 float32 -> the smallest float16 >= x (inf past ``HALF_MAX``)."""
    h = x.half()
    bits = h.view(torch.int16)
    return torch.where(h.float() < x, bits + 1, bits).view(
        torch.float16
    )  # positive: next bit pattern is larger


def _half_down(x: torch.Tensor) -> torch.Tensor:
    """x float32 -> the largest float16 <= x (-inf past ``-HALF_MAX``)."""
    h = x.half()
    bits = h.view(torch.int16)
    lower = torch.where(
        h > 0, bits - 1, torch.where(h < 0, bits + 1, torch.full_like(bits, -32767))
    )  # 0: -2^-24
    return torch.where(h.float() > x, lower, bits).view(torch.float16)


def _fits_half(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def quantize_int8(weight: torch.Tensor, half: bool = True) -> Int8Weight:
    """[out, in] -> per output channel symmetric int8: scale = max|w| / 127 (an all-zero row gets 1).

    ``half``: the scale is kept as float16 (2 bytes a row instead of 4), rounded up so that every
    weight still fits -127..127, and the weights are quantized against that float16 value (the
    stored scale is the one they were rounded for); float32 where a scale does not fit float16."""
    w = F.pad(weight.float(), (0, _padded(weight.shape[1]) - weight.shape[1]))  # [out, kp]
    scale = w.abs().amax(dim=1, keepdim=True) / 127  # [out, 1]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    stored: torch.Tensor = scale
    if half and _fits_half(up := _half_up(scale)):
        stored, scale = up, up.float()
    q = torch.round(w / scale).clamp_(-127, 127).to(torch.int8)
    return Int8Weight(q, stored.contiguous(), w.shape[1], weight.shape[1])


def quantize_int4(weight: torch.Tensor, half: bool = True) -> Q4Weight:
    """[out, in] -> 4-bit in groups of 32 along the input, asymmetric (as GGUF's Q4_1):
    ``w ≈ q * scale + min`` with min = the group's smallest weight, scale = range / 15.

    Asymmetric rather than symmetric (max|w| / 7, 15 levels of which a group uses about half):
    measured on the embedded model's perplexity, symmetric cost 1.54x float32's.

    ``half``: min and scale are kept as float16 (4 bytes per 32 weights instead of 8: 5 bits a
    weight instead of 6), min rounded down and scale rounded up so that the group still spans
    0..15, and the weights quantized against those float16 values; float32 where they do not fit."""
    out, k = weight.shape
    w = F.pad(weight.float(), (0, _padded(k) - k)).view(out, -1, GROUP)  # [out, groups, 32]
    low, high = w.amin(dim=2), w.amax(dim=2)  # [out, groups]
    stored_min: torch.Tensor = low
    if half and _fits_half(down := _half_down(low)):
        stored_min, low = down, down.float()
    scale = (high - low) / 15
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    stored_scale: torch.Tensor = scale
    if stored_min.dtype == torch.float16 and _fits_half(up := _half_up(scale)):
        stored_scale, scale = up, up.float()
    elif stored_min.dtype == torch.float16:  # one dtype per weight: both float32
        stored_min = low
    q = torch.round((w - low[:, :, None]) / scale[:, :, None]).clamp_(0, 15).to(torch.uint8)  # 0..15
    packed = q[:, :, :16] | (q[:, :, 16:] << 4)  # [out, groups, 16]
    return Q4Weight(
        packed.reshape(out, -1).contiguous(), stored_scale.contiguous(), stored_min.contiguous(), 0, k
    )


def quantize(weight: torch.Tensor, kind: Quantization, rows: int = 2048) -> QuantizedWeight:
    """``rows`` output rows at a time, so that the float temporaries stay small (a real-size
    vocabulary's embedding is gigabytes in float32)."""
    if kind not in ("int8", "int4"):
        raise ValueError(
            f"cannot quantize a float weight to {kind!r} (int8 or int4; gguf keeps a file's blocks)"
        )
    one = quantize_int8 if kind == "int8" else quantize_int4
    return cat_rows([one(weight[start : start + rows]) for start in range(0, weight.shape[0], rows)])


def cat_rows(weights: list[QuantizedWeight]) -> QuantizedWeight:
    """Quantized matrices stacked along the output (a fused projection): one matrix of the same
    form when the parts share it (layout, scale dtype, group), else a ``StackedWeight``."""
    flat = [p for w in weights for p in (w.parts if isinstance(w, StackedWeight) else [w])]
    first = flat[0]
    if any(w.in_features != first.in_features for w in flat):
        raise ValueError("a fused projection's parts must share one input size")
    if len(flat) == 1:
        return first
    same = all(
        type(w) is type(first)
        and w.scale.dtype == first.scale.dtype
        and (w.min is None) == (first.min is None)
        and getattr(w, "group", None) == getattr(first, "group", None)
        and getattr(w, "offset", None) == getattr(first, "offset", None)
        for w in flat
    )
    mins = None if first.min is None else torch.cat([w.min for w in flat if w.min is not None])
    if same and isinstance(first, Int8Weight):
        int8 = [w for w in flat if isinstance(w, Int8Weight)]
        q, scale = torch.cat([w.q for w in int8]), torch.cat([w.scale for w in int8])
        return Int8Weight(q, scale, first.group, first.in_features, mins)
    if same and isinstance(first, Q4Weight):
        q4 = [w for w in flat if isinstance(w, Q4Weight)]
        q, scale = torch.cat([w.q for w in q4]), torch.cat([w.scale for w in q4])
        return Q4Weight(q, scale, mins, first.offset, first.in_features)
    return StackedWeight(flat)  # type: ignore[arg-type]


def linear(
    x: torch.Tensor, weight: QuantizedWeight, out: torch.Tensor | None = None, accumulate: bool = False
) -> torch.Tensor:
    """x: [N, in] float32 -> x @ W.T: [N, out] (written into ``out`` when given, or added to it with
    ``accumulate``). The compiled kernel up to ``quant_cpu.MAX_ROWS`` rows where it builds; else
    (and for long prompts) the weight dequantized in row chunks and multiplied by PyTorch."""
    n, rows = x.shape[0], weight.shape[0]
    if out is None:
        out = x.new_zeros(n, rows) if accumulate else x.new_empty(n, rows)
    if isinstance(weight, StackedWeight):  # each part into its own columns
        for start, end, part in weight.spans():
            linear(x, part, out[:, start:end], accumulate)
        return out
    fits = n <= quant_cpu.MAX_ROWS and x.dtype == out.dtype == torch.float32 and out.stride(1) == 1
    kernel = quant_cpu.load() if fits and x.device.type == "cpu" else None
    if kernel is not None:
        run_kernel(kernel, x.contiguous(), weight, out, accumulate)
        return out
    chunk = max(1, (16 << 20) // (4 * weight.in_features))  # dequantize ~16 MiB of rows at a time
    for start in range(0, rows, chunk):
        end = min(rows, start + chunk)
        part = x @ weight.dequantize(start, end).to(x.dtype).t()  # [N, end - start]
        if accumulate:
            out[:, start:end] += part
        else:
            out[:, start:end] = part
    return out


def run_kernel(
    kernel: quant_cpu.CompiledQuant,
    x: torch.Tensor,
    w: Int8Weight | Q4Weight,
    out: torch.Tensor,
    acc: bool,
    dot: quant_cpu.Dot | None = None,
    isa: quant_cpu.Isa | None = None,
) -> None:
    """The compiled kernel (``dot``: its dot product, default ``quant_cpu.DOT``; ``isa``: the
    integer kernels' instruction set, default the one that passed the check)."""
    if isinstance(w, Int8Weight):
        kernel.int8(x, w.q, w.scale, w.min, w.group, w.in_features, out, acc, dot, isa)
    else:
        kernel.q4(x, w.q, w.scale, w.min, w.offset, w.in_features, out, acc, dot, isa)


ACTIVATION_BLOCK = 32  # input values per int8 activation scale (the integer kernels)
TINY = 1e-30  # a block whose largest |x| is below this is quantized to zeros (quant_cpu.c's TINY)


def quantize_activations(x: torch.Tensor, kp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer kernels' input quantization, in PyTorch (the reference): x [n, k] float32 ->
    (int8 [n, kp], scales float32 [n, kp / 32]), per block of 32 along the input (zero past k):
    ``d = max|x| / 127``, ``q = round(x * (1 / d))`` (half to even), as llama.cpp's Q8_0 with a
    float32 scale; a block below ``TINY`` gets d = 0 and q = 0, a block holding an inf or NaN
    d = NaN and q = 0. The same float32 operations as ``quant_cpu.c``: the results are equal."""
    n, k = x.shape
    blocks = F.pad(x.float(), (0, kp - k)).view(n, kp // ACTIVATION_BLOCK, ACTIVATION_BLOCK)
    amax = blocks.abs().amax(dim=2)  # [n, blocks]
    finite = torch.isfinite(blocks).all(dim=2)
    big = finite & (amax >= TINY)
    d = torch.where(big, amax / 127, torch.zeros_like(amax))
    inverse = torch.where(big, 1.0 / torch.where(big, d, torch.ones_like(d)), torch.zeros_like(d))
    q = torch.round(torch.where(big[:, :, None], blocks, torch.zeros_like(blocks)) * inverse[:, :, None])
    d = torch.where(finite, d, torch.full_like(d, float("nan")))
    return q.to(torch.int8).view(n, kp), d


def quantized_activations(x: torch.Tensor) -> torch.Tensor:
    """x [n, k] as the integer kernels see it: quantized to int8 blocks and back to float32."""
    kp = _padded(x.shape[1])
    q, d = quantize_activations(x, kp)
    values = q.float().view(x.shape[0], -1, ACTIVATION_BLOCK) * d[:, :, None]
    return values.view(x.shape[0], kp)[:, : x.shape[1]]


def reference_linear(x: torch.Tensor, weight: QuantizedWeight, dot: quant_cpu.Dot = "float") -> torch.Tensor:
    """What the compiled kernels compute, up to float32 summation order: x @ W.T with W the
    reference dequantization, x quantized to int8 blocks first for ``dot="int"``."""
    if dot == "int":
        x = quantized_activations(x)
    return x @ weight.dequantize().t()


def activation_error_bound(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """[n, out]: the most the int8 activations can move x @ W.T: each input moves by at most half
    its block's step (``d / 2``), so |Σ w (x' - x)| <= Σ |w| d / 2."""
    kp = _padded(x.shape[1])
    _, d = quantize_activations(x, kp)
    steps = d.repeat_interleave(ACTIVATION_BLOCK, dim=1)[:, : x.shape[1]]
    return (steps / 2) @ weight.dequantize().abs().t()


def kernel_agrees(kernel: quant_cpu.CompiledQuant) -> bool:
    """The float kernels (``_float_kernels_agree``; False where they disagree: no compiled
    kernel), then the integer ones for each instruction set this CPU runs (``_int_kernels_agree``;
    ``kernel.int_isa``: the best that passes, logged where one disagrees; none: the float ones
    serve)."""
    if not _float_kernels_agree(kernel):
        return False
    passed = [isa for isa in kernel.isas if _int_kernels_agree(kernel, isa)]
    kernel.int_isa = passed[-1] if passed else None  # the best that passed (VNNI over AVX2)
    if len(passed) < len(kernel.isas):
        log.warning(
            "quantized kernel: the integer dot products (%s) disagree with the reference; %s serve",
            ", ".join(i for i in kernel.isas if i not in passed),
            kernel.int_isa or "the float ones",
        )
    return True


def _check_forms(gen: torch.Generator, out: int, k: int) -> list[Int8Weight | Q4Weight]:
    """Every layout on one [out, k] weight: int8 per channel, int4, Q4_0-like, Q8_0-like, Q6_K-like
    (groups of 16), int8 with mins, float16 4-bit, float16 groups of 16 with mins."""
    weight = torch.randn(out, k, generator=gen)
    groups = _padded(k) // 32
    int8, q4 = quantize_int8(weight), quantize_int4(weight)
    assert q4.min is not None
    return [
        int8,
        q4,
        Q4Weight(q4.q, q4.scale.float(), None, -8, k),
        Int8Weight(int8.q, torch.rand(out, groups, generator=gen), 32, k),
        Int8Weight(int8.q, torch.rand(out, 2 * groups, generator=gen), 16, k),
        Int8Weight(
            int8.q, torch.rand(out, groups, generator=gen), 32, k, torch.randn(out, groups, generator=gen)
        ),
        Q4Weight(q4.q, q4.scale.half(), q4.min.half(), 0, k),
        Int8Weight(
            int8.q,
            torch.rand(out, 2 * groups, generator=gen).half(),
            16,
            k,
            torch.randn(out, 2 * groups, generator=gen).half(),
        ),
    ]


def _int_kernels_agree(kernel: quant_cpu.CompiledQuant, isa: quant_cpu.Isa) -> bool:
    """The integer kernels: their input quantization equals ``quantize_activations`` exactly
    (ragged rows, a zero block, a tiny one); every form (``_check_forms``) on 13 outputs and an
    input width of 77 (three blocks: pairs only) and 333 (a superblock of eight blocks, then a
    pair and a single block), 1 to 13 rows (the streaming path's passes and row tiles, the
    batched path's tiles and their remainders), accumulating into a column slice: equal to
    ``reference_linear(x, W, "int")`` within float32 rounding, and to the float product within
    ``activation_error_bound``."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 333, generator=gen) * torch.logspace(-3, 3, 5)[:, None]
    x[1, 32:64] = 0
    x[2, 64:96] *= 1e-32
    q, d = kernel.quantize_activations(x, 352)
    want_q, want_d = quantize_activations(x, 352)
    if not (torch.equal(q, want_q) and torch.equal(d, want_d)):
        return False
    for k in (77, 333):
        for form in _check_forms(gen, 13, k):
            dense = form.dequantize()
            for n in (1, 2, 3, 4, 5, 8, 9, 10, 11, 13):  # the batched tiles' remainders: 1, 2, 3 rows
                x = torch.randn(n, k, generator=gen)
                base = torch.randn(n, 20, generator=gen)
                got = base.clone()
                run_kernel(kernel, x, form, got[:, 3:16], True, "int", isa)
                y = got[:, 3:16] - base[:, 3:16]
                exact = x @ dense.t()
                q, d = quantize_activations(x, _padded(k))
                steps = d.repeat_interleave(ACTIVATION_BLOCK, dim=1)
                xq = (q.float() * steps)[:, :k]  # quantized_activations(x), from the same q and d
                bound = (steps[:, :k] / 2) @ dense.abs().t() * 1.001 + 1e-4 * (1 + exact.abs())
                if not torch.allclose(y, xq @ dense.t(), rtol=1e-4, atol=1e-4):  # reference_linear's
                    return False
                if not ((y - exact).abs() <= bound).all() or not torch.equal(got[:, :3], base[:, :3]):
                    return False
    return True


def _float_kernels_agree(kernel: quant_cpu.CompiledQuant) -> bool:
    """Every form on a ragged problem (an odd input width with a partial group, 1 to 13 rows: both
    paths and every tile size, 13 outputs: partial passes and panels, a column-slice output,
    accumulate) against the dense product of the reference dequantization."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(13, 77, generator=gen)
    forms: list[Int8Weight | Q4Weight] = [quantize_int8(weight), quantize_int4(weight)]
    q4 = forms[1]
    assert isinstance(q4, Q4Weight)
    forms.append(Q4Weight(q4.q, q4.scale, None, -8, q4.in_features))
    int8 = forms[0]
    assert isinstance(int8, Int8Weight)
    forms.append(Int8Weight(int8.q, torch.rand(13, 3, generator=gen), 32, 77))  # Q8_0-like
    forms.append(Int8Weight(int8.q, torch.rand(13, 6, generator=gen), 16, 77))  # Q6_K-like
    forms.append(
        Int8Weight(int8.q, torch.rand(13, 3, generator=gen), 32, 77, torch.randn(13, 3, generator=gen))
    )
    forms.append(Q4Weight(q4.q, q4.scale.half(), q4.min.half() if q4.min is not None else None, 0, 77))
    forms.append(
        Int8Weight(
            int8.q, torch.rand(13, 6, generator=gen).half(), 16, 77, torch.randn(13, 6, generator=gen).half()
        )
    )
    for form in forms:
        for n in (1, 2, 3, 4, 5, 7, 9, 13):  # both paths, every tile size
            x = torch.randn(n, 77, generator=gen)
            base = torch.randn(n, 20, generator=gen)
            expected = base[:, 3:16] + x @ form.dequantize().t()
            got = base.clone()
            run_kernel(kernel, x, form, got[:, 3:16], True, "float")
            if not torch.allclose(got[:, 3:16], expected, rtol=1e-4, atol=1e-4) or not torch.equal(
                got[:, :3], base[:, :3]
            ):
                return False
    return True
