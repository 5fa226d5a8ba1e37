"""One error shape for the whole API: ``{"error": message, "error_type": kind}``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.peft_format import AdapterError
from server.engine.engine import RequestRejected

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


def adapter_not_found(adapter_id: str) -> ApiError:
    return ApiError(
        404,
        f"adapter {adapter_id!r} is not known to this server; list adapters with GET /adapters "
        "or upload it with POST /adapters.",
        "adapter_not_found",
    )


def error_response(status_code: int, message: str, error_type: str, headers: dict[str, str] | None = None):
    return JSONResponse(
        {"error": message, "error_type": error_type}, status_code=status_code, headers=headers
    )


def _format_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        location = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{location}: {err.get('msg')}" if location else str(err.get("msg")))
    return "invalid request: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status_code, exc.message, exc.error_type, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, _format_validation(exc), "validation")

    @app.exception_handler(RequestRejected)
    async def _rejected(_: Request, exc: RequestRejected) -> JSONResponse:
        return error_response(422, str(exc), "validation")

    @app.exception_handler(AdapterError)
    async def _adapter(_: Request, exc: AdapterError) -> JSONResponse:
        return error_response(422, exc.message, exc.error_type)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), "http", getattr(exc, "headers", None))
