"""Logging for ``loraplex serve``: text or JSON lines, each record carrying its request id.

The request id comes from ``server.api.context`` (``x-request-id``), so every log line written
while a request is handled, the access line included, names it; lines outside a request carry
``-`` (text) or ``null`` (JSON).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Literal

from server.api.context import current_request_id

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
_EXTRA_FIELDS = ("tenant", "method", "path", "status", "duration_s")  # set by the access log line


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id (+ access fields, exc_info)."""

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        payload = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": None if request_id in (None, "-") else request_id,
        }
        for name in _EXTRA_FIELDS:
            if hasattr(record, name):
                payload[name] = getattr(record, name)
        if record.exc_info:
            payload["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def make_handler(log_format: Literal["text", "json"], stream=None) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    return handler


def configure_logging(level: str, log_format: Literal["text", "json"]) -> None:
    """Route every logger (uvicorn's too) through one handler on the root logger.

    Pair with ``uvicorn.run(..., log_config=None, access_log=False)``: uvicorn then leaves logging
    alone, and the access line comes from ``RequestContextMiddleware`` (with the request id).
    """
    root = logging.getLogger()
    root.handlers[:] = [make_handler(log_format)]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
