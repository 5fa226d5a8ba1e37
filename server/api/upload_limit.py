"""ASGI middleware: answer 413 as soon as a body passes its limit, without buffering it, and 408
when an upload's body takes longer than ``--upload-timeout`` to arrive.

Uploads (``POST /adapters``) may be ``max_bytes`` long (``--max-upload-mb``); every other request's
body ``body_max_bytes`` (``--max-body-kb``), checked the same way and before anything parses it
(JSON, form), so a huge body costs the server no more memory than the limit. Three checks:

1. a ``Content-Length`` above the limit is refused before a byte of the body is read;
2. otherwise (chunked bodies, or a client that lies) the bytes are counted as the app reads
   them; the read that passes the limit raises inside the app, whatever the app then answers
   is dropped, and the client gets the 413 instead;
3. (uploads) the whole body must arrive within ``timeout`` seconds of the request: a client that trickles
   it byte by byte (or stalls) is answered 408 and its connection closed. Each read waits on the
   event loop, so a slow client never holds up other requests; the deadline bounds what it holds
   (a connection, a spooled temporary file).

The app itself spools multipart file parts to temporary files, so memory stays bounded by
the parser's chunk size, never by the body.
"""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import ApiError, send_error, upload_timed_out
from server.api.routes import rule_for

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
        timeout: float | None = None,
        body_max_bytes: int | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.body_max_bytes = body_max_bytes  # None: other routes' bodies are not limited here

    def _upload(self, scope: Scope) -> bool:
        return rule_for(scope["method"], scope["path"]).upload  # POST /adapters (server.api.routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = self._upload(scope)
        limit = self.max_bytes if upload else self.body_max_bytes
        if limit is None:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await send_error(send, scope["path"], self._too_large(declared, upload))
            return

        received = 0
        exceeded = timed_out = False
        started = False
        timeout = self.timeout if upload else None
        deadline = time.monotonic() + timeout if timeout is not None else None

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
                if received > limit:
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
            await send_error(send, scope["path"], self._too_large(None, upload))
        elif timed_out:
            log.warning("upload cut off: %d bytes in %g s (--upload-timeout)", received, self.timeout)
            await send_error(send, scope["path"], upload_timed_out(self.timeout or 0.0, received))

    def _too_large(self, declared: int | None, upload: bool) -> ApiError:
        size = f" ({declared} bytes)" if declared is not None else ""
        if upload:
            message = (
                f"the upload{size} is larger than the server's limit of {self.max_bytes / (1 << 20):g} MiB "
                "(--max-upload-mb); upload a smaller adapter (e.g. a lower rank) or raise the limit."
            )
        else:
            message = (
                f"the request body{size} is larger than the server's limit of "
                f"{(self.body_max_bytes or 0) // 1024} KiB (--max-body-kb); send a shorter prompt "
                "or fewer messages, or ask the operator to raise the limit."
            )
        return ApiError(413, message, "too_large")


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
