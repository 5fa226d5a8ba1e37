"""What the server asks of adapter storage: the :class:`AdapterLookup` and :class:`AdapterRepository`
protocols. :class:`adapters.store.AdapterStore` implements both; routers depend on these, not on it.

The engine resolves an id to a :class:`LoraAdapter` once, when a request is submitted, so a
later replace or delete never changes a request that is already running.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from adapters.peft_format import BaseLinearShape, LoraAdapter

if TYPE_CHECKING:
    from adapters.archive import AdapterFiles
    from adapters.index import AdapterRecord


@runtime_checkable
class AdapterLookup(Protocol):
    """How generation routes resolve adapter ids."""

    def get(self, adapter_id: str) -> LoraAdapter | None:
        """The current version of ``adapter_id``, or None when unknown."""

    def ids(self) -> list[str]:
        """Every known id, sorted."""

    def track(self, owner: object, adapter: LoraAdapter) -> None:
        """``owner`` (a request) uses ``adapter`` until it is garbage collected."""


class AdapterRepository(AdapterLookup, Protocol):
    """Everything the HTTP layer does with stored adapters."""

    base_shapes: Mapping[str, BaseLinearShape] | None
    """The base model's linear layers from :meth:`bind_base` (None before it)."""

    @property
    def ready(self) -> bool:
        """True once :meth:`bind_base` gave the base model's shapes (uploads need them)."""

    def bind_base(self, base_shapes: Mapping[str, BaseLinearShape], max_rank: int) -> None: ...

    def __contains__(self, adapter_id: object) -> bool: ...

    def record(self, adapter_id: str) -> AdapterRecord | None: ...

    def records(self) -> list[AdapterRecord]: ...

    async def aget(self, adapter_id: str) -> LoraAdapter | None:
        """:meth:`get` that never blocks the event loop."""

    def is_cached(self, adapter_id: str) -> bool:
        """Whether the current version is parsed in host memory (a lookup reads no storage)."""

    def read_files(self, adapter_id: str) -> tuple[AdapterRecord, AdapterFiles] | None:
        """The current version's files, checked against its sha256."""

    def check_can_put(self, adapter_id: str, *, replace: bool) -> None: ...

    def put(
        self, adapter_id: str, files: AdapterFiles, *, replace: bool = False, keep_identical: bool = False
    ) -> AdapterRecord: ...

    def delete(self, adapter_id: str) -> AdapterRecord: ...

    def close(self) -> None: ...
