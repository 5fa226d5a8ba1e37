"""ASGI middleware around every request: request id, access log, generation metrics, deadline.

Pure ASGI (not ``BaseHTTPMiddleware``) so streamed responses pass through untouched and the
"end of the request" seen here is the last byte of the stream, not the first.

- ``x-request-id``: taken from the request when it is sane (at most 128 of ``A-Za-z0-9._:-``),
  else a new one; sent back on every response and put on every log record of the request.
- The text access log escapes the method and path (:func:`printable`); the JSON log's fields
  are escaped by JSON itself.
- Generation routes (``generation`` in ``server.api.routes``) get a deadline (``--request-timeout``) and are
  counted in ``loraplex_requests_total`` / ``loraplex_request_duration_seconds`` once they end.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.context import RequestContext, activate, deactivate
from server.api.load_control import QueueGate
from server.api.routes import rule_for
from server.metrics import Metrics

# Polled (by machines, by the console's live view every second): access-logged at debug level.
QUIET_ROUTES = frozenset({"/health", "/metrics", "/info"})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

access_log = logging.getLogger("loraplex.access")


class RequestContextMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        gate: QueueGate,
        request_timeout: float | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.gate = gate
        self.request_timeout = request_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path = scope["path"].rstrip("/") or "/"
        generation = rule_for(scope["method"], path).generation  # POST only: GET / is the console
        context = RequestContext(
            request_id=_request_id(scope),
            route=path,
            started=started,
            metrics=self.metrics if generation else None,
            gate=self.gate if generation else None,
        )
        if generation and self.request_timeout is not None:
            context.timeout = self.request_timeout
            context.deadline = started + self.request_timeout
        status = 500  # what the client gets if the app raises before answering

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append("x-request-id", context.request_id)
            await send(message)

        token = activate(context)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            for callback in context.on_close:
                callback()
            seconds = time.perf_counter() - started
            final = context.outcome_status or status
            if generation:
                self.metrics.observe_request(path, context.adapter_label, final, seconds, context.tenant)
            level = logging.DEBUG if path in QUIET_ROUTES else logging.INFO
            access_log.log(
                level,
                '"%s %s" %d %.3fs tenant=%s',
                printable(scope["method"]),
                printable(scope["path"]),  # decoded: '%0a' is a newline, which must not start a line
                final,
                seconds,
                context.tenant,
                extra={
                    "tenant": context.tenant,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": final,
                    "duration_s": seconds,
                },
            )
            deactivate(token)


def printable(text: str) -> str:
    """``text`` with control characters, non-ASCII and quotes escaped (``\\n``, ``\\x1b``, ``\\"``):
    a request can never write a forged line, or terminal escapes, into the text access log."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return text
    return text.encode("unicode_escape").decode("ascii").replace('"', '\\"')


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _REQUEST_ID.match(candidate):
                return candidate
            break
    return uuid.uuid4().hex
