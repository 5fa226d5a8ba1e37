"""How generation routes resolve adapter ids: the :class:`AdapterLookup` protocol.

The server uses :class:`adapters.store.AdapterStore` (persistent, tiered).

The engine resolves an id to a :class:`LoraAdapter` once, when a request is submitted, so a
later replace or delete never changes a request that is already running.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from adapters.peft_format import LoraAdapter


@runtime_checkable
class AdapterLookup(Protocol):
    def get(self, adapter_id: str) -> LoraAdapter | None:
        """The current version of ``adapter_id``, or None when unknown."""

    def ids(self) -> list[str]:
        """Every known id, sorted."""

    def track(self, owner: object, adapter: LoraAdapter) -> None:
        """``owner`` (a request) uses ``adapter`` until it is garbage collected."""
