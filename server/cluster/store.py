"""``LoraplexStore``: the cluster's one adapter store (the existing index and blob backend).

Uploads, replaces, deletes, listings, downloads and ``POST /adapters/compose`` run here, through
the same routes as on one server (``server.api.adapters``, ``server.api.composition``): a composed
adapter is stored like an upload, and replicas fetch it like one. Replicas never share its
filesystem: they ask :meth:`describe` which version (sha256) an id has now and fetch its files
with :meth:`read_files`.

Validating an upload needs the base model's layer shapes; the store holds no model, so the first
replica that finishes loading sends them (:meth:`bind_base`); until then uploads get 503, as on
one server while the model loads. The ``--adapter ID=PATH`` start-up adapters are stored then.

With ``--adapter-source``, the sources are searched here, for the whole cluster: the ingress asks
:meth:`resolve` (instead of :meth:`describe`) for the ids a request names, which fetches what is
missing into this store first (the policy of ``server.api.adapter_sources``), so replicas fetch a
fetched adapter by (id, version) like an upload. Replicas never open sources themselves.

Replicas also report their health, counters and metrics here every second (:meth:`report`), which
is how the ingress answers ``/health`` and ``/metrics`` for the whole cluster.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import Depends, FastAPI

from adapters.archive import AdapterFiles
from adapters.peft_format import BaseLinearShape
from adapters.sources import AdapterSources
from adapters.store import AdapterStore
from adapters.tenants import SEPARATOR, Tenant
from server import __version__
from server.api import adapters, analysis, composition, tenants
from server.api.adapter_sources import fetch_from_sources
from server.api.errors import HANDLED, ApiError, as_api_error, install_error_handlers
from server.api.load_control import QueueGate, TenantLimits
from server.api.principal import ADMIN, Principal
from server.api.security import authorizer, warn_if_open
from server.api.tenancy import TenantView, view_for
from server.api.tenants import tenant_summary
from server.api.upload_limit import UploadLimitMiddleware
from server.app import register_startup_adapters
from server.cluster.asgi_bridge import HttpCall, ResponseStart, run_asgi
from server.cluster.routing import Version  # what a replica must hold of an adapter
from server.config import Settings

log = logging.getLogger(__name__)


def store_app(
    settings: Settings,
    store: AdapterStore,
    sources: AdapterSources | None = None,
    limits: TenantLimits | None = None,
) -> FastAPI:
    """The adapter routes of one server around ``store`` (no engine: analysis routes are not sent here).
    ``limits``: the cluster's per-tenant counts, shown by ``/admin/tenants``."""
    app = FastAPI(title="loraplex-store", version=__version__,
                  dependencies=[Depends(authorizer(settings))])  # fmt: skip
    app.state.settings = settings
    app.state.store = app.state.registry = store
    app.state.sources = sources  # GET /adapters/{id} shows a fetched adapter's source
    app.state.engine = None
    if limits is not None:  # read by /admin/tenants only: the store's app runs no generation
        app.state.gate = QueueGate(settings.max_queue, limits)
    app.add_middleware(
        UploadLimitMiddleware,
        max_bytes=settings.max_upload_mb << 20,
        timeout=settings.upload_timeout,
    )
    install_error_handlers(app)
    app.include_router(analysis.router)  # GET /adapters/{id}/download; before adapters, as in create_app
    app.include_router(composition.router)  # POST /adapters/compose: needs the factors and shapes only
    app.include_router(adapters.router)
    app.include_router(tenants.router)  # /admin/tenants: this deployment owns the tenant table
    return app


def _stored_names(view: Any, names: list[str]) -> list[str]:
    """The stored ids ``names`` mean through ``view`` (unknown plain names kept: replicas drop them)."""
    out = []
    for name in names:
        stored = view._stored(name) if isinstance(view, TenantView) else name
        if stored is not None:
            out.append(stored)
        elif SEPARATOR not in name:
            out.append(name)
    return list(dict.fromkeys(out))


class LoraplexStore:
    """Ray Serve deployment (one replica) owning the :class:`AdapterStore` in ``settings.data_dir``."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = Settings(**settings)
        warn_if_open(self.settings)
        self.store = AdapterStore(self.settings.data_dir, host_cache_bytes=self.settings.host_cache_mb << 20)
        self.sources = (
            AdapterSources.from_uris(
                self.store,
                self.settings.adapter_source,
                max_bytes=self.settings.max_upload_mb << 20,
                refresh_seconds=self.settings.adapter_source_refresh,
            )
            if self.settings.adapter_source
            else None
        )
        self.base_name: str | None = None  # the base model's name: never looked up in the sources
        # the whole cluster's running requests and tokens per tenant, against its quotas: the ingress
        # takes a place here before routing, replicas pass on every token they count
        self.limits = TenantLimits(self.store.tenants.get)
        self.app = store_app(self.settings, self.store, self.sources, self.limits)
        self.reports: dict[str, dict[str, Any]] = {}
        self.bind_error: str | None = None

    def bind_base(
        self, base_shapes: Mapping[str, BaseLinearShape], max_rank: int, base_name: str | None = None
    ) -> None:
        """The base model's shapes from a replica (first call only), then the start-up adapters."""
        self.base_name = base_name or self.base_name
        if self.store.ready:
            return
        self.store.bind_base(base_shapes, max_rank)
        try:
            register_startup_adapters(self.settings, self.store)
        except Exception as exc:  # a bad --adapter: say so in /health, as one server's start-up would
            self.bind_error = f"start-up adapter failed: {exc}"
            log.exception("start-up adapters failed")

    def ready(self) -> bool:
        return self.store.ready

    def describe(self, names: list[str]) -> dict[str, Version | None]:
        """The current version of each name: None for names that are not stored adapters."""
        out: dict[str, Version | None] = {}
        for name in names:
            record = self.store.record(name) if isinstance(name, str) else None
            out[name] = (record.sha256, record.config_sha256) if record is not None else None
        return out

    async def resolve(
        self, names: list[str], wanted: str | None, caller: Principal = ADMIN
    ) -> dict[str, Any]:
        """:meth:`describe` after fetching from the adapter sources what ``names`` lacks (``wanted``:
        the request's ``adapter_source``): ``{"versions": ..., "names": ...}``, or ``{"error": (status,
        message, error_type)}`` for the ingress to answer (an invalid adapter, an unreachable source...).

        ``caller``: whose names they are. A tenant's ``bot`` is its ``acme~bot`` when it has one
        (``names`` and the keys of ``versions`` are stored ids, what replicas sync); a name the caller
        cannot see is left out (a replica never fetches another tenant's adapter for it)."""
        try:
            await fetch_from_sources(self.sources, names, wanted, self.base_name)
        except HANDLED as exc:
            error = as_api_error(exc)
            return {"error": (error.status_code, error.message, error.error_type)}
        stored = _stored_names(view_for(self.store, caller), names)
        return {"versions": self.describe(stored), "names": stored}

    def identify(self, digest: str) -> Tenant | None:
        """The tenant whose key has this sha256 (the ingress screens tenants' keys with it)."""
        return self.store.tenants.identify_digest(digest)

    def quota_take(self, tenant_id: str) -> tuple[int, str, str, dict[str, str]] | None:
        """One of the cluster's running places for ``tenant_id`` (give it back with
        :meth:`quota_leave`), or the 429 to answer ``(status, message, error_type, headers)``."""
        try:
            self.limits.take(tenant_id)
        except ApiError as refused:
            return refused.status_code, refused.message, refused.error_type, dict(refused.headers or {})
        return None

    def quota_leave(self, tenant_id: str) -> None:
        self.limits.leave(tenant_id)

    def quota_charge(self, tenant_id: str, tokens: int) -> None:
        """Tokens a replica counted for ``tenant_id`` (its prompt at admission, its output at the end)."""
        self.limits.charge_tenant(tenant_id, tokens)

    def quota_usage(self, tenant_id: str) -> dict[str, int]:
        return self.limits.usage(tenant_id)

    def tenants_described(self) -> list[dict[str, Any]]:
        """Every tenant as the admin's ``/info`` lists it, for the whole cluster: the adapters this
        store holds and the cluster's counts (:meth:`quota_usage`), where a replica knows only the
        tenants that called it, the adapters it cached and its own share of the traffic."""
        return [tenant_summary(self.store, tenant, self.limits) for tenant in self.store.tenants.list()]

    def read_files(self, adapter_id: str, sha256: str) -> AdapterFiles | None:
        """The files of ``adapter_id`` if its current version is ``sha256`` (checked), else None."""
        found = self.store.read_files(adapter_id)
        if found is None or found[0].sha256 != sha256:
            return None
        return found[1]

    async def forward(self, call: HttpCall) -> AsyncIterator[ResponseStart | bytes]:
        """Answer one adapter-management request with the store's app (streamed back)."""
        async for item in run_asgi(self.app, call):
            yield item

    def report(self, replica_id: str, data: dict[str, Any]) -> dict[str, Version | None]:
        """A replica's state, sent every second; kept with the time it arrived. The answer: the
        current versions of the adapters it caches, so it drops deleted and replaced ones at once."""
        self.reports[replica_id] = {**data, "received": time.monotonic()}
        return self.describe(data.get("adapters_cached", []))

    def replica_reports(self, max_age: float) -> dict[str, dict[str, Any]]:
        """The reports of replicas heard from in the last ``max_age`` seconds (others are gone)."""
        now = time.monotonic()
        self.reports = {k: v for k, v in self.reports.items() if now - v["received"] < 10 * max_age}
        return {k: v for k, v in self.reports.items() if now - v["received"] < max_age}

    def status(self) -> dict[str, Any]:
        return {"ready": self.store.ready, "adapters": self.store.ids(), "error": self.bind_error}
