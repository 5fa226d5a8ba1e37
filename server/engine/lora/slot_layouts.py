"""Each slot's factors kept in the layout a backend reads, so a new batch composition gathers nothing.

A grouped backend computes, for the rows of each slot in the batch, ``h = x A_s`` and
``y[part] += h[ranks of part] (s·B)_s``. Gathering the batch's slots' factors into one tensor per
batch composition (the old way: L slots × rank × k copied, scaled, transposed and concatenated for
every projection whenever a row joined or left) cost more than the base model's linear layers on
churning many-adapter traffic. Here each slot's factors are laid out once, when the slot's contents
change (``LoraSlotBank.slot_contents``), and the kernel is handed each group's slot (punica/S-LoRA
style: per-segment slot indices into the per-slot layouts).

Each slot keeps its own rank (``LoraSlotBank.slot_ranks``): a rank-8 adapter's rows do rank-8 work
even when the bank is padded to rank 64 for another slot.

A slot filled by the slot loader gets its layout built on the loader's thread from the staged
factors (``LoraSlotBank.reader``, ``LoraBackend.prebuild``) and handed over at install
(:meth:`SlotLayouts.adopt`): the engine thread packs nothing at the slot's first use (it did, 40-50
ms per rank-64 q/k/v/o adapter on the embedded model, stalling every running row).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, NamedTuple, TypeVar

import torch

from server.engine.lora.slots import LoraSlotBank


class SlotPart(NamedTuple):
    index: int  # the projection's part p (its bank and output columns)
    rank_start: int  # its columns [rank_start, rank_start + rank) of h = x A
    rank: int
    B: torch.Tensor  # [r_p, d_p], scaled by the slot's scale


class SlotFactors(NamedTuple):
    """One slot's factors for one projection, every part it adapts."""

    A: torch.Tensor  # [k, R]: the parts' A transposed, concatenated along the rank (R = Σ r_p)
    parts: tuple[SlotPart, ...]


def slot_factors(banks: list[LoraSlotBank], slot: int) -> SlotFactors | None:
    """``slot``'s factors over the parts ``banks`` (None when it adapts none of them), each part at
    the slot's own rank. A DoRA slot's B already holds g ⊙ B."""
    downs: list[torch.Tensor] = []
    parts: list[SlotPart] = []
    rank = 0
    for p, bank in enumerate(banks):
        if slot not in bank.occupied:
            continue
        r = bank.slot_ranks[slot]
        if r == 0:
            continue
        downs.append(bank.A_stack[slot, :r].t())  # [k, r]
        B = bank.B_stack[slot, :, :r].t() * bank.scale[slot]  # [r, d]
        parts.append(SlotPart(p, rank, r, B.contiguous()))
        rank += r
    if not parts:
        return None
    return SlotFactors(torch.cat(downs, dim=1).contiguous(), tuple(parts))


T = TypeVar("T")


class SlotLayouts(Generic[T]):
    """One projection's slots, each laid out by ``make`` from its :class:`SlotFactors` and rebuilt
    only when that slot's contents change in some part's bank."""

    def __init__(self, banks: list[LoraSlotBank], make: Callable[[SlotFactors], T]) -> None:
        self._banks = banks
        self._make = make
        self._layouts: dict[int, tuple[tuple[int | None, ...], T | None]] = {}
        self._versions: tuple[int, ...] = ()  # the banks' versions when `_checked` was last cleared
        self._checked: set[int] = set()  # slots known current at those versions
        self.rebuilt = 0  # slot layouts built here so far, not counting empty ones (tests, profiling)

    def get(self, slot: int) -> T | None:
        """``slot``'s layout, None when it adapts no part of the projection."""
        versions = tuple(bank.version for bank in self._banks)
        if versions != self._versions:
            self._versions, self._checked = versions, set()
        if slot in self._checked:
            return self._layouts[slot][1]
        key = tuple(bank.slot_contents.get(slot) for bank in self._banks)
        cached = self._layouts.get(slot)
        if cached is None or cached[0] != key:
            factors = slot_factors(self._banks, slot)
            cached = self._layouts[slot] = (key, None if factors is None else self._make(factors))
            self.rebuilt += factors is not None
        self._checked.add(slot)
        return cached[1]

    def adopt(self, slot: int, layout: T | None) -> None:
        """Take ``layout``, built elsewhere from the factors just installed in ``slot``, as the
        slot's layout for its current contents (engine thread, right after the install)."""
        self._layouts[slot] = (tuple(bank.slot_contents.get(slot) for bank in self._banks), layout)
        self._checked.discard(slot)
