"""Who is calling (:class:`Principal`), and the adapter store as that caller sees it (:class:`TenantView`).

    caller                       sees (lists, uses)                  may change
    admin key                    every adapter; a tenant's as ``acme~bot``  the shared ones (and delete any)
    a tenant's key               its own adapters and the shared ones  its own (namespace ``acme~``)
    the API key (default tenant) the shared ones                     nothing (as before tenants)

With no keys set at all every caller is the admin (as before tenants: every route is open). A
tenant naming an adapter that is neither its own nor shared gets exactly the answer for an id that
does not exist: the view has no way to name another tenant's adapter (ids with ``~`` are not ids
a tenant can use; they are refused as invalid whether or not they exist).

A tenant's own adapter shadows a shared one of the same id for that tenant.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping
from typing import Any

from adapters.archive import AdapterFiles
from adapters.errors import QuotaExceeded, SharedAdapter, UnknownAdapter
from adapters.index import AdapterRecord
from adapters.peft_format import BaseLinearShape, LoraAdapter
from adapters.registry import AdapterRepository
from adapters.store import check_adapter_id
from adapters.tenants import SEPARATOR, Tenant, owner_of, stored_id
from server.api.principal import ADMIN, DEFAULT, Principal

__all__ = ["ADMIN", "DEFAULT", "Principal", "TenantView", "usage", "view_for"]

_quota_locks: dict[str, threading.Lock] = {}
_quota_locks_guard = threading.Lock()


def _tenant_lock(tenant_id: str) -> threading.Lock:
    """One tenant's uploads one at a time: the quota check and the write are one step."""
    with _quota_locks_guard:
        return _quota_locks.setdefault(tenant_id, threading.Lock())


def view_for(store: AdapterRepository, principal: Principal) -> AdapterRepository:
    """The store as ``principal`` sees it: the store itself for the admin."""
    if principal.kind == "admin":
        return store
    return TenantView(store, principal.tenant)


def usage(store: AdapterRepository, tenant_id: str) -> tuple[int, int]:
    """``(adapters, bytes)`` stored in ``tenant_id``'s namespace."""
    own = [r for r in store.records() if owner_of(r.adapter_id)[0] == tenant_id]
    return len(own), sum(r.bytes for r in own)


class TenantView:
    """An :class:`AdapterRepository` holding one tenant's names (``tenant`` None: the default tenant,
    which sees the shared adapters only). Records come back under the names the tenant uses."""

    def __init__(self, store: AdapterRepository, tenant: Tenant | None) -> None:
        self.raw = store
        self.tenant = tenant

    # ------------------------------------------------------------------ names

    def _stored(self, name: object) -> str | None:
        """The stored id ``name`` means for this tenant, or None (unknown, or not a name it can use)."""
        if not isinstance(name, str) or SEPARATOR in name:
            return None
        if self.tenant is not None:
            own = stored_id(self.tenant.id, name)
            if own in self.raw:
                return own
        return name if name in self.raw else None

    def _visible(self, record: AdapterRecord) -> AdapterRecord:
        if SEPARATOR not in record.adapter_id:  # a shared adapter: its id as stored (no copy)
            return record
        return dataclasses.replace(record, adapter_id=owner_of(record.adapter_id)[1])

    def _mine(self, record: AdapterRecord) -> bool:
        owner = owner_of(record.adapter_id)[0]
        return owner is None or (self.tenant is not None and owner == self.tenant.id)

    # ------------------------------------------------------------------ reading

    def __contains__(self, name: object) -> bool:
        return self._stored(name) is not None

    def get(self, name: str) -> LoraAdapter | None:
        stored = self._stored(name)
        return self.raw.get(stored) if stored is not None else None

    async def aget(self, name: str) -> LoraAdapter | None:
        stored = self._stored(name)
        return await self.raw.aget(stored) if stored is not None else None

    def is_cached(self, name: str) -> bool:
        stored = self._stored(name)
        return stored is not None and self.raw.is_cached(stored)

    def record(self, name: str) -> AdapterRecord | None:
        stored = self._stored(name)
        record = self.raw.record(stored) if stored is not None else None
        return self._visible(record) if record is not None else None

    def records(self) -> list[AdapterRecord]:
        by_name: dict[str, AdapterRecord] = {}
        for record in self.raw.records():
            if not self._mine(record):
                continue
            owned = owner_of(record.adapter_id)[0] is not None
            visible = self._visible(record)
            if owned or visible.adapter_id not in by_name:  # its own shadows a shared one
                by_name[visible.adapter_id] = visible
        return [by_name[name] for name in sorted(by_name)]

    def ids(self) -> list[str]:
        return [r.adapter_id for r in self.records()]

    def read_files(self, name: str) -> tuple[AdapterRecord, AdapterFiles] | None:
        stored = self._stored(name)
        found = self.raw.read_files(stored) if stored is not None else None
        return (self._visible(found[0]), found[1]) if found is not None else None

    def track(self, owner: object, adapter: LoraAdapter) -> None:
        self.raw.track(owner, adapter)

    # ------------------------------------------------------------------ writing (its own namespace)

    def _own(self, name: str) -> str:
        check_adapter_id(name)
        if self.tenant is None:
            raise SharedAdapter(
                "the API key only reads and uses the shared adapters; upload with the admin key, or with a "
                "tenant's key into its own namespace."
            )
        return stored_id(self.tenant.id, name)

    def check_can_put(self, name: str, *, replace: bool) -> None:
        own = self._own(name)
        self.raw.check_can_put(own, replace=replace)
        if own not in self.raw:
            self._check_quotas(own, 0)

    def put(
        self, name: str, files: AdapterFiles, *, replace: bool = False, keep_identical: bool = False
    ) -> AdapterRecord:
        own = self._own(name)
        assert self.tenant is not None
        with _tenant_lock(self.tenant.id):
            self._check_quotas(own, files.size)
            record = self.raw.put(own, files, replace=replace, keep_identical=keep_identical)
        return self._visible(record)

    def _check_quotas(self, own: str, size: int) -> None:
        tenant = self.tenant
        assert tenant is not None
        count, stored_bytes = usage(self.raw, tenant.id)
        previous = self.raw.record(own)
        if previous is None and tenant.max_adapters is not None and count + 1 > tenant.max_adapters:
            raise QuotaExceeded(
                f"tenant {tenant.id!r} has {count} adapters, its max_adapters quota is {tenant.max_adapters}; "
                "delete one (DELETE /adapters/{id}) or ask the operator to raise the quota."
            )
        after = stored_bytes - (previous.bytes if previous is not None else 0) + size
        if tenant.max_storage_mb is not None and after > tenant.max_storage_mb << 20:
            raise QuotaExceeded(
                f"tenant {tenant.id!r} would store {after / (1 << 20):.1f} MiB of adapters, its max_storage_mb "
                f"quota is {tenant.max_storage_mb}; delete adapters or ask the operator to raise the quota."
            )

    def delete(self, name: str) -> AdapterRecord:
        stored = self._stored(name)
        if stored is None:
            raise UnknownAdapter(
                f"adapter {name!r} is not stored on this server; list adapters with GET /adapters."
            )
        if owner_of(stored)[0] is None:
            raise SharedAdapter(
                f"adapter {name!r} is shared by the server's admin with every tenant: only the admin key may "
                "change or delete it. Upload your own version under another id (or the same id: yours "
                "then shadows the shared one for your key)."
            )
        return self._visible(self.raw.delete(stored))

    # ------------------------------------------------------------------ the rest is the store's

    @property
    def ready(self) -> bool:
        return self.raw.ready

    @property
    def base_shapes(self) -> Mapping[str, BaseLinearShape] | None:
        return self.raw.base_shapes

    def bind_base(self, base_shapes: Mapping[str, BaseLinearShape], max_rank: int) -> None:
        self.raw.bind_base(base_shapes, max_rank)

    def close(self) -> None:  # the view owns nothing
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)
