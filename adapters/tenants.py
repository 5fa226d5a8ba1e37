"""Tenants: each customer's id, the hash of its key, and its quotas, in the store's SQLite index.

A tenant's adapters live in the same store as everyone's, under a *stored id* that qualifies the
id it uploaded with its tenant: ``acme~bot`` (``~`` is never in an adapter or tenant id, so a
stored id cannot be forged by choosing a name). Ids without ``~`` are the shared adapters, uploaded
with the admin key. ``server.api.tenancy`` maps a tenant's names to stored ids and back.

Keys: ``lpx_`` and 43 url-safe characters (256 random bits). Only the sha256 of a key is stored;
a key is shown once, when it is made. A random 256-bit key needs no slow password hash: nobody can
search its space, so the sha256 of it is as good as the key is secret. A presented key is looked
up by its hash and then compared with :func:`hmac.compare_digest`, so the comparison takes the
same time whatever the key; the dictionary lookup only sees a hash of the presented key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from adapters.errors import InvalidAdapterId, TenantExists, UnknownTenant
from adapters.index import AdapterIndex

SEPARATOR = "~"  # stored id of a tenant's adapter: <tenant>~<id>
KEY_PREFIX = "lpx_"
QUOTAS = ("max_concurrent_requests", "max_tokens_per_minute", "max_adapters", "max_storage_mb")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    id                      TEXT PRIMARY KEY,
    key_sha256              TEXT NOT NULL UNIQUE,  -- of the current key; the key itself is never stored
    created_at              TEXT NOT NULL,
    max_concurrent_requests INTEGER,               -- NULL: no limit
    max_tokens_per_minute   INTEGER,
    max_adapters            INTEGER,
    max_storage_mb          INTEGER
);
"""


def stored_id(tenant: str, adapter_id: str) -> str:
    """The store's id of ``tenant``'s adapter ``adapter_id``."""
    return f"{tenant}{SEPARATOR}{adapter_id}"


def owner_of(adapter_id: str) -> tuple[str | None, str]:
    """``acme~bot`` -> ``("acme", "bot")``; a shared adapter's id -> ``(None, id)``."""
    tenant, sep, name = adapter_id.partition(SEPARATOR)
    return (tenant, name) if sep else (None, adapter_id)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Tenant:
    id: str
    key_sha256: str
    created_at: str
    max_concurrent_requests: int | None = None
    max_tokens_per_minute: int | None = None
    max_adapters: int | None = None
    max_storage_mb: int | None = None

    def summary(self) -> dict[str, Any]:
        """What the API shows of a tenant: never its key, nor the key's hash."""
        return {"id": self.id, "created_at": self.created_at, **{q: getattr(self, q) for q in QUOTAS}}


class TenantTable:
    """The ``tenants`` table of the store's index, mirrored in memory (lookups never touch SQLite).

    Thread-safe: writes are serialised by a lock and committed before the mirror changes, so a
    deleted tenant's or a replaced key's hash stops being accepted as soon as the call returns.
    """

    def __init__(self, index: AdapterIndex) -> None:
        self._index = index
        self._lock = threading.Lock()
        index.execute_script(_SCHEMA)
        self._by_id: dict[str, Tenant] = {}
        self._by_hash: dict[str, Tenant] = {}
        for row in index.query(f"SELECT id, key_sha256, created_at, {', '.join(QUOTAS)} FROM tenants"):
            self._remember(Tenant(*row))

    def _remember(self, tenant: Tenant) -> None:
        old = self._by_id.get(tenant.id)
        if old is not None:
            self._by_hash.pop(old.key_sha256, None)
        self._by_id[tenant.id] = tenant
        self._by_hash[tenant.key_sha256] = tenant

    # ------------------------------------------------------------------ reading

    def identify(self, key: str) -> Tenant | None:
        """The tenant whose current key is ``key``, else None (constant-time comparison of the hash)."""
        return self.identify_digest(key_hash(key))

    def identify_digest(self, digest: str) -> Tenant | None:
        """:meth:`identify` from the key's sha256 (what the Ray ingress sends the store: never the key)."""
        tenant = self._by_hash.get(digest)
        if tenant is None or not hmac.compare_digest(tenant.key_sha256, digest):
            return None
        return tenant

    def get(self, tenant_id: str) -> Tenant | None:
        return self._by_id.get(tenant_id)

    def list(self) -> list[Tenant]:
        tenants = dict(self._by_id)
        return [tenants[i] for i in sorted(tenants)]

    def __len__(self) -> int:
        return len(self._by_id)

    # ------------------------------------------------------------------ writing

    def mirror(self, tenant: Tenant) -> None:
        """Hold ``tenant`` as the cluster's store has it now (a replica's copy; not persisted)."""
        with self._lock:
            self._remember(tenant)

    def create(self, tenant_id: str, quotas: dict[str, int | None]) -> tuple[Tenant, str]:
        """A new tenant and its key (returned once, never stored)."""
        check_tenant_id(tenant_id)
        key = new_key()
        tenant = Tenant(tenant_id, key_hash(key), _utc_now(), **_only_quotas(quotas))
        with self._lock:
            if tenant_id in self._by_id:
                raise TenantExists(f"tenant {tenant_id!r} already exists; choose another id, or PATCH it.")
            try:
                with self._index.transaction() as db:
                    db.execute(
                        f"INSERT INTO tenants (id, key_sha256, created_at, {', '.join(QUOTAS)}) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (
                            tenant.id,
                            tenant.key_sha256,
                            tenant.created_at,
                            *(getattr(tenant, q) for q in QUOTAS),
                        ),
                    )
            except sqlite3.IntegrityError as exc:  # pragma: no cover (a 256-bit key collision)
                raise TenantExists(f"tenant {tenant_id!r} could not be created; retry.") from exc
            self._remember(tenant)
        return tenant, key

    def update(self, tenant_id: str, quotas: dict[str, int | None]) -> Tenant:
        """Set the quotas given (None: no limit); the others keep their values."""
        with self._lock:
            tenant = dataclasses.replace(self.require(tenant_id), **_only_quotas(quotas))
            with self._index.transaction() as db:
                db.execute(
                    f"UPDATE tenants SET {', '.join(f'{q} = ?' for q in QUOTAS)} WHERE id = ?",
                    (*(getattr(tenant, q) for q in QUOTAS), tenant_id),
                )
            self._remember(tenant)
        return tenant

    def rotate(self, tenant_id: str) -> tuple[Tenant, str]:
        """A new key for ``tenant_id``; the old one is refused from the moment this returns."""
        key = new_key()
        with self._lock:
            tenant = dataclasses.replace(self.require(tenant_id), key_sha256=key_hash(key))
            with self._index.transaction() as db:
                db.execute("UPDATE tenants SET key_sha256 = ? WHERE id = ?", (tenant.key_sha256, tenant_id))
            self._remember(tenant)
        return tenant, key

    def delete(self, tenant_id: str) -> Tenant:
        """Forget ``tenant_id``: its key is refused from the moment this returns."""
        with self._lock:
            tenant = self.require(tenant_id)
            with self._index.transaction() as db:
                db.execute("DELETE FROM tenants WHERE id = ?", (tenant_id,))
            del self._by_id[tenant_id]
            self._by_hash.pop(tenant.key_sha256, None)
        return tenant

    def require(self, tenant_id: str) -> Tenant:
        tenant = self._by_id.get(tenant_id)
        if tenant is None:
            raise UnknownTenant(f"tenant {tenant_id!r} does not exist; list tenants with GET /admin/tenants.")
        return tenant


def check_tenant_id(tenant_id: object) -> str:
    """Tenant ids follow the adapter id rule (1-64 of ``A-Za-z0-9._-``), else 400."""
    from adapters.store import ADAPTER_ID_RE  # the one id rule

    if not isinstance(tenant_id, str) or not ADAPTER_ID_RE.fullmatch(tenant_id):
        raise InvalidAdapterId(
            f"tenant id {tenant_id!r} is not allowed: use 1-64 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit."
        )
    return tenant_id


def _only_quotas(quotas: dict[str, int | None]) -> dict[str, int | None]:
    return {name: value for name, value in quotas.items() if name in QUOTAS}
