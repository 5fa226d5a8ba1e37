"""Which adapter sits in which memory slot of a runner's LoRA layers."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from adapters.peft_format import LoraAdapter
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
        self, layers: Mapping[str, LoraTarget], capacity: int, on_change: Callable[[], None] = lambda: None
    ) -> None:
        """``on_change`` runs after slot contents change (the runner drops cached batch data)."""
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.layers = layers
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
                self.layers[name].set_slot(slot, weights.A, weights.B, weights.scale)
        except Exception:  # a half-written slot would leak into the next adapter loaded there
            for name in adapter.layers:
                self.layers[name].clear_slot(slot)
            raise
        self._resident[adapter.key] = _Resident(adapter=adapter, slot=slot)
        self.on_change()
        self.loads += 1

    def _unload(self, key: str) -> None:
        resident = self._resident.pop(key)
        for name in resident.adapter.layers:
            self.layers[name].clear_slot(resident.slot)
        self.on_change()
