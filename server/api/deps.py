"""FastAPI dependencies: the objects the lifespan put on ``app.state``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request

from adapters.peft_format import LoraAdapter
from adapters.registry import AdapterRepository
from server.api.adapter_sources import fetch_named, requested_source
from server.api.errors import ApiError
from server.api.named_adapters import body_adapters, json_object, merged_adapters, requested_adapters
from server.api.security import principal_of
from server.api.tenancy import view_for
from server.config import Settings
from server.engine.base_model import LoadedBase
from server.engine.engine import Engine


def get_engine(request: Request) -> Engine:
    engine = getattr(request.app.state, "engine", None)
    if engine is None or not engine.running:
        raise ApiError(503, "the model is still loading; retry in a few seconds.", "not_ready")
    return engine


@dataclass
class AdapterScope:
    """The adapters one request names, resolved once: ``store`` is what the request may see, and
    ``held`` the adapters it names, read into host memory and pinned until the request ends."""

    store: AdapterRepository
    names: list[str] = field(default_factory=list)
    held: dict[str, LoraAdapter] = field(default_factory=dict)


async def get_adapter_scope(request: Request) -> AdapterScope:
    """The request's :class:`AdapterScope`, built once per request (FastAPI caches dependencies).

    ``build_request`` resolves ids synchronously; reading a cold adapter from disk there would
    stall the event loop (and with it every stream). So the adapters the request names
    (:func:`server.api.named_adapters.requested_adapters`: the JSON body's, the path's) are loaded
    here in a worker thread and held until the request ends. Ids that are not stored are fetched
    from the adapter sources first (``server.api.adapter_sources``).
    """
    store = view_for(request.app.state.registry, principal_of(request))  # the caller's namespace
    scope = AdapterScope(store)
    body = b""
    if request.method == "POST" and "json" in request.headers.get("content-type", ""):
        body = await request.body()
    scope.names = requested_adapters(request.url.path, request.query_params, body, request.method)
    if scope.names and hasattr(store, "aget"):
        data = json_object(body) if body else None
        await fetch_named(request, scope.names, requested_source(data))
        served = _generation_adapter(request, data)
        engine = getattr(request.app.state, "engine", None) if served is not None else None
        if not (isinstance(engine, Engine) and engine.running):
            engine = None
        for name in scope.names:
            if name in store:
                if engine is not None and name == served and not store.is_cached(name):
                    _expect(engine, store, name)
                adapter = await _timed_aget(request, store, name)
                if adapter is not None:
                    scope.held[name] = adapter
                    if engine is not None and name == served and adapter.key not in engine.slots:
                        engine.prefetch(adapter)  # its slot loads while the prompt is tokenized
    return scope


def _generation_adapter(request: Request, data: dict[str, Any] | None) -> str | None:
    """The adapter a generation request's JSON body asks to be served with (``parameters.adapter_id``,
    ``adapter_id`` or ``model``), or None: not such a request (GET, the ``/adapters`` routes), or a
    composition (``merged_adapters``: its sources are not what is served)."""
    if request.method != "POST" or data is None or request.url.path.startswith("/adapters"):
        return None
    if merged_adapters(data) is not None:
        return None
    names = body_adapters(data)
    return names[0] if names else None


def _expect(engine: Engine, store: AdapterRepository, name: str) -> None:
    """Tell the engine which version a request is about to need (``Engine.expect``), before that
    version is read from disk: an auto-mode engine unmerges another adapter meanwhile."""
    record = store.record(name)
    if record is not None:
        engine.expect(record.version)


async def get_registry(scope: Annotated[AdapterScope, Depends(get_adapter_scope)]) -> AdapterRepository:
    """The adapter store as this request sees it, with the adapters it names held in host memory."""
    return scope.store


def get_store(scope: Annotated[AdapterScope, Depends(get_adapter_scope)]) -> AdapterRepository:
    """The adapter store as the caller sees it (``server.api.tenancy``): the same object as
    :func:`get_registry`, resolved once per request."""
    return scope.store


async def _timed_aget(request: Request, store: AdapterRepository, name: str) -> Any:
    """``store.aget``, timing reads from disk into ``loraplex_adapter_load_seconds`` (cache hits are not loads)."""
    metrics = getattr(request.app.state, "metrics", None)
    cold = name in store and not store.is_cached(name)
    started = time.perf_counter()
    adapter = await store.aget(name)
    if cold and adapter is not None and metrics is not None:
        metrics.adapter_load_seconds.observe(time.perf_counter() - started)
    return adapter


def get_base(request: Request) -> LoadedBase:
    return request.app.state.base


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


AdapterScopeDep = Annotated[AdapterScope, Depends(get_adapter_scope)]
EngineDep = Annotated[Engine, Depends(get_engine)]
RegistryDep = Annotated[AdapterRepository, Depends(get_registry)]
StoreDep = Annotated[AdapterRepository, Depends(get_store)]
BaseDep = Annotated[LoadedBase, Depends(get_base)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
