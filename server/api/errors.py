"""One error table for the whole API: each kind of error has one status and one ``error_type``.

Every router raises (or lets through) the exceptions below; :func:`as_api_error` turns any of
them into an :class:`ApiError`, and the handlers render it: ``{"error": message, "error_type":
kind}`` on loraplex's routes, OpenAI's ``{"error": {"message", "type", "param", "code"}}`` on
the OpenAI routes (``server.api.openai``), with the same status either way.

    exception (most specific first)      status   error_type
    ApiError                             its own  its own
    InvalidAdapterId                     400      invalid_adapter_id
    UnknownAdapter                       404      adapter_not_found
    AdapterExists                        409      adapter_exists (SourceConflict: source_conflict)
    StoreNotReady                        503      not_ready
    SourceUnavailable (S3 unreachable)   503      source_unavailable
    StoreFull (disk or quota full)       507      insufficient_storage
    QuotaExceeded (a tenant's quota)     429      quota_exceeded
    SharedAdapter (a tenant changing it) 403      forbidden
    UnknownTenant / TenantExists         404/409  tenant_not_found / tenant_exists
    StoreError (any other)               400      its own
    ArchiveError too_large               413      too_large
    ArchiveError invalid_upload          400      invalid_upload
    AdapterError (ArchiveError too)      422      its own (invalid_adapter, invalid_config, ...)
    RequestRejected                      422      validation
    RequestValidationError               422      validation
    HTTPException                        its own  http

Raised as ApiError by the app-wide rules, built here so the statuses stay in this one table:

    shutting_down()   (SIGTERM drain)    503      shutting_down, Retry-After
    upload_timed_out() (slow body)       408      upload_timeout

This module imports no model code (no torch): a test checks it.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

from adapters.errors import (
    AdapterError,
    AdapterExists,
    ArchiveError,
    InvalidAdapterId,
    QuotaExceeded,
    SharedAdapter,
    SourceUnavailable,
    StoreError,
    StoreFull,
    StoreNotReady,
    TenantExists,
    UnknownAdapter,
    UnknownTenant,
)
from server.engine.errors import RequestRejected

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(
        self, status_code: int, message: str, error_type: str, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.error_type = error_type
        self.headers = headers


STORE_STATUS: dict[type[StoreError], int] = {
    InvalidAdapterId: 400,
    UnknownAdapter: 404,
    AdapterExists: 409,
    StoreNotReady: 503,
    SourceUnavailable: 503,
    StoreFull: 507,
    QuotaExceeded: 429,
    SharedAdapter: 403,
    UnknownTenant: 404,
    TenantExists: 409,
}
ARCHIVE_STATUS = {"too_large": 413, "invalid_upload": 400}
HANDLED: tuple[type[Exception], ...] = (
    ApiError,
    StoreError,
    AdapterError,
    RequestRejected,
    RequestValidationError,
    StarletteHTTPException,
)


def as_api_error(exc: Exception) -> ApiError:
    """The table above, applied to one of the ``HANDLED`` exceptions."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, StoreError):
        status = next((s for kind, s in STORE_STATUS.items() if isinstance(exc, kind)), 400)
        return ApiError(status, exc.message, exc.error_type)
    if isinstance(exc, ArchiveError):
        return ApiError(ARCHIVE_STATUS.get(exc.error_type, 422), exc.message, exc.error_type)
    if isinstance(exc, AdapterError):
        return ApiError(422, exc.message, exc.error_type)
    if isinstance(exc, RequestRejected):
        return ApiError(422, str(exc), "validation")
    if isinstance(exc, RequestValidationError):
        return ApiError(422, format_validation(exc), "validation")
    if isinstance(exc, StarletteHTTPException):
        return ApiError(exc.status_code, str(exc.detail), "http", getattr(exc, "headers", None))
    raise TypeError(f"{type(exc).__name__} is not in the error table")


def adapter_not_found(adapter_id: str) -> ApiError:
    return ApiError(
        404,
        f"adapter {adapter_id!r} is not known to this server; list adapters with GET /adapters "
        "or upload it with POST /adapters.",
        "adapter_not_found",
    )


def shutting_down(retry_after: int) -> ApiError:
    """A request that arrived after SIGTERM (see ``server.api.drain``)."""
    return ApiError(
        503,
        f"the server is shutting down and takes no new requests; retry in {retry_after} s (against the "
        "restarted server or another replica).",
        "shutting_down",
        headers={"Retry-After": str(retry_after)},
    )


def upload_timed_out(seconds: float, received: int) -> ApiError:
    """An upload whose body did not arrive within ``--upload-timeout`` (a stalled or trickling client)."""
    return ApiError(
        408,
        f"the upload's body did not arrive within {seconds:g} s (--upload-timeout; {received} bytes came); "
        "the connection is closed. Send the whole body at once, from a faster link, or ask the operator "
        "to raise --upload-timeout.",
        "upload_timeout",
    )


def error_response(status_code: int, message: str, error_type: str, headers: dict[str, str] | None = None):
    return JSONResponse(
        {"error": message, "error_type": error_type}, status_code=status_code, headers=headers
    )


_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def error_payload(path: str, status: int, message: str, error_type: str) -> dict:
    """An error body for ``path``: OpenAI's shape on ``/v1/*``, loraplex's elsewhere (for answers
    sent by ASGI middleware, before the routes' own handlers could render them)."""
    if not path.startswith("/v1/"):
        return {"error": message, "error_type": error_type}
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": error_type}}


async def send_error(send: Send, path: str, error: ApiError) -> None:
    """Answer ``error`` from ASGI middleware and close the connection (the body is never read)."""
    body = json.dumps(error_payload(path, error.status_code, error.message, error.error_type)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *((k.lower().encode(), v.encode("latin-1")) for k, v in (error.headers or {}).items()),
    ]
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def format_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        location = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{location}: {msg}" if location else msg)
    return "invalid request: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    """Render every exception of the table as ``{"error", "error_type"}`` with its status."""

    async def handle(_: Request, exc: Exception) -> JSONResponse:
        error = as_api_error(exc)
        return error_response(error.status_code, error.message, error.error_type, error.headers)

    for kind in HANDLED:
        app.add_exception_handler(kind, handle)
