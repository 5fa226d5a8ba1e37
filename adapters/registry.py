"""Adapters the server can serve, by id, held in host memory.

The engine resolves an id to a :class:`LoraAdapter` once, when a request is submitted, so a
later replace or delete never changes a request that is already running.
"""

from __future__ import annotations

import threading

from adapters.peft_format import LoraAdapter


class AdapterRegistry:
    def __init__(self) -> None:
        self._adapters: dict[str, LoraAdapter] = {}
        self._lock = threading.Lock()

    def add(self, adapter: LoraAdapter) -> None:
        with self._lock:
            self._adapters[adapter.adapter_id] = adapter

    def get(self, adapter_id: str) -> LoraAdapter | None:
        with self._lock:
            return self._adapters.get(adapter_id)

    def remove(self, adapter_id: str) -> LoraAdapter | None:
        with self._lock:
            return self._adapters.pop(adapter_id, None)

    def ids(self) -> list[str]:
        with self._lock:
            return sorted(self._adapters)

    def __contains__(self, adapter_id: str) -> bool:
        with self._lock:
            return adapter_id in self._adapters
