"""Access control: the API and admin keys (load control is in ``load_control.py``).

Keys are Bearer tokens (``Authorization: Bearer <key>``), compared in constant time:

    route                                             needs
    /health, /metrics                                 nothing (always open)
    GET / and /console/* (the web console's files)    nothing (its data calls carry the key)
    /admin/*, and /adapters* except GET/HEAD          the admin key (LORAPLEX_ADMIN_KEY)
    everything else (generation, GET /adapters, ...)  the API key or the admin key

A key that is not set opens its routes, except that with only the API key set, admin routes
need the API key: setting one key never leaves uploads open to everyone. Start-up logs a
warning for every open class of routes. 401: no key or a wrong one; 403: the API key on an
admin route.

The rule lives in one app-wide dependency (:func:`authorizer`), keyed on method and path, so
routes added later are covered without remembering to protect them.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Literal

from fastapi import Request
from pydantic import SecretStr

from server.api.errors import ApiError
from server.config import Settings

log = logging.getLogger(__name__)

Access = Literal["open", "read", "admin"]
OPEN_PATHS = frozenset({"/health", "/metrics"})
CONSOLE_PREFIX = "/console/"  # the web console's static files (server.console): no data in them
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def required_access(method: str, path: str) -> Access:
    path = path.rstrip("/") or "/"
    if path in OPEN_PATHS:
        return "open"
    if method.upper() in READ_METHODS and (path == "/" or path.startswith(CONSOLE_PREFIX)):
        return "open"  # the console's page and files; POST / (generation) is not
    if path == "/admin" or path.startswith("/admin/"):
        return "admin"
    if (path == "/adapters" or path.startswith("/adapters/")) and method.upper() not in READ_METHODS:
        return "admin"
    return "read"


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _matches(token: str, key: SecretStr | None) -> bool:
    return key is not None and hmac.compare_digest(token.encode(), key.get_secret_value().encode())


def accepted_keys(settings: Settings, access: Access) -> list[SecretStr]:
    """The keys that open a route; an empty list means the route is open."""
    api, admin = settings.api_key, settings.admin_key
    if access == "open":
        return []
    if access == "admin":  # the admin key, else (only the API key set) the API key
        return [key for key in (admin or api,) if key is not None]
    return [api, *([admin] if admin is not None else [])] if api is not None else []


def check_access(settings: Settings, access: Access, token: str | None) -> None:
    """Raise 401/403 unless ``token`` grants ``access``."""
    accepted = accepted_keys(settings, access)
    if not accepted:
        return
    needs_admin = access == "admin" and settings.admin_key is not None
    what = "admin key (LORAPLEX_ADMIN_KEY)" if needs_admin else "API key"
    if token is None:
        raise _unauthorized(f"this route needs the {what}: send the header 'Authorization: Bearer <key>'.")
    if any(_matches(token, key) for key in accepted):
        return
    if needs_admin and _matches(token, settings.api_key):
        raise ApiError(
            403,
            "this route (upload, replace, delete, shrink, /admin) needs the admin key (LORAPLEX_ADMIN_KEY); "
            "the key sent is the API key, which allows generation and reads only.",
            "forbidden",
        )
    raise _unauthorized(f"the key sent is not valid for this route, which needs the {what}.")


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, "unauthorized", headers={"WWW-Authenticate": "Bearer"})


def authorizer(settings: Settings) -> Callable[[Request], Awaitable[None]]:
    """The app-wide dependency enforcing the key rule of the module docstring."""

    async def authorize(request: Request) -> None:
        access = required_access(request.method, request.url.path)
        check_access(settings, access, bearer_token(request.headers.get("authorization")))

    return authorize


def warn_if_open(settings: Settings) -> None:
    """Log, at start-up, which routes anyone who can reach the server may use."""
    if settings.api_key is None:
        log.warning(
            "LORAPLEX_API_KEY is not set: generation and read routes are open to anyone who can reach "
            "this server; set it to require 'Authorization: Bearer <key>'."
        )
    if settings.admin_key is None and settings.api_key is None:
        log.warning(
            "LORAPLEX_ADMIN_KEY is not set: uploading, replacing, deleting and shrinking adapters are open "
            "to anyone who can reach this server; set it to require the admin key."
        )
    elif settings.admin_key is None:
        log.warning(
            "LORAPLEX_ADMIN_KEY is not set: the API key also allows uploading, replacing and deleting "
            "adapters; set LORAPLEX_ADMIN_KEY to separate the two."
        )
