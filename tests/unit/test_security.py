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
        ("GET", "/adapters/a/analysis", "read"), ("GET", "/adapters/compare", "read"), ("POST", "/adapters", "manage"),
        ("DELETE", "/adapters/a", "manage"), ("POST", "/adapters/a/shrink", "manage"), ("POST", "/admin/verify-base", "admin"),
        ("GET", "/admin/anything", "admin"), ("GET", "/adaptersX", "read"), ("GET", "/info", "read"),
        ("GET", "/", "open"), ("HEAD", "/", "open"), ("POST", "/", "read"), ("GET", "/console/static/js/main.js", "open"),
        ("POST", "/console/static/x", "read"), ("GET", "/consolex", "read"),
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


def test_api_modules_that_run_no_model_do_not_import_torch() -> None:
    """Auth, load control, the drain, the upload limits and the error table stay light: importing
    them loads no model code."""
    import subprocess
    import sys

    code = (
        "import sys, server.api.security, server.api.load_control, server.api.errors, server.api.drain, "
        "server.api.upload_limit; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_adapters_never_import_the_server() -> None:
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "adapters"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n == "server" or n.startswith("server.") for n in names), (
                f"{path.name} imports {names}"
            )


# --------------------------------------------------------------------------- issue 31: screen()


def _screen(settings: Settings, method: str, path: str, **headers: str):
    from starlette.datastructures import Headers

    from server.api.security import screen

    error = screen(settings, method, path, Headers({k.replace("_", "-"): v for k, v in headers.items()}))
    return None if error is None else (error.status_code, error.error_type)


@pytest.mark.parametrize(
    ("host", "allowed", "ok"),
    [
        ("127.0.0.1:8080", [], True),
        ("localhost", [], True),
        ("[::1]:8080", [], True),
        ("evil.example:8080", [], False),
        ("rebound.attacker.test", [], False),
        ("gpu-box.lan:8080", ["gpu-box.lan"], True),
        ("anything.example", ["*"], True),
    ],
)
def test_unknown_hosts_are_refused_while_routes_are_open(host: str, allowed: list[str], ok: bool) -> None:
    settings = Settings(allowed_hosts=allowed)
    expected = None if ok else (400, "host_not_allowed")
    assert _screen(settings, "GET", "/v1/models", host=host) == expected
    assert _screen(settings, "GET", "/health", host=host) is None  # probes name any host


def test_with_a_key_any_host_is_served_but_the_key_is_needed() -> None:
    settings = Settings(api_key="k")
    assert _screen(settings, "GET", "/v1/models", host="evil.example") == (401, "unauthorized")
    assert _screen(settings, "GET", "/v1/models", host="evil.example", authorization="Bearer k") is None
    assert _screen(Settings(api_key="k", allowed_hosts=["a.example"]), "GET", "/info", host="b.example",
                   authorization="Bearer k") == (400, "host_not_allowed")  # fmt: skip


@pytest.mark.parametrize(
    ("headers", "refused"),
    [
        ({"sec_fetch_site": "cross-site", "origin": "https://evil.example"}, True),
        ({"sec_fetch_site": "same-site"}, True),
        ({"origin": "https://evil.example"}, True),  # a browser without Sec-Fetch-Site
        ({"origin": "null"}, True),  # a sandboxed frame or a file: page
        ({"sec_fetch_site": "same-origin", "origin": "http://127.0.0.1:8080"}, False),
        ({"origin": "http://127.0.0.1:8080"}, False),
        ({}, False),  # curl, the SDKs: not a browser
    ],
)
def test_cross_site_writes_are_refused_without_keys(headers: dict, refused: bool) -> None:
    settings = Settings()
    got = _screen(settings, "POST", "/adapters", host="127.0.0.1:8080", **headers)
    assert got == ((403, "cross_site") if refused else None)
    assert _screen(settings, "GET", "/adapters", host="127.0.0.1:8080", **headers) is None  # reads pass
    keyed = Settings(admin_key="a")  # a key guards the route: browsers cannot send it cross-site
    assert (
        _screen(keyed, "POST", "/adapters", host="127.0.0.1:8080", authorization="Bearer a", **headers)
        is None
    )
