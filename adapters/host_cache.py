"""The host-memory tier: parsed adapters kept in RAM, least recently used first out, within a byte budget.

Tiers: disk (the store's folders) -> host memory (this cache) -> device slots (the engine's
``AdapterSlots``). Besides the bounded LRU, every adapter handed out is also remembered
weakly: while anything still holds it (a running request, an engine slot, a prefetch), a
lookup finds it without reading the disk again, and without counting it against the budget.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

from adapters.peft_format import LoraAdapter


def adapter_nbytes(adapter: LoraAdapter) -> int:
    """The adapter's tensors: factors, DoRA magnitudes, its own embedding and head (modules_to_save)."""
    tensors = [t for w in adapter.layers.values() for t in (w.A, w.B, w.magnitude) if t is not None]
    tensors += [t for v in adapter.vocab.values() for t in v.tensors()]
    return sum(t.numel() * t.element_size() for t in tensors)


class HostCache:
    """Thread-safe LRU of :class:`LoraAdapter` by ``adapter.key``; holds at most ``max_bytes``.

    The adapter put last is always kept, even when it alone exceeds the budget (it is about
    to be used).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lru: OrderedDict[str, tuple[LoraAdapter, int]] = OrderedDict()  # oldest first
        self._alive: weakref.WeakValueDictionary[str, LoraAdapter] = weakref.WeakValueDictionary()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._lru

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._lru)

    def get(self, key: str, *, count: bool = True) -> LoraAdapter | None:
        """The adapter if in memory (LRU or held elsewhere); ``count=False`` leaves hits/misses alone."""
        with self._lock:
            entry = self._lru.get(key)
            adapter = entry[0] if entry is not None else self._alive.get(key)
            if adapter is None:
                self.misses += count
                return None
            if entry is None:  # still held elsewhere: bring it back into the LRU
                self._insert(key, adapter)
            else:
                self._lru.move_to_end(key)
            self.hits += count
            return adapter

    def put(self, adapter: LoraAdapter) -> None:
        with self._lock:
            self._alive[adapter.key] = adapter
            self._insert(adapter.key, adapter)

    def drop(self, key: str) -> None:
        """Forget a version (deleted or replaced); holders keep their reference."""
        with self._lock:
            entry = self._lru.pop(key, None)
            if entry is not None:
                self._bytes -= entry[1]
            self._alive.pop(key, None)

    def _insert(self, key: str, adapter: LoraAdapter) -> None:
        old = self._lru.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        size = adapter_nbytes(adapter)
        self._lru[key] = (adapter, size)
        self._bytes += size
        while self._bytes > self.max_bytes and len(self._lru) > 1:
            _, (_, evicted_size) = self._lru.popitem(last=False)
            self._bytes -= evicted_size
