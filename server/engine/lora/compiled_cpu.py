"""``compiled-cpu``: the grouped update compiled from C, for float32 on the CPU (``sgmv_cpu.py``).

The same arithmetic as ``grouped`` in one call per projection (four rows per tile, on PyTorch's
OpenMP threads) instead of a handful of small PyTorch ops, each paying a fixed dispatch cost at
decode sizes: +12% LoRA overhead at 16 rows where the PyTorch ops measured +21% (same run). It
reads any row order at the same cost, so rows stay as they are. Each slot's factors are packed once,
when its contents change (``slot_layouts.py``), each at its own rank; a batch hands the kernel
each group's slot, so a new batch composition copies no factor. It serves only where the library
builds and passes its check against the dense formula (a C compiler, AVX2/FMA).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from server.engine import sgmv_cpu
from server.engine.lora.backend import LoraBackend, LoraProjection
from server.engine.lora.batch import LoraBatchContext
from server.engine.lora.slot_layouts import SlotFactors, SlotLayouts
from server.engine.lora.slots import StagedPart


class _Groups:
    """The batch's row groups as the C kernel reads them, one per tokens-per-row count."""

    def __init__(self, batch: LoraBatchContext) -> None:
        self._batch = batch
        self._by_seq: dict[int, sgmv_cpu.GroupsPlan] = {}

    def for_seq(self, seq: int) -> sgmv_cpu.GroupsPlan:
        plan = self._by_seq.get(seq)
        if plan is None:
            groups = self._batch.row_groups()
            plan = sgmv_cpu.GroupsPlan(groups.slots, groups.members, groups.member_weights, seq)
            self._by_seq[seq] = plan
        return plan


def _pack(num_parts: int) -> Callable[[SlotFactors], sgmv_cpu.SlotPlan]:
    def pack(factors: SlotFactors) -> sgmv_cpu.SlotPlan:
        parts = [(p.index, p.rank_start, p.B) for p in factors.parts]
        return sgmv_cpu.SlotPlan(factors.A, parts, num_parts)

    return pack


class _Factors:
    """One projection's slots as the C kernel reads them, each packed when its contents change."""

    def __init__(self, projection: LoraProjection) -> None:
        k = projection.banks[0].in_features
        self.table = sgmv_cpu.FactorsPlan(k, projection.spans)
        self.layouts = SlotLayouts(projection.banks, _pack(len(projection.banks)))
        self._current: dict[int, sgmv_cpu.SlotPlan | None] = {}

    def update(self, slots: tuple[int, ...]) -> bool:
        """Point the table at the current layout of every slot in ``slots``; False when none of
        them adapts the projection."""
        applies = False
        for slot in slots:
            plan = self.layouts.get(slot)
            if slot >= self.table.num_slots or self._current.get(slot) is not plan:
                self.table.set_slot(slot, plan)
                self._current[slot] = plan
            applies = applies or plan is not None
        return applies


class CompiledCpuBackend(LoraBackend):
    name = "compiled-cpu"

    def __init__(self, device: torch.device | str, dtype: torch.dtype) -> None:
        super().__init__(device, dtype)
        kernel = sgmv_cpu.load_for(device, dtype)
        if kernel is None:
            raise ValueError(
                "the compiled-cpu LoRA backend needs the CPU, float32 and a C compiler with AVX2/FMA "
                "(it could not be built here): use --lora-backend grouped"
            )
        self.kernel = kernel

    @classmethod
    def serves(cls, device: torch.device | str, dtype: torch.dtype) -> bool:
        return sgmv_cpu.load_for(device, dtype) is not None

    def prepare(self, batch: LoraBatchContext) -> _Groups:
        return _Groups(batch)

    def bind(self, projection: LoraProjection) -> _Factors:
        return _Factors(projection)

    def prebuild(
        self, projection: LoraProjection, parts: Mapping[int, StagedPart]
    ) -> sgmv_cpu.SlotPlan | None:
        """The slot's packed plan straight from the staged factors (the slot loader's thread): the
        plan :func:`slot_factors` and :class:`sgmv_cpu.SlotPlan` would build from the banks at the
        slot's first step, entry for entry (B times the scale as the bank holds it, float32)."""
        staged = [
            (index, part.A[: part.rank], part.B[:, : part.rank], torch.tensor(part.scale, dtype=part.B.dtype))
            for index, part in sorted(parts.items())
            if part.rank > 0
        ]
        if not staged or any(
            t.dtype != torch.float32 or t.device.type != "cpu" for p in staged for t in p[1:3]
        ):
            return None  # nothing adapted here, or not what the kernel reads: built at first use
        return sgmv_cpu.SlotPlan.from_staged(staged, len(projection.banks))

    def adopt(self, projection: LoraProjection, slot: int, layout: sgmv_cpu.SlotPlan | None) -> None:
        factors: _Factors = projection.state
        factors.layouts.adopt(slot, layout)

    def add_delta(
        self, projection: LoraProjection, x: torch.Tensor, y: torch.Tensor, batch: LoraBatchContext
    ) -> None:
        factors: _Factors = projection.state
        if not factors.update(batch.active_slots):
            return
        batch_size, seq, k = x.shape
        groups: _Groups = self.plan(batch)
        self.kernel.add(x.reshape(batch_size * seq, k), y, groups.for_seq(seq), factors.table)
