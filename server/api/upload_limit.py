"""ASGI middleware: answer 413 as soon as an upload's body passes the limit, without buffering it,
and 408 when the body takes longer than ``--upload-timeout`` to arrive.

Three checks on the guarded routes (``POST /adapters``):

1. a ``Content-Length`` above the limit is refused before a byte of the body is read;
2. otherwise (chunked bodies, or a client that lies) the bytes are counted as the app reads
   them; the read that passes the limit raises inside the app, whatever the app then answers
   is dropped, and the client gets the 413 instead;
3. the whole body must arrive within ``timeout`` seconds of the request: a client that trickles
   it byte by byte (or stalls) is answered 408 and its connection closed. Each read waits on the
   event loop, so a slow client never holds up other requests; the deadline bounds what it holds
   (a connection, a spooled temporary file).

The app itself spools multipart file parts to temporary files, so memory stays bounded by
the parser's chunk size, never by the body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import upload_timed_out

log = logging.getLogger(__name__)


class UploadTooLarge(Exception):
    """Raised inside the app's ``receive`` when the body passes the limit."""


class UploadTooSlow(Exception):
    """Raised inside the app's ``receive`` when the body has not arrived by the deadline."""


class UploadLimitMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        paths: tuple[str, ...] = ("/adapters",),
        timeout: float | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.paths = frozenset(p.rstrip("/") for p in paths)
        self.timeout = timeout

    def _guarded(self, scope: Scope) -> bool:
        return (
            scope["type"] == "http" and scope["method"] == "POST" and scope["path"].rstrip("/") in self.paths
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._guarded(scope):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(send, declared)
            return

        received = 0
        exceeded = timed_out = False
        started = False
        deadline = time.monotonic() + self.timeout if self.timeout is not None else None

        async def counting_receive() -> Message:
            nonlocal received, exceeded, timed_out
            if exceeded or timed_out:
                return {"type": "http.disconnect"}
            if deadline is None:
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
                except asyncio.TimeoutError:
                    timed_out = True
                    raise UploadTooSlow() from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise UploadTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded or timed_out:
                return  # the app's answer to a cut-off body is replaced by the 413/408 below
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not (exceeded or timed_out):
                raise
        if started:
            return
        if exceeded:
            await self._refuse(send, None)
        elif timed_out:
            log.warning("upload cut off: %d bytes in %g s (--upload-timeout)", received, self.timeout)
            error = upload_timed_out(self.timeout or 0.0, received)
            await _send_json(send, 408, {"error": error.message, "error_type": error.error_type})

    async def _refuse(self, send: Send, declared: int | None) -> None:
        limit_mb = self.max_bytes / (1 << 20)
        size = f" ({declared} bytes)" if declared is not None else ""
        payload = {
            "error": f"the upload{size} is larger than the server's limit of {limit_mb:g} MiB "
            "(--max-upload-mb); upload a smaller adapter (e.g. a lower rank) or raise the limit.",
            "error_type": "too_large",
        }
        await _send_json(send, 413, payload)


async def _send_json(send: Send, status: int, payload: dict) -> None:
    """An error answer that also closes the connection (the rest of the body is never read)."""
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
