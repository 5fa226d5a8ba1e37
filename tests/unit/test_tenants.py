"""Tenants without a server: the table, the key rule with tenants' keys, quotas, the route table."""

from __future__ import annotations

import pytest

from adapters.errors import InvalidAdapterId, TenantExists, UnknownTenant
from adapters.index import INDEX_FILE, AdapterIndex
from adapters.store import check_stored_id
from adapters.tenants import TenantTable, key_hash, owner_of, stored_id
from server.api.context import RequestContext
from server.api.errors import ApiError
from server.api.load_control import TenantLimits
from server.api.named_adapters import requested_adapters
from server.api.routes import rule_for
from server.api.security import authenticate
from server.config import Settings


@pytest.fixture
def table(tmp_path) -> TenantTable:
    return TenantTable(AdapterIndex(tmp_path / INDEX_FILE))


def test_the_table_keeps_hashes_not_keys_and_survives_a_reopen(table: TenantTable, tmp_path) -> None:
    tenant, key = table.create("acme", {"max_adapters": 3, "unknown": 9})
    assert key.startswith("lpx_") and len(key) > 40 and tenant.key_sha256 == key_hash(key)
    assert table.identify(key) == tenant and table.identify(key + "x") is None
    assert "key" not in tenant.summary() and "key_sha256" not in tenant.summary()
    with pytest.raises(TenantExists):
        table.create("acme", {})
    with pytest.raises(InvalidAdapterId):
        table.create("a~b", {})
    assert key.encode() not in (tmp_path / INDEX_FILE).read_bytes()
    reopened = TenantTable(AdapterIndex(tmp_path / INDEX_FILE))
    assert reopened.identify(key) is not None and reopened.get("acme").max_adapters == 3


def test_rotation_and_deletion_refuse_the_old_key_at_once(table: TenantTable) -> None:
    _, old = table.create("acme", {})
    _, new = table.rotate("acme")
    assert table.identify(old) is None and table.identify(new).id == "acme"
    assert table.update("acme", {"max_storage_mb": 1}).max_storage_mb == 1
    table.delete("acme")
    assert table.identify(new) is None and table.list() == []
    with pytest.raises(UnknownTenant):
        table.rotate("acme")


def test_stored_ids_qualify_a_tenants_adapter() -> None:
    assert stored_id("acme", "bot") == "acme~bot" and owner_of("acme~bot") == ("acme", "bot")
    assert owner_of("bot") == (None, "bot")
    assert check_stored_id("acme~bot") == "acme~bot"
    for bad in ("acme~", "~bot", "a~b~c", "acme~../x"):
        with pytest.raises(InvalidAdapterId):
            check_stored_id(bad)


def test_who_each_key_is_and_what_it_may_do(table: TenantTable) -> None:
    _, key = table.create("acme", {})
    s = Settings(api_key="k", admin_key="a")

    def who(access: str, token: str | None) -> str | int:
        try:
            return authenticate(s, access, token, table).label  # type: ignore[arg-type]
        except ApiError as exc:
            return exc.status_code

    assert [who("read", t) for t in (None, "x", "k", "a", key)] == [401, 401, "_default", "_admin", "acme"]
    assert [who("manage", t) for t in ("k", "a", key)] == [403, "_admin", "acme"]
    assert [who("admin", t) for t in ("k", "a", key)] == [403, "_admin", 403]
    assert authenticate(Settings(), "manage", None, table).label == "_admin"  # no keys: open, as before
    assert authenticate(Settings(admin_key="a"), "read", None, table).label == "_default"


def _context(tenant_id: str) -> RequestContext:
    return RequestContext(
        request_id="r", route="/generate", started=0.0, tenant=tenant_id, tenant_id=tenant_id
    )


def test_quotas_refuse_one_tenant_and_not_another(table: TenantTable) -> None:
    table.create("noisy", {"max_concurrent_requests": 1, "max_tokens_per_minute": 10})
    table.create("quiet", {})
    limits = TenantLimits(table.get)
    first = _context("noisy")
    limits.admit(first, prompt_tokens=4)
    with pytest.raises(ApiError) as refused:
        limits.admit(_context("noisy"), prompt_tokens=1)
    assert refused.value.status_code == 429 and "max_concurrent_requests" in refused.value.message
    assert refused.value.headers == {"Retry-After": "1"}
    limits.admit(_context("quiet"), prompt_tokens=100)  # another tenant is not held back
    limits.charge(first, 8)  # 12 tokens in the window now
    for callback in first.on_close:
        callback()
    with pytest.raises(ApiError) as metered:
        limits.admit(_context("noisy"), prompt_tokens=1)
    assert "max_tokens_per_minute" in metered.value.message
    assert 1 <= int(metered.value.headers["Retry-After"]) <= 60
    assert limits.usage("noisy") == {"running_requests": 0, "tokens_last_minute": 12}


@pytest.mark.parametrize(
    ("method", "path", "access", "cluster"),
    [
        ("POST", "/admin/tenants", "admin", "store"), ("PATCH", "/admin/tenants/acme", "admin", "store"),
        ("POST", "/admin/tenants/acme/keys", "admin", "store"), ("POST", "/admin/verify-base", "admin", "replica"),
        ("POST", "/adapters", "manage", "store"), ("DELETE", "/adapters/a", "manage", "store"),
        ("GET", "/adapters/a", "read", "store"), ("GET", "/adapters/a/probe", "read", "replica"),
        ("POST", "/adapters/compose", "manage", "store"), ("GET", "/adapters/compare", "read", "replica"),
    ],
)  # fmt: skip
def test_the_route_table(method: str, path: str, access: str, cluster: str) -> None:
    rule = rule_for(method, path)
    assert (rule.access, rule.cluster) == (access, cluster)


def test_the_names_a_request_carries() -> None:
    body = b'{"inputs": "x", "parameters": {"adapter_id": "a", "merged_adapters": {"ids": ["b", "a"]}}}'
    assert requested_adapters("/generate", {}, body, "POST") == ["a", "b"]
    assert requested_adapters("/adapters/z/analysis", {}, b"") == ["z"]
    assert requested_adapters("/adapters/z", {}, b"") == []  # the store answers: no weights needed
    assert requested_adapters("/adapters/compare", {"a": "p", "b": "q"}, b"") == ["p", "q"]
