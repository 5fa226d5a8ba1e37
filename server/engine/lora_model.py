"""Which adapter sits in which memory slot of a runner's LoRA layers."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from adapters.peft_format import LoraAdapter, LoraLayerWeights
from server.engine.dora import dora_factor
from server.engine.lora.vocab import VocabAdapters
from server.engine.runner import LoraTarget


@dataclass
class _Resident:
    adapter: LoraAdapter
    slot: int
    in_use: int = 0  # running rows that read this slot


class AdapterSlots:
    """Which adapter sits in which slot of the LoRA layers, with LRU eviction.

    An adapter used by a running row (``acquire`` without ``release``) is never evicted.
    Owned by the engine thread: not thread-safe by design.
    """

    def __init__(
        self,
        layers: Mapping[str, LoraTarget],
        capacity: int,
        on_change: Callable[[], None] = lambda: None,
        base_weight: Callable[[str], torch.Tensor] | None = None,
        vocab: VocabAdapters | None = None,
    ) -> None:
        """``on_change`` runs after slot contents change (the runner drops cached batch data).
        ``base_weight(name)``: the pristine base weight of a layer (``MergeManager.original_weight``,
        [out, in]), which a DoRA adapter's factor needs; without it DoRA adapters are refused.
        ``vocab``: where adapters' own embedding and head go (the runner's ``vocab``)."""
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.layers = layers
        self.base_weight = base_weight
        self.vocab = vocab
        # DoRA factors g per adapter version (layer name -> [out]): computed once, reused on reloads
        self._dora_factors: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self.on_change = on_change
        self.capacity = capacity
        self._resident: OrderedDict[str, _Resident] = OrderedDict()  # LRU order: oldest first
        self.loads = 0
        self.evictions = 0

    def __contains__(self, key: str) -> bool:
        return key in self._resident

    @property
    def resident_keys(self) -> list[str]:
        return list(self._resident)

    @property
    def in_use(self) -> int:
        """Running rows holding a slot (each row counts once): 0 whenever the engine is idle."""
        return sum(r.in_use for r in list(self._resident.values()))  # list(): read from other threads

    def can_acquire(self, key: str) -> bool:
        """True when the adapter is resident or a slot is free or evictable."""
        if key in self._resident or len(self._resident) < self.capacity:
            return True
        return any(r.in_use == 0 for r in self._resident.values())

    def acquire(self, adapter: LoraAdapter) -> int:
        """Make ``adapter`` resident (loading or evicting as needed), count one user, return its slot.

        Slots are keyed by ``adapter.key`` (id and version), so a replaced adapter's old version
        keeps serving the rows that started on it while new rows get the new one.
        """
        resident = self._resident.get(adapter.key)
        if resident is None:
            slot = self._free_slot()
            self._load(adapter, slot)
            resident = self._resident[adapter.key]
        self._resident.move_to_end(adapter.key)
        resident.in_use += 1
        return resident.slot

    def release(self, key: str) -> None:
        resident = self._resident.get(key)
        if resident is not None and resident.in_use > 0:
            resident.in_use -= 1

    def evict(self, key: str) -> bool:
        """Drop an adapter version from memory if no running row uses it; True when it was dropped."""
        resident = self._resident.get(key)
        if resident is None or resident.in_use > 0:
            return False
        self._unload(key)
        return True

    def _free_slot(self) -> int:
        used = {r.slot for r in self._resident.values()}
        if len(used) < self.capacity:
            return min(set(range(self.capacity)) - used)
        for key, resident in self._resident.items():  # oldest first
            if resident.in_use == 0:
                slot = resident.slot
                self._unload(key)
                self.evictions += 1
                return slot
        # the engine admits a row only when can_acquire() says a slot is free or evictable
        raise AssertionError(f"all {self.capacity} adapter slots are in use by running requests")

    def _load(self, adapter: LoraAdapter, slot: int) -> None:
        try:
            for name, weights in adapter.layers.items():
                factor = self._dora_factor(adapter.key, name, weights) if weights.is_dora else None
                self.layers[name].set_slot(slot, weights.A, weights.B, weights.scale, factor)
            if adapter.vocab:
                if self.vocab is None:
                    raise ValueError("this runner serves no adapter's own embedding or head")
                for name, layer in adapter.vocab.items():
                    self.vocab.set_slot(slot, name, layer)
        except Exception:  # a half-written slot would leak into the next adapter loaded there
            for name in adapter.layers:
                self.layers[name].clear_slot(slot)
            if self.vocab is not None:
                self.vocab.clear_slot(slot)
            raise
        self._resident[adapter.key] = _Resident(adapter=adapter, slot=slot)
        self.on_change()
        self.loads += 1

    def _dora_factor(self, key: str, name: str, weights: LoraLayerWeights) -> torch.Tensor:
        """g = m / ‖W + s·B·A‖_row of one DoRA layer ([out]), from the pristine base weight."""
        if self.base_weight is None:
            raise ValueError("DoRA adapters need the base weights (AdapterSlots(base_weight=...))")
        factors = self._dora_factors.setdefault(key, {})
        self._dora_factors.move_to_end(key)
        while len(self._dora_factors) > 4 * self.capacity:
            self._dora_factors.popitem(last=False)
        if name not in factors:
            factors[name] = dora_factor(self.base_weight(name), weights)  # original_weight: [out, in]
        return factors[name]

    def _unload(self, key: str) -> None:
        resident = self._resident.pop(key)
        for name in resident.adapter.layers:
            self.layers[name].clear_slot(resident.slot)
        if self.vocab is not None:
            self.vocab.clear_slot(resident.slot)
        self.on_change()
