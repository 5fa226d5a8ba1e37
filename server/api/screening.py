"""The screening of stored adapters (``adapters.screening``), for the routes that store or show one.

``POST /adapters``, ``POST /adapters/compose`` and ``POST /adapters/{id}/shrink`` answer 201 with
the adapter's summary plus ``coverage`` and ``warnings``; ``GET /adapters/{id}`` shows them too
(an adapter fetched from an adapter source is screened there). Results are kept per adapter
version (``id@version``), so a replaced adapter is screened anew. The σ_max(W) estimates need
the base weights (``engine.base_weights()``): without an engine (a cluster's store
deployment) the ``large_update`` check is left out.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from typing import Any

from fastapi import Request

from adapters.peft_format import LoraAdapter
from adapters.registry import AdapterRepository
from adapters.screening import BaseNormCache, screen

log = logging.getLogger(__name__)
MEMO_ENTRIES = 256


class ScreeningService:
    """Screenings by adapter key (LRU), and the base layers' σ_max estimates."""

    def __init__(self, store: AdapterRepository, norms: BaseNormCache | None) -> None:
        self.store = store
        self.norms = norms
        self._memo: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def screening(self, adapter: LoraAdapter) -> dict[str, Any]:
        """``{"coverage", "warnings"}`` of this version (blocking: call it off the event loop)."""
        with self._lock:
            found = self._memo.get(adapter.key)
            if found is not None:
                self._memo.move_to_end(adapter.key)
                return found
        shapes = self.store.base_shapes or {}
        result = screen(adapter, shapes, self.norms)
        for warning in result["warnings"]:
            log.warning("adapter %s: %s", adapter.key, warning["message"])
        with self._lock:
            self._memo[adapter.key] = result
            while len(self._memo) > MEMO_ENTRIES:
                self._memo.popitem(last=False)
        return result


def get_screening(request: Request) -> ScreeningService:
    state = request.app.state
    service = getattr(state, "screening", None)
    if service is None:
        service = ScreeningService(state.store, None)
        state.screening = service
    if service.norms is None:  # the engine (and its pristine base weights) may come after the store
        engine = getattr(state, "engine", None)
        if engine is not None:
            service.norms = BaseNormCache(engine.base_weights().weight)
    return service


async def screening_of(request: Request, store: AdapterRepository, adapter_id: str) -> dict[str, Any]:
    """The current version's screening; empty when the adapter went meanwhile (deleted or replaced)."""
    adapter = await store.aget(adapter_id)
    if adapter is None:
        return {}
    return await asyncio.to_thread(get_screening(request).screening, adapter)
