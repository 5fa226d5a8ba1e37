"""Building blocks of the native Llama-family model: RMSNorm, RoPE, fused projections with LoRA.

A fused projection computes several PEFT modules' outputs with one matrix:

    x ──► W_qkv x  = [ q | k | v ]            W_qkv = cat(W_q, W_k, W_v)  [q+2kv, hidden]
    │                  ▲   ▲   ▲
    └──► bank_q ───────┘   │   │   each part has its own stacked adapter slots (LoraSlotBank),
    └──► bank_k ───────────┘   │   adds s·B(Ax) into its own column slice, and skips the batch
    └──► bank_v ───────────────┘   when none of its rows' adapters adapts that part

so an adapter that targets q and v only leaves k untouched, and each part is merged into its
own rows of the fused weight (``weight_targets``).

On the CPU (float32) the fused weight is kept only in a packed layout (``layouts.py``: the
compiled kernel's blocks, or oneDNN's), which streams faster than a dense ``x @ W.T``; its merge
targets read and write it through ``PackedRows``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from server.engine.lora import LoraBackend, LoraBatchContext, LoraProjection, LoraSlotBank
from server.engine.lora.gathered import GatheredLora
from server.engine.lora.segmented import SegmentedLora
from server.engine.native import quantized
from server.engine.native.layouts import PackedLayout
from server.engine.native.quantized import Quantization, QuantizedWeight
from server.engine.runner import WeightTarget


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [N, hidden]; normalised in float32 and scaled in the input dtype (as Hugging Face does).

    ``F.rms_norm`` is one fused kernel (about half the time of the five elementwise ops).
    """
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return weight * F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] (float32), with Llama-3 or linear scaling when configured."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind != "llama3":
        raise ValueError(f"rope_scaling type {kind!r} is not supported by the native runner (llama3, linear)")
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_supported(scaling: dict[str, Any] | None) -> bool:
    return scaling is None or scaling.get("rope_type", scaling.get("type")) in ("llama3", "linear", "default")


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [N] -> cos, sin: [N, 1, head_dim] in ``dtype``."""
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [N, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin: [N, 1, D] (two equal halves) -> ``[-s | s]``, what :func:`rotate_in_place` takes."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rotate_in_place(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
    """x: [N, heads, head_dim] rotated by position in place (the rotate-half convention).

    Hugging Face's ``x·cos + rotate_half(x)·sin`` per half is ``out₁ = x₁·c − x₂·s`` and
    ``out₂ = x₂·c + x₁·s``: with ``[x₂ | x₁]`` (a roll by half) and ``signed_sin = [−s | s]`` that is
    ``x·cos + roll(x)·signed_sin``, two in-place ops and one temporary (the same products, so the
    same bits as the four-op form).
    """
    rolled = x.roll(x.shape[-1] // 2, dims=-1)  # [x2 | x1]
    x.mul_(cos).addcmul_(rolled, signed_sin)


def rope_rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotation of :func:`rotate_in_place` into a new tensor, as plain tensor expressions (no
    in-place writes into views), which ``torch.compile`` and CUDA graph capture take as they are."""
    half = x.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


LoraPart = SegmentedLora | GatheredLora  # one part's adapters as a graph-friendly step argument


def _covers(spans: list[tuple[int, int]], start: int, end: int) -> bool:
    """True when the union of the row spans contains [start, end)."""
    reach = start
    for s, e in sorted(spans):
        if s > reach:
            break
        reach = max(reach, e)
    return reach >= end


@dataclass
class _OpenWeight:
    """A packed projection's dense copy while a merge edits it."""

    dense: torch.Tensor  # [out, in]; rows neither unpacked nor written yet hold garbage
    written: list[tuple[int, int]] = field(default_factory=list)  # row spans set, until filled
    filled: bool = False  # every row holds its value (unpacked, or written)


class PackedEdits:
    """Dense copies of packed weights being edited (merging), packed again when pushed out or flushed.

    A merge writes a fused projection's parts one at a time (q, k, then v). Unpacking and packing
    the whole projection for each part made a swap about 5x slower than on dense weights (measured
    on the embedded model: 1.35 s against 0.26 s). Keeping the last few projections open packs
    each once per pass over an adapter's layers (they come grouped by layer), and bounds the extra
    memory to ``capacity`` projections' dense copies. Rows are unpacked only when read before
    being written: a swap between adapters that both adapt every part of a projection restores
    all its rows from the checkpoint first, so that projection is packed but never unpacked.

    Only writes open a copy (the engine thread, merging); a read of a projection that is not open
    unpacks it and changes nothing here, so other threads may read base weights (the analysis
    endpoints in unmerged mode) while the engine runs.
    """

    def __init__(self, capacity: int = 4) -> None:
        self.capacity = capacity
        self._open: dict[FusedLinear, _OpenWeight] = {}  # least recently written first

    def is_open(self, linear: FusedLinear) -> bool:
        return linear in self._open

    def read_rows(self, linear: FusedLinear, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of the projection's weight as it is with the writes so far."""
        entry = self._open.get(linear)
        if entry is None:
            return linear.unpack()[start:end]
        if not entry.filled and not _covers(entry.written, start, end):
            self._fill(linear, entry)
        return entry.dense[start:end]

    def write_rows(self, linear: FusedLinear, start: int, end: int, values: torch.Tensor) -> None:
        entry = self._open.pop(linear, None)
        if entry is None:
            entry = _OpenWeight(torch.empty(linear.out_features, linear.in_features, dtype=linear.dtype))
        self._open[linear] = entry
        while len(self._open) > self.capacity:
            self.close(next(iter(self._open)))
        entry.dense[start:end] = values
        if not entry.filled:
            entry.written.append((start, end))
            entry.filled = _covers(entry.written, 0, entry.dense.shape[0])

    def close(self, linear: FusedLinear) -> None:
        """Pack the projection's edited weight back (nothing to do when it is not open)."""
        entry = self._open.pop(linear, None)
        if entry is None:
            return
        if not entry.filled:
            self._fill(linear, entry)
        linear._packed = linear.layout.pack(entry.dense)

    @staticmethod
    def _fill(linear: FusedLinear, entry: _OpenWeight) -> None:
        """Unpack the weight under the rows written so far (they keep their new values)."""
        current = linear.unpack()
        for s, e in entry.written:
            current[s:e] = entry.dense[s:e]
        entry.dense, entry.written, entry.filled = current, [], True


class FusedLinear:
    """``y = x @ W.T (+ b)`` for parts fused along the output, each part with its own adapter slots.

    ``layout``: keep W only in this packed layout (CPU float32; see ``layouts.py``), else dense;
    ``edits`` (packed only): where merges stage their writes, shared by a model's projections.
    ``quantization`` (int8, int4): keep W only quantized (``quantized.py``; the float matrix is
    not kept); a ``QuantizedWeight`` (GGUF blocks) is kept as given. Quantized weights are
    read-only: adapters are added unmerged, and a merge target refuses writes.
    """

    def __init__(
        self,
        weight: torch.Tensor | QuantizedWeight,  # [sum of part sizes, in]
        bias: torch.Tensor | None,
        parts: list[tuple[str, int]],  # (PEFT module name, output size) in output order
        ctx: LoraBatchContext,
        backend: LoraBackend,
        layout: PackedLayout | None = None,
        edits: PackedEdits | None = None,
        quantization: Quantization = "none",
    ) -> None:
        self._quant: QuantizedWeight | None = None
        if not isinstance(weight, torch.Tensor):
            self._quant = weight
        elif quantization != "none":
            self._quant = quantized.quantize(weight, quantization)
        if self._quant is not None:  # its own kernels: the float32 layouts do not apply
            layout, self.dtype, self.device = None, torch.float32, torch.device("cpu")
            self._dense: torch.Tensor | None = None
        else:
            assert isinstance(weight, torch.Tensor)
            self._dense = None if layout else weight
            self.dtype, self.device = weight.dtype, weight.device
        self.layout = layout
        self._packed: torch.Tensor | None = layout.pack(weight) if layout else None  # type: ignore[arg-type]
        self._edits = (edits or PackedEdits(capacity=1)) if layout else None
        self.bias = bias
        self.ctx = ctx
        self.in_features = in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.spans: list[tuple[int, int]] = []
        self.banks: dict[str, LoraSlotBank] = {}
        start = 0
        for name, size in parts:
            self.spans.append((start, start + size))
            self.banks[name] = LoraSlotBank(in_features, size, self.dtype, self.device)
            start += size
        assert start == weight.shape[0], "parts must cover the fused output"
        # the backend sees the whole projection: grouped forms share one gather and one matmul down
        self.lora = LoraProjection(list(self.banks.values()), self.spans, backend)

    @property
    def weight(self) -> torch.Tensor:
        """The fused weight [out, in]: the live tensor when dense; when packed, a copy read back
        (or the copy a merge is editing). Read-only: ``write_rows`` changes it."""
        return self.read_rows(0, self.out_features)

    def read_rows(self, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of the weight (dense: a view of the live tensor; packed: of the copy
        a merge is editing, or unpacked now; quantized: dequantized now)."""
        if self._quant is not None:
            return self._quant.dequantize(start, end)
        if self._dense is not None:
            return self._dense[start:end]
        assert self._edits is not None
        return self._edits.read_rows(self, start, end)

    def weight_targets(self) -> dict[str, WeightTarget]:
        """Each part's rows of the fused weight, for the merge manager (dense: views written in
        place; packed: read and written back through the packed layout)."""
        spans = zip(self.banks, self.spans, strict=True)
        if self._quant is not None:
            return {name: QuantizedRows(self, s, e, f"{name}.weight") for name, (s, e) in spans}
        if self._dense is None:
            return {name: PackedRows(self, s, e, f"{name}.weight") for name, (s, e) in spans}
        return {name: WeightTarget(self._dense[s:e], f"{name}.weight") for name, (s, e) in spans}

    def unpack(self) -> torch.Tensor:
        """The packed weight as a new dense [out, in] tensor (packed layouts only)."""
        assert self.layout is not None and self._packed is not None
        return self.layout.unpack(self._packed, self.out_features)

    def blocked_weight(self) -> torch.Tensor | None:
        """The packed weight the forward reads (pending merge writes packed first), for kernels
        that take the whole layer (``fused_cpu.py``); None unless packed."""
        if self._packed is None:
            return None
        if self._edits is not None and self._edits.is_open(self):
            self.flush()
        return self._packed

    def quantized_weight(self) -> QuantizedWeight | None:
        """The quantized weight the forward reads (``fused_cpu.parts_table``); None unless quantized."""
        return self._quant

    def write_rows(self, start: int, end: int, values: torch.Tensor) -> None:
        """Set rows [start, end) of the weight. Packed: written into a dense copy that ``flush`` (or
        the next forward, or a write to other projections) packs again."""
        if self._quant is not None:
            raise QuantizedWriteError(
                "quantized base weights cannot be merged into: adapters on a quantized base run unmerged"
            )
        if self._dense is not None:
            self._dense[start:end] = values
            return
        assert self._edits is not None
        self._edits.write_rows(self, start, end, values)

    def flush(self) -> None:
        """Make written rows the weights the forward reads (packed: pack the edited copy)."""
        if self._edits is not None:
            self._edits.close(self)

    def _project(
        self, x: torch.Tensor, out: torch.Tensor | None = None, accumulate: bool = False
    ) -> torch.Tensor:
        """x: [N, in] -> x @ W.T (+ b): [N, out_features], without adapters; packed only: into
        ``out`` when given, added to it with ``accumulate``."""
        if self._quant is not None:
            y = quantized.linear(x, self._quant)
            return y if self.bias is None else y.add_(self.bias)
        if self.layout is not None and self._packed is not None:
            if self._edits is not None and self._edits.is_open(self):
                self.flush()  # never read a packed weight older than its writes
            return self.layout.linear(x, self._packed, self.out_features, self.bias, out, accumulate)
        return F.linear(x, self._dense, self.bias)

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x: [N, in] -> [N, out_features], into ``out`` when given (a reused buffer)."""
        if self._quant is not None:
            y = quantized.linear(x, self._quant, out=out)
            if self.bias is not None:
                y.add_(self.bias)
        elif self._dense is None:
            y = self._project(x, out)
        elif out is None:
            y = self._project(x)
        elif self.bias is None:
            y = torch.mm(x, self._dense.t(), out=out)
        else:
            y = torch.addmm(self.bias, x, self._dense.t(), out=out)
        self._add_lora(x, y)
        return y

    def add_to(self, x: torch.Tensor, residual: torch.Tensor) -> None:
        """``residual += x @ W.T (+ b)`` plus the rows' adapters, in place."""
        if self.lora.has_dora(self.ctx):  # DoRA scales the base output itself: computed apart
            residual.add_(self(x))
            return
        if self._quant is not None:
            quantized.linear(x, self._quant, out=residual, accumulate=True)
            if self.bias is not None:
                residual.add_(self.bias)
        elif self._dense is None:
            self._project(x, residual, accumulate=True)
        else:
            residual.addmm_(x, self._dense.t())
            if self.bias is not None:
                residual.add_(self.bias)
        self._add_lora(x, residual)

    def apply(
        self,
        x: torch.Tensor,
        lora: tuple[LoraPart | None, ...] | None,
        row_slots: torch.Tensor,
        row_scale: torch.Tensor,
    ) -> torch.Tensor:
        """x: [N, in] -> [N, out_features] with each part's adapters from ``lora`` (one entry per
        part, None where no row's adapter adapts it): the graph-friendly form of ``__call__``."""
        y = self._project(x)
        if lora is not None:
            for (s, e), part in zip(self.spans, lora, strict=True):
                if part is not None:
                    y[:, s:e] += part.delta(x, row_slots, row_scale)
        return y

    def step_lora(self, ctx: LoraBatchContext, form: LoraBackend) -> tuple[LoraPart | None, ...]:
        """This step's adapters per part (see ``apply``), in the graph form's ``step_part`` layout."""
        return tuple(form.step_part(bank, ctx) for bank in self.banks.values())

    def _add_lora(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """y: the base output x @ W.T (+ b), [N, out]: the rows' adapters added in place."""
        if self.ctx.row_slots is not None:
            if self.lora.has_dora(self.ctx):
                self.lora.add_magnitude(y, self.bias, self.ctx)
            self.lora.add_delta(x.view(x.shape[0], 1, x.shape[1]), y, self.ctx)  # rows are tokens: [N, 1, in]


class PackedRows(WeightTarget):
    """Rows [start, end) of a fused projection kept in a packed layout (``layouts.py``), as a merge target:
    ``read`` unpacks (exact), ``write`` packs again; there is no live dense tensor."""

    def __init__(self, linear: FusedLinear, start: int, end: int, checkpoint_key: str) -> None:
        self._linear = linear
        self._start, self._end = start, end
        self.live = None
        self.checkpoint_key = checkpoint_key
        self.fan_in_fan_out = False
        self.shape = torch.Size((end - start, linear.in_features))
        self.dtype, self.device = linear.dtype, linear.device

    def read(self) -> torch.Tensor:
        return self._linear.read_rows(self._start, self._end)

    def write(self, values: torch.Tensor) -> None:
        self._linear.write_rows(self._start, self._end, values)

    def flush(self) -> None:
        self._linear.flush()


class QuantizedWriteError(RuntimeError):
    """A merge tried to write into quantized weights (merged mode is refused with quantization)."""


class QuantizedRows(PackedRows):
    """Rows [start, end) of a quantized fused projection, as a weight target: ``read``
    dequantizes (what analysis and compose read); ``write`` raises ``QuantizedWriteError`` (BA
    cannot be folded into quantized blocks exactly, so merged mode is refused with quantization)."""
