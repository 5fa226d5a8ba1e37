"""A real ``loraplex serve`` process on loopback, for tests that kill, stop or starve it.

Crash, shutdown and fault tests need the process boundary (SIGKILL, SIGTERM, exit status,
start-up repair on restart), so the server runs as ``python -m server.cli serve`` with a tiny
model saved to disk. Every wait here polls a condition with a deadline: no bare sleeps.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.adapter_files import CONFIG, WEIGHTS

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], object], timeout: float, what: str, poll: float = 0.02) -> object:
    """Poll ``condition`` until it returns a true value (returned); fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)


class ServerProcess:
    """``loraplex serve --model <model_dir> --data-dir <data_dir>``; returns once /health is 200."""

    def __init__(
        self,
        model_dir: Path,
        data_dir: Path,
        log: Path,
        *args: str,
        env: dict[str, str] | None = None,
        ready: bool = True,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "LORAPLEX_MAX_UPLOAD_MB": "64", **(env or {})}
        command = [
            *(sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)),
            *("--model", str(model_dir), "--data-dir", str(data_dir), "--log-level", "warning"),
            *("--cache-dir", str(data_dir.parent / "cache")),
            *args,
        ]
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            command, cwd=REPO, env=full_env, stdout=self.log, stderr=subprocess.STDOUT
        )
        if ready:
            self.wait_ready()

    def wait_ready(self, timeout: float = 120) -> None:
        def healthy() -> bool:
            assert self.proc.poll() is None, f"server exited: {self.log_text()[-3000:]}"
            try:
                return httpx.get(self.url + "/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, timeout, f"the server to start (log: {self.log_path})", poll=0.1)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(30)
        self.log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.log.close()


def multipart_upload(adapter_id: str, config: bytes, weights: bytes) -> tuple[bytes, bytes]:
    """The head and body of ``POST /adapters`` (two file parts), for clients that send bytes by hand."""
    boundary = "slowboundary"
    part = 'Content-Disposition: form-data; name="files"; filename="{}"\r\n\r\n'
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="adapter_id"\r\n\r\n{adapter_id}\r\n'
        f"--{boundary}\r\n{part.format(CONFIG)}".encode()
        + config
        + f"\r\n--{boundary}\r\n{part.format(WEIGHTS)}".encode()
        + weights
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        "POST /adapters HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head, body


class SlowUpload:
    """An upload sent by hand: the head and half the body at once, the rest when told (or never)."""

    def __init__(self, url: str, config: bytes, weights: bytes, adapter_id: str = "slow") -> None:
        head, body = multipart_upload(adapter_id, config, weights)
        half = len(body) // 2
        self.rest = body[half:]
        port = int(url.rsplit(":", 1)[1])
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(head + body[:half])

    def finish(self, timeout: float = 30) -> tuple[int, bytes]:
        """Send the rest of the body; the response's status and raw bytes."""
        self.sock.sendall(self.rest)
        return read_response(self.sock, timeout)

    def close(self) -> None:
        self.sock.close()


def read_response(sock: socket.socket, timeout: float) -> tuple[int, bytes]:
    """Read one HTTP response (until its body's Content-Length, or the connection closes)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        None,
    )
    while length is not None and len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body
