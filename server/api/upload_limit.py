"""ASGI middleware: answer 413 as soon as an upload's body passes the limit, without buffering it.

Two checks on the guarded routes (``POST /adapters``):

1. a ``Content-Length`` above the limit is refused before a byte of the body is read;
2. otherwise (chunked bodies, or a client that lies) the bytes are counted as the app reads
   them; the read that passes the limit raises inside the app, whatever the app then answers
   is dropped, and the client gets the 413 instead.

The app itself spools multipart file parts to temporary files, so memory stays bounded by
the parser's chunk size, never by the body.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class UploadTooLarge(Exception):
    """Raised inside the app's ``receive`` when the body passes the limit."""


class UploadLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, paths: tuple[str, ...] = ("/adapters",)) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.paths = frozenset(p.rstrip("/") for p in paths)

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
        exceeded = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            if exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise UploadTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # the app's answer to a cut-off body is replaced by the 413 below
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await self._refuse(send, None)

    async def _refuse(self, send: Send, declared: int | None) -> None:
        limit_mb = self.max_bytes / (1 << 20)
        size = f" ({declared} bytes)" if declared is not None else ""
        body = json.dumps(
            {
                "error": f"the upload{size} is larger than the server's limit of {limit_mb:g} MiB "
                "(--max-upload-mb); upload a smaller adapter (e.g. a lower rank) or raise the limit.",
                "error_type": "too_large",
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
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
