"""Access control: the API and admin keys, and tenants' keys (load control is in ``load_control.py``).

Keys are Bearer tokens (``Authorization: Bearer <key>``), compared in constant time. Which class
a route is in comes from the route table (``server.api.routes``):

    route (access class)                                   needs
    /health, /metrics (open)                               nothing (always open)
    GET / and /console/* (open: the console's files)       nothing (its data calls carry the key)
    /admin/* (admin)                                       the admin key (LORAPLEX_ADMIN_KEY)
    /adapters* except GET/HEAD (manage)                    the admin key, or a tenant's key (its own)
    everything else (read: generation, GET /adapters, ...) the API key, the admin key or a tenant's key

A key that is not set opens its routes, except that with only the API key set, admin routes
need the API key: setting one key never leaves uploads open to everyone. Start-up logs a
warning for every open class of routes. 401: no key or a wrong one; 403: the API key on an
admin or manage route, a tenant's key on an admin route. Who the caller is (:class:`Principal`:
admin, default tenant, a tenant) decides which adapters it sees (``server.api.tenancy``).

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
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fastapi import Request
from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.context import current
from server.api.errors import ApiError, send_error
from server.api.principal import ADMIN, DEFAULT, Principal
from server.api.routes import READ_METHODS, Access, rule_for
from server.config import Settings

if TYPE_CHECKING:
    from adapters.tenants import TenantTable

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
    """The operator's keys that open a route; an empty list means the route is open. Tenants' keys
    (``adapters.tenants``) open ``read`` and ``manage`` routes wherever these are keyed."""
    api, admin = settings.api_key, settings.admin_key
    if access == "open":
        return []
    if access in ("admin", "manage"):  # the admin key, else (only the API key set) the API key
        return [key for key in (admin or api,) if key is not None]
    return [api, *([admin] if admin is not None else [])] if api is not None else []


def identify(settings: Settings, token: str | None, tenants: TenantTable | None = None) -> Principal | None:
    """Whose key ``token`` is: the admin, the default tenant (the API key), a tenant, or None."""
    if token is None:
        return None
    if _matches(token, settings.admin_key):
        return ADMIN
    if _matches(token, settings.api_key):  # with no admin key set, the API key is the admin's too
        return ADMIN if settings.admin_key is None else DEFAULT
    tenant = tenants.identify(token) if tenants is not None else None
    return Principal("tenant", tenant) if tenant is not None else None


def keyless(settings: Settings) -> Principal:
    """Who a caller without a valid key is on an open route: the admin while no key is set at all
    (every route is open, as before tenants), else the default tenant (the shared adapters)."""
    return ADMIN if settings.admin_key is None and settings.api_key is None else DEFAULT


def authenticate(
    settings: Settings, access: Access, token: str | None, tenants: TenantTable | None = None
) -> Principal:
    """The caller of a route needing ``access``; 401 (no key, a wrong one), 403 (a key of too little rights)."""
    who = identify(settings, token, tenants)
    if not accepted_keys(settings, access):
        return who or keyless(settings)
    if who is not None:
        if who.kind == "admin" or access == "read" or (access == "manage" and who.kind == "tenant"):
            return who
        if who.kind == "tenant":
            raise ApiError(
                403,
                f"this route needs the admin key (LORAPLEX_ADMIN_KEY); the key sent is tenant {who.label!r}'s, "
                "which uses and manages its own adapters only.",
                "forbidden",
            )
        raise ApiError(
            403,
            "this route (upload, replace, delete, shrink, /admin) needs the admin key (LORAPLEX_ADMIN_KEY); "
            "the key sent is the API key, which allows generation and reads only.",
            "forbidden",
        )
    needs_admin = access in ("admin", "manage") and settings.admin_key is not None
    what = "admin key (LORAPLEX_ADMIN_KEY)" if needs_admin else "API key"
    if access == "manage" and settings.admin_key is not None:
        what = "admin key (LORAPLEX_ADMIN_KEY) or a tenant's key"
    if token is None:
        raise _unauthorized(f"this route needs the {what}: send the header 'Authorization: Bearer <key>'.")
    raise _unauthorized(f"the key sent is not valid for this route, which needs the {what}.")


def check_access(
    settings: Settings, access: Access, token: str | None, tenants: TenantTable | None = None
) -> None:
    """Raise 401/403 unless ``token`` grants ``access``."""
    authenticate(settings, access, token, tenants)


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, "unauthorized", headers={"WWW-Authenticate": "Bearer"})


TenantSource = Callable[[], "TenantTable | None"]
PRINCIPAL = "loraplex.principal"  # the ASGI scope key holding the request's Principal


def principal_of(request: Request) -> Principal:
    """The caller, as :class:`AccessMiddleware` (or :func:`authorizer`) identified it."""
    found = request.scope.get(PRINCIPAL)
    if found is None:  # an app without the middleware (unit tests): the dependency's answer
        settings = getattr(request.app.state, "settings", None)
        return keyless(settings) if settings is not None else ADMIN
    return found


def app_tenants(app: Any) -> TenantTable | None:
    """The tenant table of the store an app opened (None before its lifespan opened it)."""
    store = getattr(app.state, "store", None)
    return getattr(store, "tenants", None)


def _remember(scope: Scope, principal: Principal) -> None:
    scope[PRINCIPAL] = principal
    context = current()
    if context is not None:
        context.tenant = principal.label
        context.tenant_id = principal.tenant.id if principal.tenant is not None else None


def authorizer(settings: Settings) -> Callable[[Request], Awaitable[None]]:
    """The app-wide dependency enforcing the key rule of the module docstring."""

    async def authorize(request: Request) -> None:
        access = required_access(request.method, request.url.path)
        token = bearer_token(request.headers.get("authorization"))
        _remember(request.scope, authenticate(settings, access, token, app_tenants(request.app)))

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


def screen(
    settings: Settings, method: str, path: str, headers: Headers, tenants: TenantTable | None = None
) -> ApiError | None:
    """The refusal (Host, key, cross-site rules) a request gets before its body is read, if any."""
    answer = admit(settings, method, path, headers, tenants)
    return answer if isinstance(answer, ApiError) else None


def admit(
    settings: Settings, method: str, path: str, headers: Headers, tenants: TenantTable | None = None
) -> ApiError | Principal:
    """:func:`screen`'s refusal, or the caller it let in."""
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
        principal = authenticate(settings, access, bearer_token(headers.get("authorization")), tenants)
    except ApiError as error:
        return error
    if not accepted_keys(settings, access) and method.upper() not in READ_METHODS and cross_site(headers):
        return ApiError(
            403,
            "cross-site requests may not change this server while it runs without keys: send the "
            "request from a page of this server or a non-browser client, or set LORAPLEX_ADMIN_KEY.",
            "cross_site",
        )
    return principal


class AccessMiddleware:
    """Pure ASGI: answers :func:`screen`'s refusal before the app runs or reads the body."""

    def __init__(self, app: ASGIApp, settings: Settings, tenants: TenantSource = lambda: None) -> None:
        self.app = app
        self.settings = settings
        self.tenants = tenants

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            answer = admit(
                self.settings, scope["method"], scope["path"], Headers(scope=scope), self.tenants()
            )
            if isinstance(answer, ApiError):
                await send_error(send, scope["path"], answer)
                return
            _remember(scope, answer)
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
