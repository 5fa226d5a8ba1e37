"""The error responses a route documents in the OpenAPI contract (``responses=`` of a route).

Every refusal has the body ``{"error": message, "error_type": kind}`` (``ErrorResponse``); the
OpenAI routes have OpenAI's shape instead (``OpenAIErrorResponse``). A route lists each status
it can answer, so generated clients and fuzzers know them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from server.api.schemas import ErrorResponse

DESCRIPTIONS = {
    400: "Bad request (a malformed id, body or form), or a Host the server does not answer to "
    "(error_type `host_not_allowed`, --allowed-hosts)",
    401: "No API key, or a wrong one (when LORAPLEX_API_KEY / LORAPLEX_ADMIN_KEY are set)",
    403: "The API key on an admin route, or a cross-site browser request while no keys are set "
    "(error_type `cross_site`)",
    404: "Unknown adapter (or model)",
    409: "The id exists (use ?replace=true)",
    413: "Body over --max-upload-mb (uploads) or --max-body-kb (every other route)",
    422: "Validation failed: the message names the field and the allowed values",
    424: "Generation failed (error_type `generation`)",
    429: "Over --max-queue (error_type `overloaded`); retry after `Retry-After` seconds",
    499: "The client went away before the answer",
    500: "Internal error",
    408: "The upload's body did not arrive within --upload-timeout (error_type `upload_timeout`)",
    503: "The model is still loading (error_type `not_ready`), or the server is shutting down "
    "(error_type `shutting_down`, retry after `Retry-After` seconds)",
    504: "Over --request-timeout (error_type `timeout`)",
    507: "The disk is full: the upload was not stored (error_type `insufficient_storage`)",
}


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorResponse(BaseModel):
    error: OpenAIError


def error_responses(*codes: int, model: type[BaseModel] = ErrorResponse) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: each status in ``codes`` with the error schema."""
    return {code: {"model": model, "description": DESCRIPTIONS.get(code, "Error")} for code in codes}
