"""``compiled-cpu``: the grouped update compiled from C, for float32 on the CPU (``sgmv_cpu.py``).

The same arithmetic as ``grouped`` in one call per projection (four rows per tile, on PyTorch's
OpenMP threads) instead of a handful of small PyTorch ops, each paying a fixed dispatch cost at
decode sizes: +12% LoRA overhead at 16 rows where the PyTorch ops measured +21% (same run). It
reads any row order at the same cost, so rows stay as they are. It serves only where the library
builds and passes its check against the dense formula (a C compiler, AVX2/FMA).
"""

from __future__ import annotations

import torch

from server.engine import sgmv_cpu
from server.engine.lora.backend import LoraBackend, LoraProjection
from server.engine.lora.batch import LoraBatchContext
from server.engine.lora.grouped import GroupedFactors


class _Groups:
    """The batch's row groups as the C kernel reads them, one per tokens-per-row count."""

    def __init__(self, batch: LoraBatchContext) -> None:
        self._batch = batch
        self._by_seq: dict[int, sgmv_cpu.GroupsPlan] = {}

    def for_seq(self, seq: int) -> sgmv_cpu.GroupsPlan:
        plan = self._by_seq.get(seq)
        if plan is None:
            groups = self._batch.row_groups()
            plan = self._by_seq[seq] = sgmv_cpu.GroupsPlan(groups.members, groups.member_weights, seq)
        return plan


class _Factors(GroupedFactors):
    """The grouped factors, and the same packed as the C kernel reads them."""

    plan: sgmv_cpu.FactorsPlan | None = None

    def update(self, slots: tuple[int, ...]) -> bool:
        if super().update(slots):
            self.plan = (
                None
                if self.A is None
                else sgmv_cpu.FactorsPlan(
                    self.A,
                    [
                        (p.start, p.end - p.start, p.rank_start, p.rank_end - p.rank_start, p.B)
                        for *_, parts in self.runs
                        for p in parts
                    ],
                )
            )
            return True
        return False


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

    def add_delta(
        self, projection: LoraProjection, x: torch.Tensor, y: torch.Tensor, batch: LoraBatchContext
    ) -> None:
        factors: _Factors = projection.state
        factors.update(batch.active_slots)
        if factors.plan is None:
            return
        batch_size, seq, k = x.shape
        groups: _Groups = self.plan(batch)
        self.kernel.add(x.reshape(batch_size * seq, k), y, groups.for_seq(seq), factors.plan)
