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
