"""FastAPI dependencies: the objects the lifespan put on ``app.state``."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

from fastapi import Depends, Request

from adapters.registry import AdapterRepository
from server.api.errors import ApiError
from server.config import Settings
from server.engine.base_model import LoadedBase
from server.engine.engine import Engine


def get_engine(request: Request) -> Engine:
    engine = getattr(request.app.state, "engine", None)
    if engine is None or not engine.running:
        raise ApiError(503, "the model is still loading; retry in a few seconds.", "not_ready")
    return engine


def get_store(request: Request) -> AdapterRepository:
    return request.app.state.store


async def get_registry(request: Request) -> AdapterRepository:
    """The adapter store, with the adapter the JSON body names already in host memory.

    ``build_request`` resolves ids synchronously; reading a cold adapter from disk there would
    stall the event loop (and with it every stream). So the adapter named by the body
    (``parameters.adapter_id``, ``adapter_id`` or ``model``) is loaded here in a worker thread,
    and pinned on ``request.state`` until the request ends.
    """
    store = request.app.state.registry
    if (
        hasattr(store, "aget")
        and request.method == "POST"
        and "json" in request.headers.get("content-type", "")
    ):
        pinned = []
        for name in _named_adapters(await request.body()):
            if name in store:
                pinned.append(await _timed_aget(request, store, name))
        request.state.prefetched_adapters = pinned
    return store


async def _timed_aget(request: Request, store: AdapterRepository, name: str) -> Any:
    """``store.aget``, timing reads from disk into ``loraplex_adapter_load_seconds`` (cache hits are not loads)."""
    metrics = getattr(request.app.state, "metrics", None)
    cold = name in store and not store.is_cached(name)
    started = time.perf_counter()
    adapter = await store.aget(name)
    if cold and adapter is not None and metrics is not None:
        metrics.adapter_load_seconds.observe(time.perf_counter() - started)
    return adapter


def _named_adapters(body: bytes) -> list[str]:
    try:
        data: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return []
    if not isinstance(data, dict):
        return []
    params = data.get("parameters")
    candidates = [
        params.get("adapter_id") if isinstance(params, dict) else None,
        data.get("adapter_id"),
        data.get("model"),
    ]
    return list(dict.fromkeys(c for c in candidates if isinstance(c, str) and c))


def get_base(request: Request) -> LoadedBase:
    return request.app.state.base


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


EngineDep = Annotated[Engine, Depends(get_engine)]
RegistryDep = Annotated[AdapterRepository, Depends(get_registry)]
StoreDep = Annotated[AdapterRepository, Depends(get_store)]
BaseDep = Annotated[LoadedBase, Depends(get_base)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
