"""The LoRA backend interface: how a batch's adapter updates are computed, one class per way.

Every backend computes the same thing for each row i of a projection's input x::

    y[i, part columns] += row_scale[i] · scale[slot[i]] · B[slot[i]] (A[slot[i]] x[i])

from the slot storage (``slots.py``) and the batch metadata (``batch.py``). What differs is the
arithmetic (which rows meet which factors), the layout it reads the factors in, and where it runs.
A backend says what the rest of the engine must know about it:

* ``serves(device, dtype)``: whether it runs on this device and dtype here (a compiled kernel may
  not build);
* ``wants_sorted_rows``: whether it is fastest with decode rows sorted by slot (the native runner
  sorts them then);
* ``graph_safe``: whether every tensor it reads keeps its address while slot contents change, so
  a captured CUDA graph may replay it (its ``step_part`` gives the graph's arguments);
* ``plan(batch)``: what it derives once per batch composition (cached here on the batch's
  ``version``); ``bind(projection)``: what it keeps per projection (factor layouts);
  ``add_delta(projection, x, y, batch)``: the update, in place.

Backends are chosen once per runner (``choose.py``: ``--lora-backend``; ``auto`` picks by device
and dtype). To add one (a Triton or CUDA kernel), subclass :class:`LoraBackend` in a module of
this package and add it to ``BACKENDS`` in ``choose.py``; the tests parametrised over
``tests/lora_backends.py`` then hold it to the dense reference and to PEFT.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from server.engine.lora.batch import LoraBatchContext
from server.engine.lora.slots import LoraSlotBank, StagedPart


class LoraBackend(ABC):
    """One way to add a batch's adapter updates to a projection's output (see the module docstring)."""

    name: ClassVar[str]
    wants_sorted_rows: ClassVar[bool] = False
    graph_safe: ClassVar[bool] = False

    def __init__(self, device: torch.device | str, dtype: torch.dtype) -> None:
        self.device, self.dtype = torch.device(device), dtype
        self._plan_version = -1
        self._plan: Any = None

    @classmethod
    def serves(cls, device: torch.device | str, dtype: torch.dtype) -> bool:
        """Whether this backend runs on ``device`` in ``dtype`` here (default: anywhere)."""
        return True

    def plan(self, batch: LoraBatchContext) -> Any:
        """``prepare(batch)``, made once per batch composition and shared by every projection."""
        if batch.version != self._plan_version:
            self._plan = self.prepare(batch)
            self._plan_version = batch.version
        return self._plan

    def prepare(self, batch: LoraBatchContext) -> Any:
        """What the backend derives from a new batch composition (default: nothing)."""
        return None

    def bind(self, projection: LoraProjection) -> Any:
        """State the backend keeps for one projection (``projection.state``; default: none)."""
        return None

    def prebuild(self, projection: LoraProjection, parts: Mapping[int, StagedPart]) -> Any | None:
        """A slot's layout built from an adapter's staged ``parts`` (by part index) on the slot
        loader's thread, before the install (default: None, nothing prebuilt); see :meth:`adopt`."""
        return None

    def adopt(self, projection: LoraProjection, slot: int, layout: Any) -> None:
        """Take ``layout`` (:meth:`prebuild`) as ``slot``'s, on the engine thread right after its
        install, instead of building it at the slot's first use. Only called with what this
        backend's own :meth:`prebuild` returned, so the default (which prebuilds nothing) never is."""
        raise NotImplementedError(f"the {self.name} LoRA backend prebuilds no slot layout")

    @abstractmethod
    def add_delta(
        self, projection: LoraProjection, x: torch.Tensor, y: torch.Tensor, batch: LoraBatchContext
    ) -> None:
        """x: [B, T, k]; y: [B*T, D] the projection's output (possibly a column slice of a wider
        one): each part's update added into its columns in place. Called only when some row of
        the batch has an adapter (``batch.row_slots`` is set)."""

    def step_part(self, bank: LoraSlotBank, batch: LoraBatchContext) -> Any:
        """One bank's adapters for a graph-compiled or captured decode step (``native/graphed.py``):
        an object with ``delta(x, row_slots, row_scale) -> [N, out]`` made of tensors only, or
        None when no row's adapter adapts the bank. Backends without a graph form refuse."""
        raise NotImplementedError(f"the {self.name} LoRA backend has no graph form")


class LoraProjection:
    """The adapters of one projection: its output parts' slot banks, the columns each writes, and
    the backend that applies them. A plain linear layer is one part over all its columns; a fused
    projection (q/k/v) one part per PEFT module."""

    def __init__(
        self, banks: Sequence[LoraSlotBank], spans: Sequence[tuple[int, int]], backend: LoraBackend
    ) -> None:
        self.banks = list(banks)
        self.spans = list(spans)  # part p writes output columns [spans[p][0], spans[p][1])
        self.backend = backend
        self.state = backend.bind(self)
        for bank in self.banks:
            bank.reader = self  # the slot loader finds the projection of a bank it stages for

    def prebuild(self, parts: Mapping[int, StagedPart]) -> Any | None:
        """See :meth:`LoraBackend.prebuild` (``SlotLayoutReader``)."""
        return self.backend.prebuild(self, parts)

    def adopt(self, slot: int, layout: Any) -> None:
        """See :meth:`LoraBackend.adopt` (``SlotLayoutReader``)."""
        self.backend.adopt(self, slot, layout)

    def applies_to(self, batch: LoraBatchContext) -> bool:
        """True when some row of the batch reads an adapter that adapts one of the parts."""
        return any(bank.applies_to(batch) for bank in self.banks)

    def add_delta(self, x: torch.Tensor, y: torch.Tensor, batch: LoraBatchContext) -> None:
        """x: [B, T, k]; y: [B*T, D], written in place (nothing when no row has an adapter)."""
        if batch.row_slots is not None:
            self.backend.add_delta(self, x, y, batch)

    @property
    def dora_slots(self) -> set[int]:
        """The slots holding a DoRA adapter in some part."""
        return set().union(*(bank.dora_slots for bank in self.banks))

    def has_dora(self, batch: LoraBatchContext) -> bool:
        """True when some row of the batch reads a DoRA adapter of one of the parts."""
        return batch.row_slots is not None and any(
            s in bank.dora_slots for bank in self.banks for s in batch.active_slots
        )

    def add_magnitude(
        self, y: torch.Tensor, bias: torch.Tensor | None, batch: LoraBatchContext, seq: int = 1
    ) -> None:
        """DoRA's magnitude term on the base output, before :meth:`add_delta`:
        ``y[i, part] += t_i · (g − 1) ⊙ (y[i, part] − b[part])`` for the rows of DoRA adapters
        (``server/engine/dora.py``; the slots' B already hold g ⊙ B, so the backends' update is
        g ⊙ s·B A x). y: [B*T, D] the base output with its bias ``b`` [D] (or None); T = ``seq``."""
        for bank, (start, end) in zip(self.banks, self.spans, strict=True):
            rows = bank.dora_rows(batch)  # [B, d]
            if rows is None:
                continue
            part = y[:, start:end].view(-1, seq, end - start)  # [B, T, d]
            base = part if bias is None else part - bias[start:end]
            part.add_(base * rows[:, None, :].to(part.dtype))
