"""The one exception the client raises for a refused request."""

from __future__ import annotations

import json
from typing import Any


class LoraplexError(Exception):
    """The server refused a request, or could not be reached.

    ``status_code`` is the HTTP status (0 when no answer came back), ``error_type`` the server's
    kind (``adapter_not_found``, ``validation``, ``unauthorized``, ``overloaded``, ``timeout``...),
    ``message`` the server's own explanation.
    """

    def __init__(self, status_code: int, error_type: str, message: str, *, retry_after: float | None = None):
        super().__init__(
            f"{status_code} {error_type}: {message}" if status_code else f"{error_type}: {message}"
        )
        self.status_code = status_code
        self.error_type = error_type
        self.message = message
        self.retry_after = retry_after  # seconds, from Retry-After (429)

    @classmethod
    def from_response(cls, status_code: int, body: bytes, headers: Any = None) -> LoraplexError:
        error_type, message = parse_error_body(body)
        retry = headers.get("retry-after") if headers is not None else None
        try:
            retry_after = float(retry) if retry is not None else None
        except ValueError:
            retry_after = None
        return cls(status_code, error_type or f"http_{status_code}", message, retry_after=retry_after)


def parse_error_body(body: bytes | str) -> tuple[str | None, str]:
    """(error_type, message) from loraplex's ``{"error", "error_type"}``, OpenAI's
    ``{"error": {"message", "code"}}``, or any other body (its text)."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        data = json.loads(text)
    except ValueError:
        return None, text.strip() or "no message"
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, str):
            return data.get("error_type"), error
        if isinstance(error, dict):
            return error.get("code") or error.get("type"), str(error.get("message", error))
        if "detail" in data:
            return None, str(data["detail"])
    return None, text.strip()
