"""LoRA-aware linear layers: many adapters, one batch, the base weight untouched.

    x ──► base(x) = W x ─────────────────────────────────────────────────┐
    │                                                                    ▼
    └──► A[slot[i]] x_i ──► row_scale[i] · scale[slot[i]] · B[slot[i]] (·) ──► + ──► y_i

Each wrapped layer keeps the adapters that are resident in memory in stacked, rank-padded
slots (``A_stack: [S, r_max, k]``, ``B_stack: [S, d, r_max]``, ``scale: [S]``). A forward pass
reads the row → slot map from a :class:`LoraBatchContext` shared by every layer of the model;
slot ``-1`` is the bare base (no adapter). A row may also scale its adapter's update
(``adapter_scale``: 0 is the base, 1 the adapter) without a slot of its own: ``row_scale[i]``.

Two batched kernels compute the same thing:

* ``gather_bmm`` (Punica BGMV semantics, the portable reference):
  ``y[i] += row_scale[i] * scale[slot[i]] * (x[i] @ A[slot[i]].T) @ B[slot[i]].T``
* ``segmented`` (the default): the active slots' A are concatenated once per batch
  composition, so each layer costs one matmul down, one mask, one matmul up:
  ``h = x @ A_act.T;  h *= row_mask;  y += h @ B_act_scaled.T``
  with ``row_mask[i, j] = row_scale[i]`` where column j belongs to row i's slot, else 0.

Both are checked against the dense ``W + s·B·A`` in the tests. A padded rank costs compute,
not correctness: padded rows of A and columns of B are zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

BASE_SLOT = -1
Kernel = Literal["segmented", "gather_bmm"]


@dataclass
class LoraBatchContext:
    """What the current forward pass needs to know about adapters, shared by all LoRA layers.

    The engine calls :meth:`set_rows` before each forward; layers read it, never write it.
    """

    row_slots: torch.Tensor | None = None  # [B] int64, BASE_SLOT for rows without adapter
    row_scale: torch.Tensor | None = None  # [B] float32 per-row adapter scale; None: every row 1
    active_slots: tuple[int, ...] = ()  # distinct slots >= 0 used by the batch, sorted
    # (slots, r_max) -> [B, L*r_max]; layers that some adapters skip use a subset of the slots
    row_mask_cache: dict[tuple[tuple[int, ...], int], torch.Tensor] = field(default_factory=dict)
    _rows_key: tuple | None = None

    def set_rows(
        self, row_slots: list[int], device: torch.device | str, row_scales: list[float] | None = None
    ) -> None:
        """Describe the next batch: ``row_slots[i]`` is the slot of row i (``BASE_SLOT``: none),
        ``row_scales[i]`` the factor on its adapter's update (default 1).

        Decode steps repeat the same rows; then nothing is rebuilt.
        """
        scales = None
        if row_scales is not None and any(
            s != 1.0 for s, slot in zip(row_scales, row_slots, strict=True) if slot != BASE_SLOT
        ):
            scales = tuple(
                1.0 if slot == BASE_SLOT else float(s) for s, slot in zip(row_scales, row_slots, strict=True)
            )
        key = (tuple(row_slots), scales)
        if key == self._rows_key:
            return
        self._rows_key = key
        active = tuple(sorted({s for s in row_slots if s != BASE_SLOT}))
        self.active_slots = active
        self.row_slots = torch.tensor(row_slots, dtype=torch.long, device=device) if active else None
        self.row_scale = (
            torch.tensor(scales, dtype=torch.float32, device=device)
            if active and scales is not None
            else None
        )
        self.row_mask_cache = {}

    def invalidate(self) -> None:
        """Forget the cached row mask (call after slot contents change)."""
        self._rows_key = None

    def row_mask(self, slots: tuple[int, ...], r_max: int, dtype: torch.dtype) -> torch.Tensor:
        """``[B, L*r_max]``: ``row_scale[i]`` (1 by default) where column block l (slot ``slots[l]``)
        belongs to row i's slot, else 0."""
        mask = self.row_mask_cache.get((slots, r_max))
        if mask is None or mask.dtype != dtype:
            assert self.row_slots is not None
            columns = torch.tensor(slots, device=self.row_slots.device)
            onehot = (self.row_slots[:, None] == columns[None, :]).to(dtype)  # [B, L]
            if self.row_scale is not None:
                onehot.mul_(self.row_scale[:, None].to(dtype))
            mask = onehot.repeat_interleave(r_max, dim=1)  # [B, L*r_max]
            self.row_mask_cache[(slots, r_max)] = mask
        return mask


class LoraSlotBank:
    """One adaptable output's stacked, rank-padded adapter slots and the kernels that apply them.

    A plain linear layer owns one bank; a fused projection (q/k/v in one matrix) owns one bank per
    part and lets each add into its own column slice of the fused output. A bank is the
    ``LoraTarget`` of its PEFT module name.
    """

    fan_in_fan_out = False  # banks store A: [r, in] and B: [out, r] whatever the base layout

    def __init__(
        self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device, kernel: Kernel
    ) -> None:
        self.in_features = in_features
        self.out_features = out_features
        self._dtype, self._device = dtype, device
        # the kernel is bound once: no string comparison in the forward
        self.add_delta = self._add_delta_gather_bmm if kernel == "gather_bmm" else self._add_delta_segmented
        # Stacked slots; allocated lazily and grown when an adapter needs more room.
        self.A_stack = torch.zeros(0, 0, in_features, dtype=dtype, device=device)  # [S, r_max, k]
        self.B_stack = torch.zeros(0, out_features, 0, dtype=dtype, device=device)  # [S, d, r_max]
        self.scale = torch.zeros(0, dtype=dtype, device=device)  # [S]
        self.occupied: set[int] = set()
        # (batch slots, this bank's slots, A_act^T, (scale·B)_act^T, slot of each rank column)
        self._active_cache: (
            tuple[tuple[int, ...], tuple[int, ...], torch.Tensor, torch.Tensor, torch.Tensor] | None
        ) = None

    # ---------------------------------------------------------------- slot management

    @property
    def r_max(self) -> int:
        return int(self.A_stack.shape[1])

    def _grow(self, slots: int, r_max: int) -> None:
        old_s, old_r = self.A_stack.shape[0], self.A_stack.shape[1]
        if slots <= old_s and r_max <= old_r:
            return
        new_s, new_r = max(slots, old_s), max(r_max, old_r)
        A = self.A_stack.new_zeros(new_s, new_r, self.in_features)
        B = self.B_stack.new_zeros(new_s, self.out_features, new_r)
        scale = self.scale.new_zeros(new_s)
        A[:old_s, :old_r] = self.A_stack
        B[:old_s, :, :old_r] = self.B_stack
        scale[:old_s] = self.scale
        self.A_stack, self.B_stack, self.scale = A, B, scale

    def set_slot(self, slot: int, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
        """Place one adapter's factors (A: [r, k], B: [d, r]) in ``slot``."""
        r = A.shape[0]
        self._grow(slot + 1, r)
        self.A_stack[slot].zero_()
        self.B_stack[slot].zero_()
        self.A_stack[slot, :r] = A.to(self._device, self._dtype)
        self.B_stack[slot, :, :r] = B.to(self._device, self._dtype)
        self.scale[slot] = scale
        self.occupied.add(slot)
        self._active_cache = None

    def clear_slot(self, slot: int) -> None:
        if slot in self.occupied:
            self.A_stack[slot].zero_()
            self.B_stack[slot].zero_()
            self.scale[slot] = 0
            self.occupied.discard(slot)
            self._active_cache = None

    def delta_weight(self, slot: int) -> torch.Tensor:
        """Dense ``scale · B @ A`` for one slot in float32: [d, k] (tests and merging only)."""
        A = self.A_stack[slot].float()
        B = self.B_stack[slot].float()
        return float(self.scale[slot]) * (B @ A)

    def applies_to(self, ctx: LoraBatchContext) -> bool:
        """True when some row of the batch reads an adapter that adapts this output."""
        return ctx.row_slots is not None and any(s in self.occupied for s in ctx.active_slots)

    # ---------------------------------------------------------------- kernels

    def _add_delta_gather_bmm(self, x: torch.Tensor, y: torch.Tensor, ctx: LoraBatchContext) -> None:
        """Semantics: ``y[i] += row_scale[i] * scale[slot[i]] * (x[i] @ A[slot[i]].T) @ B[slot[i]].T``.

        x: [B, T, k]; y: [B*T, d], possibly a column slice of a wider output.
        """
        assert ctx.row_slots is not None
        # base rows, and rows whose adapter skips this output, read slot 0 with scale 0
        present = (ctx.row_slots >= 0) & (ctx.row_slots < self.A_stack.shape[0])
        slots = torch.where(present, ctx.row_slots, 0)  # [B]
        scale = torch.where(present, self.scale[slots], 0)  # [B]
        if ctx.row_scale is not None:
            scale = scale * ctx.row_scale.to(scale.dtype)
        A = self.A_stack[slots]  # [B, r, k]
        B = self.B_stack[slots]  # [B, d, r]
        h = torch.bmm(x, A.transpose(1, 2))  # [B, T, r]
        delta = torch.bmm(h, B.transpose(1, 2)) * scale[:, None, None]  # [B, T, d]
        y.add_(delta.reshape(y.shape))

    def active_weights(
        self, ctx: LoraBatchContext
    ) -> tuple[tuple[int, ...], torch.Tensor, torch.Tensor, torch.Tensor]:
        """This bank's slots among the batch's, with their A and scaled B concatenated along rank,
        and the slot each rank column belongs to: (slots, A_t [k, L*r_max], B_t [L*r_max, d],
        columns [L*r_max]).

        Cached until the batch's slots or a slot's content change.
        """
        cached = self._active_cache
        if cached is None or cached[0] != ctx.active_slots:
            slots = tuple(s for s in ctx.active_slots if s in self.occupied)
            idx = torch.tensor(slots, device=self.A_stack.device)
            A_t = self.A_stack[idx].reshape(-1, self.in_features).t().contiguous()  # [k, L*r_max]
            B = (self.B_stack[idx] * self.scale[idx][:, None, None]).permute(1, 0, 2)  # [d, L, r_max]
            B_t = B.reshape(self.out_features, -1).t().contiguous()  # [L*r_max, d]
            columns = idx.repeat_interleave(self.r_max)  # [L*r_max]
            cached = self._active_cache = (ctx.active_slots, slots, A_t, B_t, columns)
        return cached[1:]

    def _add_delta_segmented(self, x: torch.Tensor, y: torch.Tensor, ctx: LoraBatchContext) -> None:
        """Semantics: ``h = x @ A_act.T; h *= row_mask (row_scale where the slot is the row's); y += h @ (scale·B)_act.T``.

        x: [B, T, k]; y: [B*T, d] (a view: written in place, no temporaries beyond ``h``).
        """
        slots, A_t, B_t, _ = self.active_weights(ctx)
        batch, seq = x.shape[0], x.shape[1]
        h = torch.mm(x.reshape(batch * seq, -1), A_t)  # [B*T, L*r_max]
        h.view(batch, seq, -1).mul_(ctx.row_mask(slots, self.r_max, h.dtype)[:, None, :])
        y.addmm_(h, B_t)  # [B*T, d]


class LoraLinear(nn.Module):
    """Wraps a linear layer (``nn.Linear`` or GPT-2 ``Conv1D``) with stacked LoRA slots."""

    def __init__(
        self,
        base: nn.Module,
        in_features: int,
        out_features: int,
        ctx: LoraBatchContext,
        kernel: Kernel = "segmented",
    ) -> None:
        super().__init__()
        self.base = base
        self.in_features = in_features
        self.out_features = out_features
        self.fan_in_fan_out = bool(linear_shape(base)[2])  # type: ignore[index]
        self.ctx = ctx
        self.bank = LoraSlotBank(in_features, out_features, base.weight.dtype, base.weight.device, kernel)

    def set_slot(self, slot: int, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
        """Place one adapter's factors (A: [r, k], B: [d, r]) in ``slot``."""
        self.bank.set_slot(slot, A, B, scale)

    def clear_slot(self, slot: int) -> None:
        self.bank.clear_slot(slot)

    def delta_weight(self, slot: int) -> torch.Tensor:
        return self.bank.delta_weight(slot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [B, T, d], a fresh tensor: the delta is added in place
        if self.bank.applies_to(self.ctx):
            self.bank.add_delta(x, y.view(-1, self.out_features), self.ctx)
        return y


def linear_shape(module: nn.Module) -> tuple[int, int, bool] | None:
    """(in_features, out_features, fan_in_fan_out) for layers LoRA can wrap, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 Conv1D
        in_features, out_features = module.weight.shape
        return int(in_features), int(out_features), True
    return None
