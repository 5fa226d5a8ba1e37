"""Adapter slot storage: one adaptable output's resident adapters, stacked and rank-padded.

No kernel is chosen here: a :class:`LoraSlotBank` holds the factors, and a backend
(``backend.py``) reads them in whatever layout it needs.

Loading an adapter is split so that the engine thread does only the last, cheap part
(``server/engine/slot_loader.py`` runs the rest on its own thread):

* :meth:`LoraSlotBank.stage` (any thread): the factors cast to the bank's dtype, moved to its
  device and zero-padded to its rank, ready to be copied as they lie;
* :meth:`LoraSlotBank.grown` (any thread): when the adapter needs more slots or a higher rank
  than the bank holds, the bigger stacks built from a snapshot of the current ones;
* :meth:`LoraSlotBank.install` (the engine thread): swap in the grown stacks (a pointer swap,
  when no slot changed since the snapshot) and copy the staged factors into the slot.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol

import torch

from server.engine.lora.batch import BASE_SLOT, LoraBatchContext

__all__ = ["BASE_SLOT", "GrownStacks", "LoraSlotBank", "SlotLayoutReader", "StagedPart"]

_slot_contents = itertools.count(1)  # numbers each slot content ever installed, in every bank


class GrownStacks(NamedTuple):
    """A bank's stacks rebuilt bigger off the engine thread, from its contents at ``version``."""

    A_stack: torch.Tensor  # [S', r', k]
    B_stack: torch.Tensor  # [S', d, r']
    scale: torch.Tensor  # [S']
    version: int  # the bank's version when the snapshot was taken: stale once it changed


class StagedPart(NamedTuple):
    """One bank's part of an adapter as staged for a slot (``LoraSlotBank.stage``), before install."""

    A: torch.Tensor  # [r', k] in the bank's dtype and device; rows past ``rank`` are padding
    B: torch.Tensor  # [d, r'] (a DoRA layer's g ⊙ B)
    scale: float
    rank: int  # the adapter's own rank r <= r'


class SlotLayoutReader(Protocol):
    """What reads a bank's slots in a layout of its own (a ``LoraProjection``, ``backend.py``): the
    slot loader has it lay out a staged adapter off the engine thread (``prebuild``), and the
    install hands the result over (``adopt``), so the engine thread builds no layout at first use."""

    banks: list[LoraSlotBank]

    def prebuild(self, parts: Mapping[int, StagedPart]) -> Any | None:
        """The layout of an adapter's staged ``parts`` (by part index), or None (nothing to build)."""

    def adopt(self, slot: int, layout: Any) -> None:
        """Use ``layout`` (from :meth:`prebuild`) for ``slot``, just installed from those parts."""


class LoraSlotBank:
    """One adaptable output's stacked, rank-padded adapter slots.

    A plain linear layer owns one bank; a fused projection (q/k/v in one matrix) owns one bank per
    part, each adding into its own column slice of the fused output. A bank is the ``LoraTarget``
    of its PEFT module name. ``version`` changes whenever a slot's content does: backends key the
    layouts they derive from the slots on it.
    """

    fan_in_fan_out = False  # banks store A: [r, in] and B: [out, r] whatever the base layout

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device) -> None:
        self.in_features = in_features
        self.out_features = out_features
        self._dtype, self._device = dtype, device
        self.version = 0
        # Stacked slots; allocated lazily and grown when an adapter needs more room.
        self.A_stack = torch.zeros(0, 0, in_features, dtype=dtype, device=device)  # [S, r_max, k]
        self.B_stack = torch.zeros(0, out_features, 0, dtype=dtype, device=device)  # [S, d, r_max]
        self.scale = torch.zeros(0, dtype=dtype, device=device)  # [S]
        self.occupied: set[int] = set()
        # What each occupied slot holds, by a number new at every install: backends that keep a
        # layout per slot (``slot_layouts.py``) rebuild a slot's only when its number changes.
        self.slot_contents: dict[int, int] = {}
        self.slot_ranks: dict[int, int] = {}  # each occupied slot's own rank (its stacks pad past it)
        # DoRA: g − 1 per slot and output feature (0 for plain LoRA slots); None until a DoRA
        # adapter is placed. Its slots' B_stack holds g ⊙ B (see server/engine/dora.py).
        self.magnitude_stack: torch.Tensor | None = None  # [S, d]
        self.dora_slots: set[int] = set()
        self.reader: SlotLayoutReader | None = None  # the projection reading this bank (set by it)

    @property
    def r_max(self) -> int:
        return int(self.A_stack.shape[1])

    @property
    def num_slots(self) -> int:
        return int(self.A_stack.shape[0])

    def _bigger(self, slots: int, r_max: int) -> tuple[int, int] | None:
        """The stacks' shape (slots, rank) once they hold ``slots`` slots of rank ``r_max``, or None
        when they already do. The slot count at least doubles, so a bank filling up one slot at a
        time is reallocated a handful of times, not once per slot."""
        old_s, old_r = self.num_slots, self.r_max
        if slots <= old_s and r_max <= old_r:
            return None
        return (max(slots, 2 * old_s) if slots > old_s else old_s), max(r_max, old_r)

    def _build_grown(self, new_s: int, new_r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Read from another thread, the three stacks may straddle a swap on the engine thread: each
        # is copied by its own shape, and the caller's version check discards such a mixed result.
        A_old, B_old, scale_old = self.A_stack, self.B_stack, self.scale
        A = A_old.new_zeros(new_s, new_r, self.in_features)  # [S', r', k]
        B = B_old.new_zeros(new_s, self.out_features, new_r)  # [S', d, r']
        scale = scale_old.new_zeros(new_s)  # [S']
        s_a, r_a = min(A_old.shape[0], new_s), min(A_old.shape[1], new_r)
        s_b, r_b = min(B_old.shape[0], new_s), min(B_old.shape[2], new_r)
        s_s = min(scale_old.shape[0], new_s)
        A[:s_a, :r_a] = A_old[:s_a, :r_a]
        B[:s_b, :, :r_b] = B_old[:s_b, :, :r_b]
        scale[:s_s] = scale_old[:s_s]
        return A, B, scale

    def _grow(self, slots: int, r_max: int, limit: int | None = None) -> None:
        shape = self._bigger(slots, r_max)
        if shape is not None:
            new_s = shape[0] if limit is None else max(slots, min(shape[0], limit))
            self.A_stack, self.B_stack, self.scale = self._build_grown(new_s, shape[1])

    def grown(self, slots: int, r_max: int, limit: int) -> GrownStacks | None:
        """Stacks holding at least ``slots`` slots (at most ``limit``: the slot capacity) of rank
        ``r_max``, built from the current ones without changing them (any thread), or None when the
        current ones are big enough. :meth:`install` swaps them in if no slot changed meanwhile."""
        shape = self._bigger(slots, r_max)
        if shape is None:
            return None
        version = self.version  # read before the copy: a write during it makes the result stale
        new_s = max(slots, min(shape[0], limit))
        return GrownStacks(*self._build_grown(new_s, shape[1]), version)

    def stage(
        self, A: torch.Tensor, B: torch.Tensor, dora_factor: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A: [r, k], B: [d, r] in the bank's dtype on its device, zero-padded to the bank's rank
        (when r is below it), as :meth:`install` copies them: (A [r', k], B [d, r']). Any thread.
        A DoRA adapter's factor g ([d], ``server/engine/dora.py``) is folded in: B becomes g ⊙ B
        (in float32, then the serving dtype)."""
        r, r_pad = A.shape[0], max(A.shape[0], self.r_max)
        A_p = A.to(self._device, self._dtype)
        if dora_factor is None:
            B_p = B.to(self._device, self._dtype)
        else:
            g = dora_factor.to(self._device, torch.float32)
            B_p = (B.to(self._device, torch.float32) * g[:, None]).to(self._dtype)
        if r_pad > r:
            A_p = torch.cat([A_p, A_p.new_zeros(r_pad - r, self.in_features)])  # [r_pad, k]
            B_p = torch.cat([B_p, B_p.new_zeros(self.out_features, r_pad - r)], dim=1)  # [d, r_pad]
        return A_p.contiguous(), B_p.contiguous()

    def install(
        self,
        slot: int,
        A: torch.Tensor,
        B: torch.Tensor,
        scale: float,
        grown: GrownStacks | None = None,
        limit: int | None = None,
        dora_factor: torch.Tensor | None = None,
        rank: int | None = None,
    ) -> bool:
        """Place staged factors (:meth:`stage`; A: [r, k], B: [d, r]) in ``slot``: on the engine
        thread, the cheap part of a load. ``grown`` stacks are swapped in when still current; else
        the bank grows here (the slow path). True when no stacks were reallocated here. A DoRA
        adapter's B comes staged as g ⊙ B, and ``dora_factor`` g sets the slot's magnitude.
        ``rank``: the adapter's own rank, when A and B come padded past it (default: A's rows)."""
        swapped = grown is not None and grown.version == self.version
        if swapped and grown.A_stack.shape[0] > slot and grown.A_stack.shape[1] >= A.shape[0]:
            self.A_stack, self.B_stack, self.scale = grown.A_stack, grown.B_stack, grown.scale
        needs_growth = self._bigger(slot + 1, A.shape[0]) is not None
        self._grow(slot + 1, A.shape[0], limit)
        r = A.shape[0]
        self.A_stack[slot, :r].copy_(A)
        self.B_stack[slot, :, :r].copy_(B)
        if r < self.r_max:  # the bank grew after staging: zero the columns past the adapter's rank
            self.A_stack[slot, r:].zero_()
            self.B_stack[slot, :, r:].zero_()
        self.scale[slot] = scale
        self._set_magnitude(slot, dora_factor)
        self.occupied.add(slot)
        self.slot_contents[slot] = next(_slot_contents)
        self.slot_ranks[slot] = r if rank is None else min(rank, r)
        self.version += 1
        return not needs_growth

    def set_slot(
        self,
        slot: int,
        A: torch.Tensor,
        B: torch.Tensor,
        scale: float,
        dora_factor: torch.Tensor | None = None,
    ) -> None:
        """Place one adapter's factors (A: [r, k], B: [d, r]) in ``slot`` (stage and install at
        once); a DoRA adapter also gives its factor g = m / ‖W + s·B·A‖_row ([d])."""
        self._grow(slot + 1, A.shape[0])
        self.install(slot, *self.stage(A, B, dora_factor), scale, dora_factor=dora_factor, rank=A.shape[0])

    def _set_magnitude(self, slot: int, dora_factor: torch.Tensor | None) -> None:
        if dora_factor is None:
            if slot in self.dora_slots:
                assert self.magnitude_stack is not None
                self.magnitude_stack[slot].zero_()
                self.dora_slots.discard(slot)
            return
        stack = self.magnitude_stack
        if stack is None or stack.shape[0] <= slot:
            grown = torch.zeros(
                self.A_stack.shape[0], self.out_features, dtype=self._dtype, device=self._device
            )
            if stack is not None:
                grown[: stack.shape[0]] = stack
            self.magnitude_stack = stack = grown
        stack[slot] = (dora_factor.to(self._device, torch.float32) - 1).to(self._dtype)
        self.dora_slots.add(slot)

    def clear_slot(self, slot: int) -> None:
        if slot in self.occupied:
            self.A_stack[slot].zero_()
            self.B_stack[slot].zero_()
            self.scale[slot] = 0
            self._set_magnitude(slot, None)
            self.occupied.discard(slot)
            self.slot_contents.pop(slot, None)
            self.slot_ranks.pop(slot, None)
            self.version += 1

    def delta_weight(self, slot: int) -> torch.Tensor:
        """Dense ``scale · B @ A`` for one slot in float32: [d, k] (tests only; a DoRA slot's
        B holds g ⊙ B)."""
        A = self.A_stack[slot].float()
        B = self.B_stack[slot].float()
        return float(self.scale[slot]) * (B @ A)

    def active_factors(self, slots: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The factors of ``slots`` (all held here) concatenated along the rank: (A_t [k, L*r_max],
        (scale·B)_t [L*r_max, d], the slot of each rank column [L*r_max])."""
        idx = torch.tensor(slots, device=self.A_stack.device)
        A_t = self.A_stack[idx].reshape(-1, self.in_features).t().contiguous()  # [k, L*r_max]
        B = (self.B_stack[idx] * self.scale[idx][:, None, None]).permute(1, 0, 2)  # [d, L, r_max]
        B_t = B.reshape(self.out_features, -1).t().contiguous()  # [L*r_max, d]
        return A_t, B_t, idx.repeat_interleave(self.r_max)

    def dora_rows(self, batch: LoraBatchContext) -> torch.Tensor | None:
        """Each row's ``row_scale · (g − 1)`` for this output: [B, d], 0 on rows that are not of a
        DoRA adapter here; None when no row of the batch is."""
        if batch.row_slots is None or not any(s in self.dora_slots for s in batch.active_slots):
            return None
        stack = self.magnitude_stack
        assert stack is not None
        present = (batch.row_slots >= 0) & (batch.row_slots < stack.shape[0])  # [B]
        rows = stack[torch.where(present, batch.row_slots, 0)] * present[:, None].to(stack.dtype)  # [B, d]
        if batch.row_scale is not None:
            rows = rows * batch.row_scale[:, None].to(stack.dtype)
        return rows

    def applies_to(self, batch: LoraBatchContext) -> bool:
        """True when some row of the batch reads an adapter that adapts this output."""
        return batch.row_slots is not None and any(s in self.occupied for s in batch.active_slots)
