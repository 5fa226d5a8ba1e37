"""FastAPI dependencies: the objects the lifespan put on ``app.state``."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

from fastapi import Depends, Request

from adapters.compose import MAX_SOURCES
from adapters.registry import AdapterRepository
from server.api.adapter_sources import fetch_named, requested_source
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
    stall the event loop (and with it every stream). So the adapters named by the body
    (``parameters.adapter_id``, ``adapter_id`` or ``model``, and the sources of
    ``parameters.merged_adapters``) are loaded here in a worker thread, and pinned on
    ``request.state`` until the request ends. Ids that are not stored are fetched from the
    adapter sources first (``server.api.adapter_sources``).
    """
    store = request.app.state.registry
    if (
        hasattr(store, "aget")
        and request.method == "POST"
        and "json" in request.headers.get("content-type", "")
    ):
        body = await request.body()
        names = _named_adapters(body)
        await fetch_named(request, names, requested_source(_json_object(body)))  # --adapter-source
        pinned = []
        for name in names:
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
    """Every adapter id a JSON body names: ``parameters.adapter_id``, ``adapter_id``, ``model``,
    then the sources of ``parameters.merged_adapters`` (a composition needs them all)."""
    data = _json_object(body)
    if data is None:
        return []
    params = data.get("parameters")
    candidates = [
        params.get("adapter_id") if isinstance(params, dict) else None,
        data.get("adapter_id"),
        data.get("model"),
        *_merged_ids(data),
    ]
    return list(dict.fromkeys(c for c in candidates if isinstance(c, str) and c))


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # validation answers these bodies
        return None
    return data if isinstance(data, dict) else None


def _merged_adapters(data: dict[str, Any]) -> dict[str, Any] | None:
    """The body's ``parameters.merged_adapters`` object, if it has one (not validated here)."""
    params = data.get("parameters")
    merged = params.get("merged_adapters") if isinstance(params, dict) else None
    return merged if isinstance(merged, dict) else None


def _merged_ids(data: dict[str, Any]) -> list[str]:
    """The composition's source ids; at most ``MAX_SOURCES`` (a longer list is a 422 anyway, and
    this runs before validation: it must not make a request pin or fetch unboundedly many)."""
    merged = _merged_adapters(data)
    ids = merged.get("ids") if merged is not None else None
    if not isinstance(ids, list):
        return []
    return [i for i in ids[:MAX_SOURCES] if isinstance(i, str) and i]


def get_base(request: Request) -> LoadedBase:
    return request.app.state.base


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


EngineDep = Annotated[Engine, Depends(get_engine)]
RegistryDep = Annotated[AdapterRepository, Depends(get_registry)]
StoreDep = Annotated[AdapterRepository, Depends(get_store)]
BaseDep = Annotated[LoadedBase, Depends(get_base)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
