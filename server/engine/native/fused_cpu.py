"""The non-matmul work of a decode layer at a few rows, compiled (``gemv_cpu.c``, second part).

At batch 1 the blocked linear kernel streams a layer's weights near the memory bandwidth; what is
left of the layer is about fifteen tiny tensor ops (two RMSNorms, the rotary embedding, the KV
write, the gather of the paged KV blocks and the attention, SiLU*mul), each costing more in
PyTorch's dispatch than in arithmetic, plus the Python between them. Measured on the embedded
model (``bench/decode_floor.py``) that was about a third of the batch-1 step. Here they are plain
loops on the calling thread:

- ``rms_norm``, ``silu_mul``, ``attend`` (rotary + KV write + attention over the row's blocks,
  grouped-query heads read from their KV head, never repeated): the steps of a layer whose
  projections add adapters in between (the LoRA backends run as before);
- ``layers``: every layer of the step in one call, the blocked linear kernel included, for a step
  whose rows read no adapter (the base model, or merged mode);
- ``parts_layers``: the same with each projection described by parts (``parts_table``: a kind
  and its pointers per part), so that quantized projections (``--quantization``: int8, 4-bit, a
  GGUF file's mixed block types stacked in one projection) run in that one call too, the C code
  calling ``quant_cpu.c``'s kernels through their addresses. Checked once (``parts_agree``:
  every form against the dense product of its reference dequantization) before a model uses it
  (``load_parts``); where that fails the projections run from Python between the compiled steps.

A row here is a new token with its own position, KV slot, block table and context length (its
position + 1): a verify step (speculative decoding: a sequence's last sampled token and its drafts)
is several rows over one sequence's blocks, each token's K and V written before any token attends,
so each sees the tokens of its step before it. The native model uses them for decode steps of up
to ``gemv_cpu.ONE_THREAD_ROWS`` rows and verify steps of up to that many sequences and
``VERIFY_TOKENS`` tokens, in the blocked layout or with quantized weights; bigger steps keep
PyTorch's parallel ops. ``layers`` and ``parts_layers`` run on ``threads`` threads (the runner's
``decode_threads`` choice) in one OpenMP region for the whole step: each thread takes its run of
every projection's rows and its share of the attention's heads and SiLU's columns, and norms the
rows itself into its own scratch (``_layers_step`` sizes the work buffer for every thread); the
threads meet between the stages, spinning briefly, then asleep (``gemv_cpu.c``: ``step_wait``).
Built with the linear kernel (one library, ``cpu_build.py``), checked once against the PyTorch
form of each function on ragged shapes (odd widths, several KV block counts, grouped-query
heads, the one-call layers on one and two threads); ``load`` returns None where that fails,
and the model keeps its PyTorch ops.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from server.engine import cpu_build, gemv_cpu, sgmv_cpu
from server.engine.native import quant_cpu, quantized
from server.engine.native.quantized import Int8Weight, Q4Weight, QuantizedWeight, StackedWeight

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
log = logging.getLogger(__name__)

VERIFY_TOKENS = 8  # a verify step of up to this many tokens in all runs the compiled path


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _float_rows(*tensors: torch.Tensor) -> bool:
    """float32 CPU tensors whose last dimension is contiguous."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.stride(-1) == 1 for t in tensors)


@dataclass(frozen=True)
class StepIndex:
    """Where a decode step's rows write and read in the KV pools, checked once for every layer
    (``CompiledDecode.step_index``): the C code indexes the pools with these values."""

    write_blocks: torch.Tensor  # [N] int64 per new token, each < pool_blocks
    write_offsets: torch.Tensor  # [N], each < block
    block_table: torch.Tensor  # [N, nb] int64, each < pool_blocks: the token's sequence's blocks
    lengths: torch.Tensor  # [N] int64, in 1..nb * block: the token's position + 1
    pool_blocks: int  # the pools' first dimension
    block: int  # positions per block
    scores: torch.Tensor  # [nb * block] scratch

    def fits(self, pool: torch.Tensor) -> bool:
        return pool.shape[0] == self.pool_blocks and pool.shape[1] == self.block


@dataclass(frozen=True)
class LayerTable:
    """A model's layer tensors as ``CompiledDecode.layers`` reads them (``layer_table``)."""

    tensors: list[torch.Tensor | None]  # [L * 9], layer by layer (kept: the addresses stay valid)
    dims: tuple[int, int, int, int, int, int]
    addresses: torch.Tensor  # [L, 9] int64

    def holds(self, tensors: Sequence[torch.Tensor | None]) -> bool:
        """True when ``tensors`` (layer by layer) are these very tensors (no merge replaced one)."""
        return len(tensors) == len(self.tensors) and all(map(operator.is_, tensors, self.tensors))


Projection = torch.Tensor | QuantizedWeight  # a packed float32 weight (``gemv_cpu.pack``) or a quantized one
_KINDS = {"blocked": 0, "int8": 1, "q4": 2}  # a part's kind (PART_* in gemv_cpu.c)


@dataclass(frozen=True)
class PartsTable:
    """A model's layers as ``CompiledDecode.parts_layers`` reads them (``parts_table``): each
    projection a run of parts, float32 blocked or quantized (the float32-only ``LayerTable``'s
    counterpart for ``--quantization``)."""

    entries: list[object]  # [L * 9], layer by layer (kept: the addresses stay valid)
    dims: tuple[int, int, int, int, int, int]
    layers: torch.Tensor  # [L, 13] int64: norms, bias, pools, (first part, count) per projection
    parts: torch.Tensor  # [P, 9] int64: kind, weights, kp, scale, min, group/offset, half, rows, kernel
    dot: quant_cpu.Dot = "float"  # the quantized kernels' dot product (``quant_cpu.CompiledQuant.dot``)

    def holds(self, entries: Sequence[object]) -> bool:
        """True when ``entries`` (layer by layer) are these very objects."""
        return len(entries) == len(self.entries) and all(map(operator.is_, entries, self.entries))


def _part_rows(
    weight: Projection, out: int, k: int, quant: quant_cpu.CompiledQuant | None, dot: quant_cpu.Dot = "float"
) -> list[list[int]]:
    """``weight`` ([out, k]) as parts' rows of ``PartsTable.parts``, checked (the C code trusts
    them): a packed float32 tensor, an int8 or 4-bit matrix (``quantized.py``'s layouts), or a
    stack of those; quantized parts call the ``dot`` kernels."""

    def refuse(what: str) -> ValueError:
        return ValueError(f"decode layers: {what} where a [{out}, {k}] projection was due")

    if isinstance(weight, torch.Tensor):
        shape = (-(-out // gemv_cpu.BLOCK), k, gemv_cpu.BLOCK)
        ok = weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.is_contiguous()
        if not ok or tuple(weight.shape) != shape:
            raise refuse(f"a packed weight of shape {tuple(weight.shape)}")
        return [[_KINDS["blocked"], weight.data_ptr(), 0, 0, 0, 0, 0, out, 0]]
    if isinstance(weight, StackedWeight):
        rows = [r for _, _, p in weight.spans() for r in _part_rows(p, p.shape[0], k, quant, dot)]
        if sum(r[7] for r in rows) != out:
            raise refuse(f"parts of {sum(r[7] for r in rows)} rows")
        return rows
    if quant is None:
        raise refuse("a quantized weight without the compiled quantized kernels")
    rows_out, width = weight.q.shape
    kp = width if isinstance(weight, Int8Weight) else 2 * width
    group = weight.group if isinstance(weight, Int8Weight) else quantized.GROUP
    dtype = torch.int8 if isinstance(weight, Int8Weight) else torch.uint8
    ok = weight.q.dtype == dtype and weight.q.is_contiguous() and weight.q.device.type == "cpu"
    ok = ok and rows_out == out and weight.in_features == k and kp % 32 == 0 and k <= kp < k + 32
    ok = ok and (group == 16 or group % 32 == 0) and kp % group == 0
    scales = [t for t in (weight.scale, weight.min) if t is not None]
    ok = ok and all(t.is_contiguous() and t.dtype == weight.scale.dtype for t in scales)
    ok = ok and weight.scale.dtype in (torch.float32, torch.float16)
    ok = ok and all(tuple(t.shape) == (out, kp // group) for t in scales)
    if not ok:
        raise refuse(f"a {type(weight).__name__} of shape {tuple(weight.q.shape)}")
    half = int(weight.scale.dtype == torch.float16)
    minimum = 0 if weight.min is None else weight.min.data_ptr()
    if isinstance(weight, Int8Weight):
        kind, extra, fn = _KINDS["int8"], group, quant.q8_address(dot)
    else:
        kind, extra, fn = _KINDS["q4"], weight.offset, quant.q4_address(dot)
    return [[kind, weight.q.data_ptr(), kp, weight.scale.data_ptr(), minimum, extra, half, out, fn]]


def _layers_step(
    dims: tuple[int, int, int, int, int, int],
    x: torch.Tensor,  # [B, hidden]
    cos: torch.Tensor,  # [B, 1, D]
    sin: torch.Tensor,
    index: StepIndex,
    pools: torch.Tensor,  # a layer's K pool: [blocks, block, kvh, D]
    threads: int,
) -> tuple[int, int, torch.Tensor]:
    """What both one-call paths check before C reads the step, and the scratch memory they give
    it: (rows, blocks per row, work buffer; each thread past the first has its own normed rows
    and attention scores in it). A step that does not fit is a ValueError."""
    hidden, heads, kvh, d, inter, block = dims
    b, nb = x.shape[0], index.block_table.shape[1]
    fits = x.is_contiguous() and _float_rows(x) and x.shape[1] == hidden and cos.is_contiguous()
    fits = fits and sin.is_contiguous() and cos.numel() == sin.numel() == b * d
    fits = fits and index.fits(pools) and index.block_table.shape[0] == b
    if not fits:
        raise ValueError(
            f"decode layers: x {tuple(x.shape)}, table {tuple(index.block_table.shape)} do not fit"
        )
    own = b * hidden + nb * block  # a thread's normed rows and scores (split_work in gemv_cpu.c)
    work = torch.empty(b * ((heads + 2 * kvh) * d + heads * d + 3 * inter) + max(threads, 1) * own)
    return b, nb, work


class CompiledDecode:
    """The loaded library's decode-layer functions (the C code trusts shapes: checked here)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._norm = library.rms_norm_rows
        self._norm.argtypes = [_P, _I, _I, _I, _P, _F, _P, _I]
        self._silu = library.silu_mul_rows
        self._silu.argtypes = [_P, _I, _I, _I, _P, _I]
        self._attend = library.attend_decode
        self._attend.argtypes = [_I, _P, _I, _I, _I, _I, _P, _P, _P, _P, _I, _P, _P, _P, _I, _P, _F, _P, _I, _P]  # fmt: skip
        self._layers = library.decode_layers
        self._layers.argtypes = [_I, _P, _P, _F, _F, _I, _P, _P, _P, _P, _P, _P, _I, _P, _P, ctypes.c_int]
        for fn in (self._norm, self._silu, self._attend, self._layers):
            fn.restype = None
        self._parts = library.decode_layers_parts
        self._parts.argtypes = [_I, _P, _P, _P, _F, _F, _I, _P, _P, _P, _P, _P, _P, _I, _P, _P, ctypes.c_int]
        self._parts.restype = ctypes.c_int

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> torch.Tensor:
        """x: [N, H] -> out: [N, H] = ``F.rms_norm(x, (H,), weight, eps)``."""
        n, h = x.shape
        if not (_float_rows(x, weight, out) and weight.shape == (h,) and out.shape == (n, h)):
            raise ValueError(
                f"rms_norm: x {tuple(x.shape)}, weight {tuple(weight.shape)}, out {tuple(out.shape)}"
            )
        self._norm(x.data_ptr(), x.stride(0), n, h, weight.data_ptr(), eps, out.data_ptr(), out.stride(0))
        return out

    def silu_mul(self, gate_up: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """gate_up: [N, 2 I] (gate | up) -> out: [N, I] = silu(gate) * up."""
        n, width = gate_up.shape
        if not (_float_rows(gate_up, out) and width % 2 == 0 and out.shape == (n, width // 2)):
            raise ValueError(f"silu_mul: gate_up {tuple(gate_up.shape)}, out {tuple(out.shape)}")
        self._silu(gate_up.data_ptr(), gate_up.stride(0), n, width // 2, out.data_ptr(), out.stride(0))
        return out

    @staticmethod
    def step_index(
        write_blocks: torch.Tensor,
        write_offsets: torch.Tensor,
        block_table: torch.Tensor,
        lengths: torch.Tensor,
        pool_blocks: int,
        block: int,
    ) -> StepIndex:
        """The step's KV indices, checked against the pools' size (see ``StepIndex``)."""
        b, nb = block_table.shape
        longs = (write_blocks, write_offsets, block_table, lengths)
        fits = all(t.dtype == torch.int64 and t.device.type == "cpu" and t.is_contiguous() for t in longs)
        fits = fits and write_blocks.shape == write_offsets.shape == lengths.shape == (b,)
        if fits and b:
            bounds = torch.stack([lengths.min(), -lengths.max(), -block_table.max(), -write_blocks.max(),
                                  write_blocks.min(), block_table.min(), write_offsets.min(),
                                  -write_offsets.max()]).tolist()  # fmt: skip
            limits = [1, -nb * block, 1 - pool_blocks, 1 - pool_blocks, 0, 0, 0, 1 - block]
            fits = all(v >= limit for v, limit in zip(bounds, limits, strict=True))
        if not fits:
            raise ValueError(
                f"decode step: lengths {lengths.tolist()}, blocks {block_table.tolist()}, writes at "
                f"{write_blocks.tolist()}/{write_offsets.tolist()} outside {pool_blocks} blocks of {block}"
            )
        scores = torch.empty(nb * block)
        return StepIndex(write_blocks, write_offsets, block_table, lengths, pool_blocks, block, scores)

    def attend(
        self,
        qkv: torch.Tensor,  # [B, (heads + 2 kvh) D]: q and k rotated in place
        heads: int,
        cos: torch.Tensor,  # [B, 1, D] or [B, D]
        sin: torch.Tensor,
        k_pool: torch.Tensor,  # [blocks, block, kvh, D], the new K and V written into it
        v_pool: torch.Tensor,
        index: StepIndex,
        scale: float,
        out: torch.Tensor,  # [B, heads D]
    ) -> torch.Tensor:
        """One new token per row (decode or verify; see the module docstring): rotary on q and k,
        every row's K and V written at its slot, then each row's heads attending to its first
        ``lengths`` positions -> out."""
        b = qkv.shape[0]
        _, block, kvh, d = k_pool.shape
        nb = index.block_table.shape[1]
        fits = _float_rows(qkv, cos, sin, out) and k_pool.is_contiguous() and v_pool.is_contiguous()
        fits = fits and k_pool.dtype == v_pool.dtype == torch.float32 and v_pool.shape == k_pool.shape
        fits = fits and index.fits(k_pool) and index.block_table.shape[0] == b
        fits = fits and cos.is_contiguous() and sin.is_contiguous() and cos.numel() == sin.numel() == b * d
        fits = fits and heads % kvh == 0 and d % 2 == 0 and qkv.shape[1] == (heads + 2 * kvh) * d
        fits = fits and out.shape == (b, heads * d)
        if not fits:
            raise ValueError(
                f"attend: qkv {tuple(qkv.shape)}, pools {tuple(k_pool.shape)}, table "
                f"{tuple(index.block_table.shape)}, out {tuple(out.shape)} do not make a decode step"
            )
        self._attend(
            b, qkv.data_ptr(), qkv.stride(0), heads, kvh, d, cos.data_ptr(), sin.data_ptr(),
            k_pool.data_ptr(), v_pool.data_ptr(), block, index.write_blocks.data_ptr(),
            index.write_offsets.data_ptr(), index.block_table.data_ptr(), nb, index.lengths.data_ptr(), scale,
            out.data_ptr(), out.stride(0), index.scores.data_ptr(),
        )  # fmt: skip
        return out

    def layers(
        self,
        table: LayerTable,  # the model's layers (``layer_table``)
        eps: float,
        scale: float,
        x: torch.Tensor,  # [B, hidden], updated in place
        cos: torch.Tensor,  # [B, 1, D]
        sin: torch.Tensor,
        index: StepIndex,
        threads: int = 1,
    ) -> None:
        """Every layer of a decode step without adapters, in one call."""
        dims = table.dims
        pools = table.tensors[7]
        assert pools is not None
        b, nb, work = _layers_step(dims, x, cos, sin, index, pools, threads)
        sizes = torch.tensor(dims, dtype=torch.int64)
        self._layers(
            len(table.addresses), table.addresses.data_ptr(), sizes.data_ptr(), eps, scale, b, x.data_ptr(),
            cos.data_ptr(), sin.data_ptr(), index.write_blocks.data_ptr(), index.write_offsets.data_ptr(),
            index.block_table.data_ptr(), nb, index.lengths.data_ptr(), work.data_ptr(), threads,
        )  # fmt: skip

    @staticmethod
    def layer_table(
        layers: Sequence[Sequence[torch.Tensor | None]], dims: tuple[int, int, int, int, int, int]
    ) -> LayerTable:
        """``layers[l]``: input norm [H], packed qkv, qkv bias or None, packed o, post norm [H],
        packed gate_up, packed down, k pool, v pool (packed weights: ``gemv_cpu.pack``); dims:
        hidden, heads, KV heads, head size, intermediate size, KV block size. Checked (dtype,
        contiguity, shapes) -> what ``layers`` takes, valid while these tensors are the model's."""
        hidden, heads, kvh, d, inter, block = dims
        width = (heads + 2 * kvh) * d
        shapes = ((hidden,), (-(-width // 16), hidden, 16), (width,), (-(-hidden // 16), heads * d, 16),
                  (hidden,), (-(-2 * inter // 16), hidden, 16), (-(-hidden // 16), inter, 16),
                  (k_pool_shape := (-1, block, kvh, d)), k_pool_shape)  # fmt: skip
        for layer in layers:
            for index, (t, shape) in enumerate(zip(layer, shapes, strict=True)):
                if t is None and index == 2:  # the qkv bias alone is optional
                    continue
                ok = t is not None and t.dtype == torch.float32 and t.device.type == "cpu"
                ok = ok and t.is_contiguous() and t.dim() == len(shape)
                if not ok or any(s not in (-1, a) for s, a in zip(shape, t.shape, strict=True)):
                    where = None if t is None else tuple(t.shape)
                    raise ValueError(f"decode layers: a weight of shape {where} where {shape} was due")
        addresses = torch.tensor([[_ptr(t) or 0 for t in layer] for layer in layers], dtype=torch.int64)
        return LayerTable([t for layer in layers for t in layer], dims, addresses)

    def parts_table(
        self,
        layers: Sequence[Sequence[object]],
        dims: tuple[int, int, int, int, int, int],
        quant: quant_cpu.CompiledQuant | None,
        dot: quant_cpu.Dot | None = None,
    ) -> PartsTable:
        """``layer_table`` for projections that may be quantized: ``layers[l]``: input norm, qkv,
        qkv bias or None, o, post norm, gate_up, down, k pool, v pool, each projection a packed
        float32 tensor or a ``QuantizedWeight`` (``quant``: the kernels those run on, with ``dot``'s
        products, default ``quant_cpu.DOT``: ``quant.dot``). Checked -> what ``parts_layers``
        takes, valid while these objects are the model's."""
        hidden, heads, kvh, d, inter, block = dims
        dot = quant.dot(dot) if quant is not None else "float"
        projections = {1: ((heads + 2 * kvh) * d, hidden), 3: (hidden, heads * d), 5: (2 * inter, hidden),
                       6: (hidden, inter)}  # fmt: skip
        vectors = {0: hidden, 2: (heads + 2 * kvh) * d, 4: hidden}
        layer_rows: list[list[int]] = []
        parts: list[list[int]] = []
        for layer in layers:
            if len(layer) != 9:
                raise ValueError(f"decode layers: a layer of {len(layer)} entries where 9 were due")
            spans: list[int] = []
            for index, (out, k) in projections.items():
                rows = _part_rows(layer[index], out, k, quant, dot)  # type: ignore[arg-type]
                spans += [len(parts), len(rows)]
                parts += rows
            tensors = [layer[i] for i in (0, 2, 4, 7, 8)]
            for index, t in zip((0, 2, 4, 7, 8), tensors, strict=True):
                if t is None and index == 2:
                    continue
                ok = isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu"
                ok = ok and t.is_contiguous()  # type: ignore[union-attr]
                if index in vectors:
                    ok = ok and tuple(t.shape) == (vectors[index],)  # type: ignore[union-attr]
                else:
                    ok = ok and t.dim() == 4 and tuple(t.shape[1:]) == (block, kvh, d)  # type: ignore[union-attr]
                if not ok:
                    where = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f"decode layers: entry {index} of shape {where} does not fit")
            if layer[8].shape != layer[7].shape:  # type: ignore[union-attr]
                raise ValueError("decode layers: the k and v pools differ")
            layer_rows.append([_ptr(t) or 0 for t in tensors] + spans)  # type: ignore[arg-type]
        return PartsTable(
            [e for layer in layers for e in layer], dims, torch.tensor(layer_rows, dtype=torch.int64),
            torch.tensor(parts, dtype=torch.int64).view(-1, 9), dot,
        )  # fmt: skip

    def parts_layers(
        self,
        table: PartsTable,
        eps: float,
        scale: float,
        x: torch.Tensor,  # [B, hidden], updated in place
        cos: torch.Tensor,  # [B, 1, D]
        sin: torch.Tensor,
        index: StepIndex,
        threads: int = 1,
    ) -> None:
        """``layers`` over a ``PartsTable``: every layer of a decode step without adapters in one
        call, quantized projections included."""
        pools = table.entries[7]
        assert isinstance(pools, torch.Tensor)
        b, nb, work = _layers_step(table.dims, x, cos, sin, index, pools, threads)
        sizes = torch.tensor(table.dims, dtype=torch.int64)
        rc = self._parts(
            len(table.layers), table.layers.data_ptr(), table.parts.data_ptr(), sizes.data_ptr(), eps, scale,
            b, x.data_ptr(), cos.data_ptr(), sin.data_ptr(), index.write_blocks.data_ptr(),
            index.write_offsets.data_ptr(), index.block_table.data_ptr(), nb, index.lengths.data_ptr(),
            work.data_ptr(), threads,
        )  # fmt: skip
        if rc != 0:
            raise MemoryError("decode layers: a quantized kernel could not allocate its buffers")


# ----------------------------------------------------------------------------- references


def reference_attend(
    qkv: torch.Tensor,
    heads: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    write_blocks: torch.Tensor,
    write_offsets: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``CompiledDecode.attend`` in PyTorch (what the native model does otherwise): the same side
    effects on qkv and the pools, the attention output [B, heads D] returned."""
    from server.engine.native.layers import rope_signed_sin, rotate_in_place

    b = qkv.shape[0]
    _, block, kvh, d = k_pool.shape
    qk = qkv[:, : (heads + kvh) * d].view(b, heads + kvh, d)
    rotate_in_place(qk, cos.view(b, 1, d), rope_signed_sin(sin.view(b, 1, d)))
    k = qk[:, heads:]
    v = qkv[:, (heads + kvh) * d :].view(b, kvh, d)
    k_pool[write_blocks, write_offsets] = k
    v_pool[write_blocks, write_offsets] = v
    nb = block_table.shape[1]
    keys = k_pool.index_select(0, block_table.reshape(-1)).view(b, nb * block, kvh, d).transpose(1, 2)
    values = v_pool.index_select(0, block_table.reshape(-1)).view(b, nb * block, kvh, d).transpose(1, 2)
    attend = torch.arange(nb * block)[None, :] < lengths[:, None]  # [B, T]
    out = F.scaled_dot_product_attention(
        qk[:, :heads, None, :], keys, values, attn_mask=attend[:, None, None, :], scale=scale, enable_gqa=True
    )  # [B, heads, 1, D]
    return out.reshape(b, heads * d)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def _attend_case(kernel: CompiledDecode, gen: torch.Generator, b: int, heads: int, kvh: int, d: int,
                 block: int, nb: int) -> bool:  # fmt: skip
    blocks = b * nb + 1
    k_pool = torch.randn(blocks, block, kvh, d, generator=gen)
    v_pool = torch.randn(blocks, block, kvh, d, generator=gen)
    table = torch.randperm(blocks, generator=gen)[: b * nb].view(b, nb).contiguous()
    lengths = torch.randint(1, nb * block + 1, (b,), generator=gen)
    lengths[0] = nb * block  # one row uses every block to its end
    last = lengths - 1  # the new token's place: its row's last position
    write_blocks = table.gather(1, (last // block)[:, None])[:, 0].contiguous()
    write_offsets = (last % block).contiguous()
    qkv = torch.randn(b, (heads + 2 * kvh) * d, generator=gen)
    angles = torch.rand(b, d // 2, generator=gen) * 6
    cos, sin = torch.cat((angles, angles), 1).cos(), torch.cat((angles, angles), 1).sin()
    args = (write_blocks, write_offsets, table, lengths)
    pools = (k_pool.clone(), v_pool.clone())
    want_qkv = qkv.clone()
    want = reference_attend(want_qkv, heads, cos, sin, *pools, *args, 0.37)
    index = kernel.step_index(*args, blocks, block)
    got = kernel.attend(qkv, heads, cos, sin, k_pool, v_pool, index, 0.37, out=torch.empty(b, heads * d))
    return (
        _close(got, want) and _close(qkv, want_qkv) and _close(k_pool, pools[0]) and _close(v_pool, pools[1])
    )


def _verify_case(kernel: CompiledDecode, gen: torch.Generator, counts: Sequence[int], heads: int, kvh: int,
                 d: int, block: int, nb: int) -> bool:  # fmt: skip
    """Sequences carrying ``counts[s]`` new tokens each (a verify step: a row of 1 + k tokens per
    sequence), the tokens given to the kernel in a shuffled order: each token's row holds its
    sequence's blocks and its own position; the first sequence's tokens cross a block boundary.
    -> the kernel agrees with ``reference_attend`` (K and V written first, then a causal mask)."""
    blocks = len(counts) * nb + 1
    k_pool = torch.randn(blocks, block, kvh, d, generator=gen)
    v_pool = torch.randn(blocks, block, kvh, d, generator=gen)
    tables = torch.randperm(blocks, generator=gen)[: len(counts) * nb].view(len(counts), nb)
    rows: list[tuple[int, int]] = []  # (sequence, position) of each new token
    for seq, count in enumerate(counts):
        # the first sequence's new tokens start just before a block boundary, the others anywhere
        start = block - 1 if seq == 0 else int(torch.randint(0, nb * block - count + 1, (1,), generator=gen))
        rows += [(seq, start + j) for j in range(count)]
    order = torch.randperm(len(rows), generator=gen).tolist()
    sequences = torch.tensor([rows[i][0] for i in order])
    positions = torch.tensor([rows[i][1] for i in order])
    table = tables.index_select(0, sequences).contiguous()  # [N, nb]
    write_blocks = table.gather(1, (positions // block)[:, None])[:, 0].contiguous()
    args = (write_blocks, (positions % block).contiguous(), table, positions + 1)
    n = len(rows)
    qkv = torch.randn(n, (heads + 2 * kvh) * d, generator=gen)
    angles = torch.rand(n, d // 2, generator=gen) * 6
    cos, sin = torch.cat((angles, angles), 1).cos(), torch.cat((angles, angles), 1).sin()
    pools = (k_pool.clone(), v_pool.clone())
    want_qkv = qkv.clone()
    want = reference_attend(want_qkv, heads, cos, sin, *pools, *args, 0.29)
    index = kernel.step_index(*args, blocks, block)
    got = kernel.attend(qkv, heads, cos, sin, k_pool, v_pool, index, 0.29, out=torch.empty(n, heads * d))
    return (
        _close(got, want) and _close(qkv, want_qkv) and _close(k_pool, pools[0]) and _close(v_pool, pools[1])
    )


def agrees_with_reference(kernel: CompiledDecode) -> bool:
    """Each function against its PyTorch form: odd widths, row strides, partial KV blocks, one
    and several blocks, grouped-query heads (and none), one to five rows, verify steps (several
    tokens of a sequence, ragged over sequences); ``layers`` against the
    same steps done with the linear kernel and ``attend`` (which the lines above check)."""
    gen = torch.Generator().manual_seed(0)
    for rows, h in ((1, 37), (3, 64), (5, 9)):
        x = torch.randn(rows, h + 3, generator=gen)[:, 1 : h + 1]  # a row stride wider than h
        w = torch.randn(h, generator=gen)
        if not _close(kernel.rms_norm(x, w, 1e-5, torch.empty(rows, h)), F.rms_norm(x, (h,), w, 1e-5)):
            return False
        gu = torch.randn(rows, 2 * h, generator=gen) * 4
        if not _close(kernel.silu_mul(gu, torch.empty(rows, h)), F.silu(gu[:, :h]) * gu[:, h:]):
            return False
    cases = ((1, 9, 3, 64, 16, 3), (2, 4, 4, 6, 5, 1), (3, 6, 2, 10, 4, 4), (1, 2, 1, 8, 16, 1))
    verify = (((5,), 9, 3, 64, 16, 2), ((2, 3, 1), 4, 2, 6, 4, 3))
    return (
        all(_attend_case(kernel, gen, *case) for case in cases)
        and all(_verify_case(kernel, gen, *case) for case in verify)
        and all(_layers_agree(kernel, gen, threads) for threads in (1, 2))
    )


def _layers_agree(kernel: CompiledDecode, gen: torch.Generator, threads: int = 1) -> bool:
    """Two layers of a tiny model (GQA, odd sizes, a qkv bias on one) through ``layers`` on
    ``threads`` threads (each takes its share of every projection's blocks, partial ones
    included, and of the attention's heads) against the same arithmetic step by step: a decode
    step of two sequences, and a verify step (two tokens of one sequence, the second attending
    to the first, beside a token of another)."""
    return all(_layers_case(kernel, gen, threads, verify) for verify in (False, True))


def _layers_case(kernel: CompiledDecode, gen: torch.Generator, threads: int, verify: bool) -> bool:
    linear = gemv_cpu.load()
    if linear is None:
        return False
    b, hidden, heads, kvh, d, inter, block, nb = 2 + verify, 21, 4, 2, 6, 13, 4, 3
    width = (heads + 2 * kvh) * d
    weights = []
    for index in range(2):
        weights.append(
            [
                torch.randn(hidden, generator=gen),
                gemv_cpu.pack(torch.randn(width, hidden, generator=gen) / 4),
                torch.randn(width, generator=gen) if index else None,
                gemv_cpu.pack(torch.randn(hidden, heads * d, generator=gen) / 4),
                torch.randn(hidden, generator=gen),
                gemv_cpu.pack(torch.randn(2 * inter, hidden, generator=gen) / 4),
                gemv_cpu.pack(torch.randn(hidden, inter, generator=gen) / 4),
                torch.randn(b * nb + 1, block, kvh, d, generator=gen),
                torch.randn(b * nb + 1, block, kvh, d, generator=gen),
            ]
        )
    table = torch.arange(b * nb).view(b, nb)
    lengths = torch.tensor([nb * block - 1, 2, 3][:b])
    if verify:  # rows 1 and 2: a sequence's tokens at positions 1 and 2 (the second sees the first)
        table[2] = table[1]
    write_blocks = table.gather(1, ((lengths - 1) // block)[:, None])[:, 0].contiguous()
    write_offsets = (lengths - 1) % block
    angles = torch.rand(b, 1, d // 2, generator=gen) * 6
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    x = torch.randn(b, hidden, generator=gen)
    want = x.clone()
    expected_pools = [(w[7].clone(), w[8].clone()) for w in weights]
    for w, (k_pool, v_pool) in zip(weights, expected_pools, strict=True):
        h = F.rms_norm(want, (hidden,), w[0], 1e-6)
        qkv = linear.linear(h, w[1], width, w[2])
        attn = reference_attend(
            qkv, heads, cos, sin, k_pool, v_pool, write_blocks, write_offsets, table, lengths, 0.4
        )
        want += linear.linear(attn, w[3], hidden)
        gu = linear.linear(F.rms_norm(want, (hidden,), w[4], 1e-6), w[5], 2 * inter)
        want += linear.linear(F.silu(gu[:, :inter]) * gu[:, inter:], w[6], hidden)
    dims = (hidden, heads, kvh, d, inter, block)
    index = kernel.step_index(write_blocks, write_offsets, table, lengths, b * nb + 1, block)
    kernel.layers(kernel.layer_table(weights, dims), 1e-6, 0.4, x, cos, sin, index, threads)
    pools_agree = all(
        _close(w[7], k) and _close(w[8], v) for w, (k, v) in zip(weights, expected_pools, strict=True)
    )
    return _close(x, want) and pools_agree


def _dense(weight: Projection, out: int) -> torch.Tensor:
    """A projection's weight as a dense [out, in] float32 matrix (the reference's)."""
    return gemv_cpu.unpack(weight, out) if isinstance(weight, torch.Tensor) else weight.dequantize()


def _project(x: torch.Tensor, weight: Projection, out: int, dot: quant_cpu.Dot) -> torch.Tensor:
    """The reference of a projection: x @ W.T with the dense weight, x quantized to int8 blocks
    first where a quantized weight runs the integer kernels (``quantized.reference_linear``)."""
    if isinstance(weight, torch.Tensor):
        return x @ _dense(weight, out).t()
    return quantized.reference_linear(x, weight, dot)


def sample_projection(gen: torch.Generator, out: int, k: int, form: int) -> Projection:
    """A [out, k] projection in one of six forms: int8 per channel (float16 scale), int4 (float16
    min and scale), Q4_0-like (offset -8, float32 scale, no min), Q6_K-like int8 (groups of 16,
    a min), a float32 packed one, or a stack of the first three (a GGUF file's mixed parts)."""
    w = torch.randn(out, k, generator=gen) / 4
    if form == 0:
        return quantized.quantize_int8(w)
    if form == 1:
        return quantized.quantize_int4(w)
    if form == 2:
        q4 = quantized.quantize_int4(w, half=False)
        return Q4Weight(q4.q, q4.scale, None, -8, k)
    if form == 3:
        int8 = quantized.quantize_int8(w)
        groups = int8.q.shape[1] // 16
        scale, low = torch.rand(out, groups, generator=gen) / 50, torch.randn(out, groups, generator=gen) / 9
        return Int8Weight(int8.q, scale, 16, k, low)
    if form == 4:
        return gemv_cpu.pack(w)
    third = out // 3
    return StackedWeight([quantized.quantize_int8(w[:third]), quantized.quantize_int4(w[third : 2 * third]),
                          sample_projection(gen, out - 2 * third, k, 2)])  # type: ignore[list-item]  # fmt: skip


def parts_agree(
    kernel: CompiledDecode, quant: quant_cpu.CompiledQuant, threads: Sequence[int] = (1, 2)
) -> bool:
    """Two layers of a tiny model (GQA, odd sizes, a qkv bias on one) whose projections take
    every form (``sample_projection``) through ``parts_layers``, one and three rows, on each of
    ``threads`` (each thread takes its share of every part's rows), against the dense product of
    each weight's reference dequantization step by step (with the input rows quantized to int8
    blocks for the integer kernels: both dot products where both pass)."""
    gen = torch.Generator().manual_seed(1)
    hidden, heads, kvh, d, inter, block, nb = 37, 4, 2, 6, 45, 4, 3
    width = (heads + 2 * kvh) * d
    dots: list[quant_cpu.Dot] = ["float", "int"] if quant.int_checked else ["float"]
    cases = ((dot, b, count) for dot in dots for b in (1, 3) for count in threads)
    for dot, b, count in cases:
        layers: list[list[object]] = []
        for index in range(2):
            forms = [(index * 4 + j) % 6 for j in range(4)]
            layers.append([
                torch.randn(hidden, generator=gen),
                sample_projection(gen, width, hidden, forms[0]),
                torch.randn(width, generator=gen) if index else None,
                sample_projection(gen, hidden, heads * d, forms[1]),
                torch.randn(hidden, generator=gen),
                sample_projection(gen, 2 * inter, hidden, forms[2]),
                sample_projection(gen, hidden, inter, 5 if index else forms[3]),
                torch.randn(b * nb + 1, block, kvh, d, generator=gen),
                torch.randn(b * nb + 1, block, kvh, d, generator=gen),
            ])  # fmt: skip
        table = torch.arange(b * nb).view(b, nb)
        lengths = torch.tensor([nb * block - 1, 2, nb * block][:b])
        write_blocks = table.gather(1, ((lengths - 1) // block)[:, None])[:, 0].contiguous()
        write_offsets = (lengths - 1) % block
        angles = torch.rand(b, 1, d // 2, generator=gen) * 6
        cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
        x = torch.randn(b, hidden, generator=gen)
        want = x.clone()
        expected_pools = [(w[7].clone(), w[8].clone()) for w in layers]  # type: ignore[union-attr]
        for w, (k_pool, v_pool) in zip(layers, expected_pools, strict=True):
            h = F.rms_norm(want, (hidden,), w[0], 1e-6)  # type: ignore[arg-type]
            qkv = _project(h, w[1], width, dot) + (0 if w[2] is None else w[2])  # type: ignore[arg-type,operator]
            attn = reference_attend(
                qkv, heads, cos, sin, k_pool, v_pool, write_blocks, write_offsets, table, lengths, 0.4
            )
            want += _project(attn, w[3], hidden, dot)  # type: ignore[arg-type]
            gu = _project(F.rms_norm(want, (hidden,), w[4], 1e-6), w[5], 2 * inter, dot)  # type: ignore[arg-type]
            want += _project(F.silu(gu[:, :inter]) * gu[:, inter:], w[6], hidden, dot)  # type: ignore[arg-type]
        dims = (hidden, heads, kvh, d, inter, block)
        index = kernel.step_index(write_blocks, write_offsets, table, lengths, b * nb + 1, block)
        parts = kernel.parts_table(layers, dims, quant, dot)
        kernel.parts_layers(parts, 1e-6, 0.4, x, cos, sin, index, count)
        pools_agree = all(
            _close(w[7], k) and _close(w[8], v)  # type: ignore[arg-type]
            for w, (k, v) in zip(layers, expected_pools, strict=True)
        )
        if not (torch.allclose(x, want, rtol=1e-4, atol=1e-4) and pools_agree):
            return False
    return True


def load() -> CompiledDecode | None:
    """The compiled decode-layer functions, or None where they cannot be built or checked here."""
    return _build(sgmv_cpu.current()[1])


def load_parts() -> tuple[CompiledDecode, quant_cpu.CompiledQuant] | None:
    """The decode-layer functions with the quantized kernels their ``parts_layers`` calls, once
    ``parts_agree`` holds here; None where either is missing or it does not (then a quantized
    model runs its projections from Python between the compiled steps)."""
    return _build_parts(sgmv_cpu.current()[1])


@functools.cache
def _build_parts(cache_dir: Path) -> tuple[CompiledDecode, quant_cpu.CompiledQuant] | None:
    kernel, quant = _build(cache_dir), quant_cpu.load()
    if kernel is None or quant is None:
        return None
    if not parts_agree(kernel, quant):
        log.warning("compiled decode layers with quantized projections disagree with PyTorch: not used")
        return None
    return kernel, quant


@functools.cache
def _build(cache_dir: Path) -> CompiledDecode | None:
    return cpu_build.load_checked(
        "gemv_cpu", gemv_cpu.SOURCE, cache_dir, "compiled decode-layer functions", CompiledDecode,
        agrees_with_reference,
    )  # fmt: skip
