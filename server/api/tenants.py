"""Tenants, managed with the admin key: ``/admin/tenants`` (see docs/security.md).

    POST   /admin/tenants              {"id", quotas...} -> 201 {"id", "key", ...}: the key is shown once
    GET    /admin/tenants              every tenant, its quotas and usage (never a key)
    GET    /admin/tenants/{id}         one tenant
    PATCH  /admin/tenants/{id}         set quotas (null: no limit)
    DELETE /admin/tenants/{id}         its key is refused at once, its running requests finish, its adapters go
    POST   /admin/tenants/{id}/keys    -> 201 a new key; the old one is refused from then on

Tenants live in the store's SQLite index (``adapters.tenants``), so on a Ray cluster these routes
run in the store deployment, which owns the table.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from adapters.store import ADAPTER_ID_RE, AdapterStore
from adapters.tenants import QUOTAS, Tenant, TenantTable, owner_of
from server.api.errors import ApiError
from server.api.load_control import TenantLimits
from server.api.tenancy import usage

router = APIRouter(prefix="/admin/tenants", tags=["tenants"])
log = logging.getLogger(__name__)

TenantIdPath = Annotated[str, Path(description="Tenant id.", pattern=ADAPTER_ID_RE.pattern)]


class Quotas(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_concurrent_requests: int | None = Field(
        None, ge=1, le=1_000_000, description="Requests running at once."
    )
    max_tokens_per_minute: int | None = Field(
        None, ge=1, le=10**12, description="Prompt and generated tokens over a sliding minute."
    )
    max_adapters: int | None = Field(None, ge=0, le=10**9, description="Adapters in its namespace.")
    max_storage_mb: int | None = Field(None, ge=0, le=10**9, description="MiB of stored adapter files.")


class TenantCreate(Quotas):
    id: str = Field(pattern=ADAPTER_ID_RE.pattern, description="Like an adapter id: 1-64 of A-Za-z0-9._-")


def _store(request: Request) -> AdapterStore:
    return request.app.state.store


def _table(request: Request) -> TenantTable:
    return _store(request).tenants


def describe_tenant(request: Request, tenant: Tenant) -> dict:
    gate = getattr(request.app.state, "gate", None)
    return tenant_summary(_store(request), tenant, gate.tenants if gate is not None else None)


def tenant_summary(store: AdapterStore, tenant: Tenant, limits: TenantLimits | None) -> dict:
    """A tenant as ``/admin/tenants`` and the admin's ``/info`` show it: its quotas, its adapters
    and their bytes in ``store``, and (with ``limits``, the counters its quotas are held against)
    its running requests and tokens of the last minute. On a Ray cluster the store deployment
    answers for all replicas with its own store and the cluster-wide counts."""
    adapters, stored = usage(store, tenant.id)
    out = {**tenant.summary(), "adapters": adapters, "storage_bytes": stored}
    if limits is not None:
        out.update(limits.usage(tenant.id))
    return out


@router.post("", status_code=201)
async def create_tenant(body: TenantCreate, request: Request) -> JSONResponse:
    """A new tenant and its key (``key``: shown this once; only its hash is stored)."""
    if request.app.state.settings.admin_key is None:
        raise ApiError(
            409,
            "tenants need LORAPLEX_ADMIN_KEY: without it every route is open to anyone and a tenant's key "
            "would protect nothing. Set LORAPLEX_ADMIN_KEY (and LORAPLEX_API_KEY), restart, then create tenants.",
            "keys_required",
        )
    quotas = body.model_dump(include=set(QUOTAS))
    tenant, key = await asyncio.to_thread(_table(request).create, body.id, quotas)
    log.info("tenant %s created", tenant.id)
    return JSONResponse({**describe_tenant(request, tenant), "key": key}, status_code=201,
                        headers={"Location": f"/admin/tenants/{tenant.id}", "Cache-Control": "no-store"})  # fmt: skip


@router.get("")
async def list_tenants(request: Request) -> list[dict]:
    return [describe_tenant(request, t) for t in _table(request).list()]


@router.get("/{tenant_id}")
async def get_tenant(tenant_id: TenantIdPath, request: Request) -> dict:
    return describe_tenant(request, _table(request).require(tenant_id))


@router.patch("/{tenant_id}")
async def update_tenant(tenant_id: TenantIdPath, body: Quotas, request: Request) -> dict:
    """Set the quotas the body names (``null``: no limit); the others stay. Applies to the next request."""
    quotas = body.model_dump(include=body.model_fields_set & set(QUOTAS))
    tenant = await asyncio.to_thread(_table(request).update, tenant_id, quotas)
    log.info("tenant %s quotas set: %s", tenant_id, quotas)
    return describe_tenant(request, tenant)


@router.post("/{tenant_id}/keys", status_code=201)
async def rotate_key(tenant_id: TenantIdPath, request: Request) -> JSONResponse:
    """A new key for the tenant; the old one is refused from this answer on."""
    tenant, key = await asyncio.to_thread(_table(request).rotate, tenant_id)
    log.info("tenant %s key replaced", tenant_id)
    return JSONResponse({"id": tenant.id, "key": key}, status_code=201, headers={"Cache-Control": "no-store"})


@router.delete("/{tenant_id}", status_code=204)
async def delete_tenant(tenant_id: TenantIdPath, request: Request) -> Response:
    """Its key is refused at once; its running requests finish; its adapters are deleted (their files go
    when their last running request ends, as for any delete)."""
    store = _store(request)
    await asyncio.to_thread(_table(request).delete, tenant_id)

    def delete_adapters() -> int:
        owned = [r.adapter_id for r in store.records() if owner_of(r.adapter_id)[0] == tenant_id]
        for adapter_id in owned:
            store.delete(adapter_id)
        return len(owned)

    deleted = await asyncio.to_thread(delete_adapters)
    log.info("tenant %s deleted with its %d adapters", tenant_id, deleted)
    return Response(status_code=204)
