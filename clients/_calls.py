"""What each client method sends and how its answer is read, shared by the sync and async clients.

The two clients differ only in how they wait for I/O; everything else (paths, payloads, the
upload's multipart parts, SSE parsing, errors) lives here once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import httpx

from clients.errors import LoraplexError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_TIMEOUT = 600.0  # seconds; generation of long outputs on a CPU takes a while
STREAM_ERROR_STATUS = {"timeout": 504, "cancelled": 499}  # an error event inside a 200 stream

Progress = Callable[[int, int], None]  # (bytes sent, total bytes)


@dataclass
class Call:
    """One HTTP request, not yet sent."""

    method: str
    path: str
    json: Any = None
    params: dict[str, Any] | None = None
    data: dict[str, str] | None = None
    files: list[tuple[str, tuple[str, BinaryIO, str]]] | None = None
    opened: list[BinaryIO] = field(default_factory=list)  # closed by the caller after sending

    def close(self) -> None:
        for handle in self.opened:
            handle.close()

    def send_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        for name in ("json", "params", "data", "files"):
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = value
        return kwargs


ADAPTER_PAGE = 100  # adapters per GET /adapters page the clients ask for (the server allows 1 to 1,000)


def adapters_page_call(prefix: str | None, cursor: str | None, page_size: int) -> Call:
    """One page of ``GET /adapters``: ``page_size`` summaries after ``cursor`` whose id starts with ``prefix``."""
    if not 1 <= page_size <= 1000:
        raise ValueError(f"page_size must be between 1 and 1000 (the server's page limit), got {page_size}")
    params: dict[str, Any] = {"limit": page_size}
    if prefix:
        params["prefix"] = prefix
    if cursor:
        params["cursor"] = cursor
    return Call("GET", "/adapters", params=params)


def next_cursor(response: httpx.Response) -> str | None:
    """The cursor of the next page (the ``X-Next-Cursor`` header); None on the last page, and from a
    server that does not page (it answers every adapter at once)."""
    return response.headers.get("X-Next-Cursor") or None


def adapter_path(adapter_id: str, suffix: str = "") -> str:
    return f"/adapters/{quote(adapter_id, safe='')}{suffix}"


def generate_call(
    prompt: str,
    *,
    stream: bool,
    adapter_id: str | None,
    max_new_tokens: int,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    stop: Iterable[str] | None,
    details: bool,
    extra: dict[str, Any],
) -> Call:
    parameters: dict[str, Any] = {
        "adapter_id": adapter_id,
        "max_new_tokens": max_new_tokens,
        "details": details,
    }
    optional = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed}
    parameters.update({k: v for k, v in optional.items() if v is not None})
    if stop:
        parameters["stop"] = list(stop)
    parameters.update(extra)
    return Call(
        "POST",
        "/generate_stream" if stream else "/generate",
        json={"inputs": prompt, "parameters": parameters},
    )


def upload_call(
    path: str | os.PathLike[str], adapter_id: str | None, replace: bool, progress: Progress | None
) -> Call:
    """A directory sends its two files as ``files`` parts; a file is sent as the ``archive`` part."""
    path = Path(path).expanduser()
    if path.is_dir():
        missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (path / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{path} is not a PEFT adapter directory: {', '.join(missing)} missing (save the adapter with "
                "PEFT's save_pretrained, which writes both files, or upload an archive holding them)."
            )
        sources = [("files", path / CONFIG_FILE, "application/json"),
                   ("files", path / WEIGHTS_FILE, "application/octet-stream")]  # fmt: skip
    elif path.is_file():
        sources = [("archive", path, "application/octet-stream")]
    else:
        raise FileNotFoundError(
            f"{path} does not exist; give an adapter directory or a .zip/.tar/.tar.gz archive."
        )
    counter = _Counter(sum(p.stat().st_size for _, p, _ in sources), progress)
    call = Call("POST", "/adapters", params={"replace": "true"} if replace else None, files=[])
    for field_name, file_path, content_type in sources:
        handle = _ProgressReader(file_path.open("rb"), counter)
        call.opened.append(handle)  # type: ignore[arg-type]
        call.files.append((field_name, (file_path.name, handle, content_type)))  # type: ignore[union-attr,arg-type]
    if adapter_id is not None:
        call.data = {"adapter_id": adapter_id}
    return call


def shrink_call(adapter_id: str, method: str, value: float, new_id: str) -> Call:
    return Call(
        "POST", adapter_path(adapter_id, "/shrink"), json={"method": method, "value": value, "new_id": new_id}
    )


def check(response: httpx.Response) -> httpx.Response:
    """Raise :class:`LoraplexError` for a 4xx/5xx answer (body already read)."""
    if response.status_code >= 400:
        raise LoraplexError.from_response(response.status_code, response.content, response.headers)
    return response


def unreachable(base_url: str, exc: httpx.TransportError) -> LoraplexError:
    if isinstance(exc, httpx.TimeoutException):
        return LoraplexError(
            0, "client_timeout", f"no answer from {base_url} in time ({exc!r}); raise the client's timeout."
        )
    return LoraplexError(
        0,
        "connection_error",
        f"cannot reach the server at {base_url} ({exc}); is it running (loraplex serve)? "
        "Point the client elsewhere with --url / LORAPLEX_URL.",
    )


def sse_payload(line: str) -> dict[str, Any] | None:
    """The JSON of one ``data:`` line of a loraplex stream; raises on an error event."""
    if not line.startswith("data:"):
        return None
    text = line[5:].strip()
    if not text or text == "[DONE]":
        return None
    payload = json.loads(text)
    if isinstance(payload, dict) and "error" in payload and "token" not in payload:
        error_type = payload.get("error_type") or "stream_error"
        raise LoraplexError(STREAM_ERROR_STATUS.get(error_type, 500), error_type, str(payload["error"]))
    return payload


class _Counter:
    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total = total
        self.sent = 0
        self.progress = progress

    def add(self, n: int) -> None:
        self.sent += n
        if self.progress is not None:
            self.progress(min(self.sent, self.total), self.total)


class _ProgressReader:
    """A binary file that reports the bytes read from it (httpx reads upload parts in chunks).

    ``fileno``/``seek``/``tell`` are passed through so httpx can size the body (a Content-Length
    instead of a chunked upload). Only bytes past the furthest point read so far count, so a
    rewind and re-read (httpx retries) does not count twice.
    """

    def __init__(self, handle: BinaryIO, counter: _Counter) -> None:
        self._handle = handle
        self._counter = counter
        self._furthest = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._handle.read(size)
        position = self._handle.tell()
        if position > self._furthest:
            self._counter.add(position - self._furthest)
            self._furthest = position
        return chunk

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._handle.seek(offset, whence)

    def tell(self) -> int:
        return self._handle.tell()

    def fileno(self) -> int:
        return self._handle.fileno()

    def close(self) -> None:
        self._handle.close()
