"""Building blocks of the native Llama-family model: RMSNorm, RoPE, fused projections with LoRA.

A fused projection computes several PEFT modules' outputs with one matrix:

    x ──► W_qkv x  = [ q | k | v ]            W_qkv = cat(W_q, W_k, W_v)  [q+2kv, hidden]
    │                  ▲   ▲   ▲
    └──► bank_q ───────┘   │   │   each part has its own stacked adapter slots (LoraSlotBank),
    └──► bank_k ───────────┘   │   adds s·B(Ax) into its own column slice, and skips the batch
    └──► bank_v ───────────────┘   when none of its rows' adapters adapts that part

so an adapter that targets q and v only leaves k untouched, and each part is merged into its
own rows of the fused weight (``weight_views``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from server.engine.lora_linear import Kernel, LoraBatchContext, LoraSlotBank


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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [N, heads, head_dim], rotated by position (the rotate-half convention) into a new tensor.

    Hugging Face's ``x·cos + rotate_half(x)·sin`` per half (the two halves of cos and sin are equal):
    ``out₁ = x₁·c − x₂·s``, ``out₂ = x₂·c + x₁·s``; no concatenated temporary.
    """
    half = x.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]  # [N, 1, D/2]
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty_like(x)
    out1, out2 = out[..., :half], out[..., half:]
    torch.mul(x1, c, out=out1)
    out1.addcmul_(x2, s, value=-1)
    torch.mul(x2, c, out=out2)
    out2.addcmul_(x1, s)
    return out


def rope_rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rope` as plain tensor expressions (no ``out=`` writes into views), which
    ``torch.compile`` and CUDA graph capture take as they are."""
    half = x.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


class SegmentedLora(NamedTuple):
    """One part's adapters in a step, segmented form: ``delta = ((x @ A_t) * mask) @ B_t`` where
    ``mask[i, j]`` is row i's scale if column j belongs to row i's slot, else 0.

    The batch's active slots are concatenated along the rank (``LoraSlotBank.active_weights``),
    so the sizes change with the batch's adapters: for eager and ``torch.compile`` (dynamic) steps.
    The mask is computed from ``columns`` in the step (no tensor shared between parts: dynamo
    guards on inputs that alias).
    """

    A_t: torch.Tensor  # [in, L*r_max]
    B_t: torch.Tensor  # [L*r_max, out], scaled per slot
    columns: torch.Tensor  # [L*r_max] the slot each column belongs to


class GatheredLora(NamedTuple):
    """One part's adapters in a step, gathered form (Punica BGMV): every row reads its slot's factors.

    Every tensor keeps its address while the bank's slot stacks keep their shape (slots are
    written in place): for captured CUDA graphs.
    """

    A_stack: torch.Tensor  # [S, r_max, in]
    B_stack: torch.Tensor  # [S, out, r_max]
    scale: torch.Tensor  # [S] the slots' own scales


LoraPart = SegmentedLora | GatheredLora


def lora_delta(
    x: torch.Tensor, part: LoraPart, row_slots: torch.Tensor, row_scale: torch.Tensor
) -> torch.Tensor:
    """x: [N, in] -> [N, out], each row's ``row_scale · s · B (A x)`` (row_slots: [N], -1 for none)."""
    if isinstance(part, SegmentedLora):
        mask = (row_slots[:, None] == part.columns[None, :]).to(x.dtype) * row_scale[:, None].to(x.dtype)
        return (x @ part.A_t * mask) @ part.B_t
    present = (row_slots >= 0) & (row_slots < part.A_stack.shape[0])  # [N]
    slots = torch.where(present, row_slots, 0)
    scale = torch.where(present, part.scale[slots], 0) * row_scale.to(part.scale.dtype)  # [N]
    h = torch.bmm(x[:, None, :], part.A_stack[slots].transpose(1, 2))  # [N, 1, r_max]
    return torch.bmm(h, part.B_stack[slots].transpose(1, 2))[:, 0] * scale[:, None]  # [N, out]


class FusedLinear:
    """``y = x @ W.T (+ b)`` for parts fused along the output, each part with its own adapter slots."""

    def __init__(
        self,
        weight: torch.Tensor,  # [sum of part sizes, in]
        bias: torch.Tensor | None,
        parts: list[tuple[str, int]],  # (PEFT module name, output size) in output order
        ctx: LoraBatchContext,
        kernel: Kernel,
    ) -> None:
        self.weight = weight
        self.bias = bias
        self.ctx = ctx
        in_features = weight.shape[1]
        self.spans: list[tuple[int, int]] = []
        self.banks: dict[str, LoraSlotBank] = {}
        start = 0
        for name, size in parts:
            self.spans.append((start, start + size))
            self.banks[name] = LoraSlotBank(in_features, size, weight.dtype, weight.device, kernel)
            start += size
        assert start == weight.shape[0], "parts must cover the fused output"
        self._bank_spans = list(zip(self.banks.values(), self.spans, strict=True))
        self._null_parts: dict[str, SegmentedLora] = {}

    def weight_views(self) -> dict[str, torch.Tensor]:
        """Each part's rows of the fused weight (views: merging writes through)."""
        return {name: self.weight[s:e] for name, (s, e) in zip(self.banks, self.spans, strict=True)}

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x: [N, in] -> [N, out_features], written into ``out`` when given (a reused buffer)."""
        if out is None:
            y = F.linear(x, self.weight, self.bias)
        elif self.bias is None:
            y = torch.mm(x, self.weight.t(), out=out)
        else:
            y = torch.addmm(self.bias, x, self.weight.t(), out=out)
        self._add_lora(x, y)
        return y

    def add_to(self, x: torch.Tensor, residual: torch.Tensor) -> None:
        """``residual += x @ W.T (+ b)`` plus the rows' adapters, in place (no output tensor)."""
        residual.addmm_(x, self.weight.t())
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
        y = F.linear(x, self.weight, self.bias)
        if lora is not None:
            for (s, e), part in zip(self.spans, lora, strict=True):
                if part is not None:
                    y[:, s:e] += lora_delta(x, part, row_slots, row_scale)
        return y

    def step_lora(self, ctx: LoraBatchContext, gathered: bool) -> tuple[LoraPart | None, ...]:
        """This step's adapters per part (see ``apply``).

        Gathered: None for a part no row's adapter adapts (the layout is part of a CUDA graph's
        key). Segmented: such a part gets a rank-2 zero stand-in instead, so that every batch with
        adapters has the same structure and one compiled graph (sizes >= 2 are symbolic) serves all.
        """
        parts: list[LoraPart | None] = []
        for name, bank in self.banks.items():
            if gathered:
                applies = bank.applies_to(ctx)
                parts.append(GatheredLora(bank.A_stack, bank.B_stack, bank.scale) if applies else None)
            elif bank.applies_to(ctx):
                parts.append(SegmentedLora(*bank.active_weights(ctx)[1:]))
            else:
                parts.append(self._null_part(name, bank))
        return tuple(parts)

    def _null_part(self, name: str, bank: LoraSlotBank) -> SegmentedLora:
        """A segmented part that adds zero (its columns belong to no slot); one per part, cached."""
        part = self._null_parts.get(name)
        if part is None:
            zeros = bank.A_stack.new_zeros
            columns = torch.full((2,), -2, dtype=torch.long, device=bank.A_stack.device)
            part = self._null_parts[name] = SegmentedLora(
                zeros(bank.in_features, 2), zeros(2, bank.out_features), columns
            )
        return part

    def _add_lora(self, x: torch.Tensor, y: torch.Tensor) -> None:
        ctx = self.ctx
        if ctx.row_slots is not None:
            x3 = x.view(x.shape[0], 1, x.shape[1])  # rows are tokens: [N, 1, in]
            for bank, (s, e) in self._bank_spans:
                if bank.applies_to(ctx):
                    bank.add_delta(x3, y[:, s:e], ctx)
