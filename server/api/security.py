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

The rule is applied by :class:`AccessMiddleware`, before the app reads a byte of the body (a
caller without the key costs no parsing and no memory), and again by one app-wide dependency
(:func:`authorizer`); both are keyed on method and path, so routes added later are covered
without remembering to protect them. The Ray ingress applies the same :func:`screen`.

Where routes are open (no keys set), a browser is the remaining way in for a remote attacker, so
:func:`screen` also refuses (see docs/security.md):

- a ``Host`` header that is not loopback, ``--host`` or one of ``--allowed-hosts`` while the
  API key is unset (DNS rebinding), except on /health and /metrics (probes name any host);
  ``--allowed-hosts '*'`` accepts any;
- a state-changing request (not GET/HEAD/OPTIONS) on an open route sent cross-site by a browser
  (``Sec-Fetch-Site: cross-site``/``same-site``, or an ``Origin`` that is not the ``Host``): a
  plain HTML form can post multipart to any URL without a CORS preflight.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from fastapi import Request
from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.errors import ApiError, send_error
from server.api.routes import READ_METHODS, Access, rule_for
from server.config import Settings

log = logging.getLogger(__name__)


def required_access(method: str, path: str) -> Access:
    """The key class ``method path`` needs, from the route table (``server.api.routes``)."""
    return rule_for(method, path).access


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


LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
ANY_ADDRESS = frozenset({"", "0.0.0.0", "::"})
SAFE_FETCH_SITES = frozenset({"same-origin", "none"})  # Sec-Fetch-Site values of non-cross-site requests


def host_name(host: str) -> str:
    """``Host``/``Origin`` authority -> the bare, lower-case name: ``[::1]:8080`` -> ``::1``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name.rstrip(".")


def allowed_host(settings: Settings, host: str | None) -> bool:
    """Whether a request's ``Host`` is one this server answers to (see the module docstring)."""
    allowed = {host_name(h) for h in settings.allowed_hosts}
    if "*" in allowed or host is None or (settings.api_key is not None and not allowed):
        return True  # keys protect every route: a rebound name gets nothing without them
    own = host_name(settings.host)
    return host_name(host) in LOOPBACK_HOSTS | allowed | ({own} - ANY_ADDRESS)


def cross_site(headers: Headers) -> bool:
    """A browser's cross-site request: ``Sec-Fetch-Site``, else an ``Origin`` other than ``Host``."""
    site = headers.get("sec-fetch-site")
    if site is not None:
        return site.strip().lower() not in SAFE_FETCH_SITES
    origin = headers.get("origin")
    if origin is None:
        return False  # not a browser's cross-origin request (browsers send Origin on those)
    netloc = urlsplit(origin.strip()).netloc.lower() if origin.strip() != "null" else "null"
    return netloc != (headers.get("host") or "").strip().lower()


def screen(settings: Settings, method: str, path: str, headers: Headers) -> ApiError | None:
    """The refusal (Host, key, cross-site rules) a request gets before its body is read, if any."""
    host = headers.get("host")
    access = required_access(method, path)
    if access != "open" and not allowed_host(settings, host):  # probes may name any Host on /health
        return ApiError(
            400,
            f"this server does not answer to the Host {host!r}: open it by its loopback address, or "
            "start it with --allowed-hosts naming this host (or set LORAPLEX_API_KEY).",
            "host_not_allowed",
        )
    try:
        check_access(settings, access, bearer_token(headers.get("authorization")))
    except ApiError as error:
        return error
    if not accepted_keys(settings, access) and method.upper() not in READ_METHODS and cross_site(headers):
        return ApiError(
            403,
            "cross-site requests may not change this server while it runs without keys: send the "
            "request from a page of this server or a non-browser client, or set LORAPLEX_ADMIN_KEY.",
            "cross_site",
        )
    return None


class AccessMiddleware:
    """Pure ASGI: answers :func:`screen`'s refusal before the app runs or reads the body."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            error = screen(self.settings, scope["method"], scope["path"], Headers(scope=scope))
            if error is not None:
                await send_error(send, scope["path"], error)
                return
        await self.app(scope, receive, send)


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
