"""Run one HTTP request through an in-process ASGI app and stream its answer back in pieces.

Ray handles carry plain Python values, not sockets: the ingress sends a :class:`HttpCall` to a
deployment, which runs it through its own FastAPI app (middlewares, auth, error table and all)
and yields ``ResponseStart`` then the body's chunks as they are produced, so server-sent events
stream through the cluster token by token.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class HttpCall:
    """One HTTP request as the ingress received it (the body read whole)."""

    method: str
    path: str
    query_string: bytes = b""
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    client: tuple[str, int] = ("127.0.0.1", 0)


@dataclass(frozen=True)
class ResponseStart:
    """The status and headers of an answer: always the first item a forwarded call yields."""

    status: int
    headers: Headers


async def run_asgi(app: Any, call: HttpCall) -> AsyncIterator[ResponseStart | bytes]:
    """Yield ``ResponseStart`` then the body chunks of ``app``'s answer to ``call``.

    Closing the generator early (the client went away, Ray cancelled the call) tells the app the
    client disconnected, as uvicorn would, and waits for it to wind down.
    """
    messages: asyncio.Queue[dict | BaseException | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": call.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await messages.put(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": call.method,
        "scheme": "http",
        "path": call.path,
        "raw_path": call.path.encode(),
        "query_string": call.query_string,
        "root_path": "",
        "headers": call.headers,
        "client": call.client,
        "server": ("loraplex", 80),
    }

    async def run() -> None:
        try:
            await app(scope, receive, send)
            await messages.put(None)
        except BaseException as exc:  # surfaces in the consumer; cancellation included
            await messages.put(exc)

    task = asyncio.create_task(run())
    try:
        while True:
            message = await messages.get()
            if message is None:
                return
            if isinstance(message, BaseException):
                raise message
            if message["type"] == "http.response.start":
                yield ResponseStart(message["status"], list(message.get("headers", [])))
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    return
    finally:
        disconnected.set()
        if not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), timeout=10)
            task.cancel()
