"""Which key each route needs, and what each key gets (no server)."""

from __future__ import annotations

import pytest

from server.api.errors import ApiError
from server.api.security import bearer_token, check_access, required_access
from server.config import Settings


@pytest.mark.parametrize(
    ("method", "path", "access"),
    [
        ("GET", "/health", "open"), ("GET", "/metrics", "open"), ("POST", "/generate", "read"),
        ("POST", "/v1/chat/completions", "read"), ("GET", "/v1/models", "read"), ("GET", "/adapters", "read"),
        ("GET", "/adapters/a/analysis", "read"), ("GET", "/adapters/compare", "read"), ("POST", "/adapters", "admin"),
        ("DELETE", "/adapters/a", "admin"), ("POST", "/adapters/a/shrink", "admin"), ("POST", "/admin/verify-base", "admin"),
        ("GET", "/admin/anything", "admin"), ("GET", "/adaptersX", "read"), ("GET", "/info", "read"),
    ],
)  # fmt: skip
def test_required_access(method: str, path: str, access: str) -> None:
    assert required_access(method, path) == access


def test_bearer_token_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer   abc ") == "abc"
    assert (
        bearer_token("Basic abc") is None and bearer_token("Bearer ") is None and bearer_token(None) is None
    )


def _status(settings: Settings, access: str, token: str | None) -> int:
    try:
        check_access(settings, access, token)  # type: ignore[arg-type]
    except ApiError as exc:
        return exc.status_code
    return 200


def test_both_keys() -> None:
    s = Settings(api_key="k", admin_key="a")
    assert [_status(s, "read", t) for t in (None, "x", "k", "a")] == [401, 401, 200, 200]
    assert [_status(s, "admin", t) for t in (None, "x", "k", "a")] == [401, 401, 403, 200]
    assert _status(s, "open", None) == 200


def test_only_the_api_key_also_guards_admin_routes() -> None:
    s = Settings(api_key="k")
    assert [_status(s, "admin", t) for t in (None, "x", "k")] == [401, 401, 200]
    assert [_status(s, "read", t) for t in (None, "k")] == [401, 200]


def test_only_the_admin_key_leaves_reads_open() -> None:
    s = Settings(admin_key="a")
    assert [_status(s, "read", t) for t in (None, "x")] == [200, 200]
    assert [_status(s, "admin", t) for t in (None, "x", "a")] == [401, 401, 200]


def test_no_keys_is_open_and_empty_keys_are_unset() -> None:
    s = Settings(api_key="", admin_key="  ")
    assert s.api_key is None and s.admin_key is None
    assert _status(s, "admin", None) == 200 and _status(s, "read", None) == 200
