"""A real server process killed (SIGKILL) in the middle of uploads restarts with a consistent store.

The server runs as ``python -m server.cli serve`` on 127.0.0.1 with a tiny model saved to disk.
While a slow client streams a large upload and another client uploads adapters back to back,
the process is killed; after a restart every acknowledged (201) adapter is listed and servable
with the same outputs, the half-sent upload left nothing, and the data dir holds exactly the
listed adapters' folders and no staging leftovers.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.adapter_files import CONFIG, WEIGHTS, files_parts, make_adapter

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, model_dir: Path, data_dir: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "LORAPLEX_MAX_UPLOAD_MB": "64"}
        command = [
            *(sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)),
            *("--model", str(model_dir), "--data-dir", str(data_dir), "--log-level", "warning"),
            *("--cache-dir", str(data_dir.parent / "cache")),
        ]
        self.log = log.open("ab")
        self.proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, f"server exited: {log.read_text()[-3000:]}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"server did not start: {log.read_text()[-3000:]}"
            time.sleep(0.1)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.log.close()


@pytest.fixture
def model_dir(tiny_base, tokenizer, tmp_path) -> Path:
    path = tmp_path / "tiny-model"
    tiny_base.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def servers(model_dir, tmp_path) -> Iterator:
    started: list[ServerProcess] = []

    def start() -> ServerProcess:
        server = ServerProcess(model_dir, tmp_path / "data", tmp_path / "server.log")
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.kill()


def generate(url: str, adapter_id: str) -> str:
    body = {"inputs": "Hello", "parameters": {"adapter_id": adapter_id, "max_new_tokens": 8}}
    r = httpx.post(url + "/generate", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["generated_text"]


def start_slow_upload(url: str, config: bytes, weights: bytes) -> socket.socket:
    """Send the headers and about half of a multipart body, then stall (a slow client)."""
    boundary = "slowboundary"
    part = 'Content-Disposition: form-data; name="files"; filename="{}"\r\n\r\n'
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="adapter_id"\r\n\r\nslow\r\n'
        f"--{boundary}\r\n{part.format(CONFIG)}".encode()
        + config
        + f"\r\n--{boundary}\r\n{part.format(WEIGHTS)}".encode()
        + weights
        + f"\r\n--{boundary}--\r\n".encode()
    )
    port = int(url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port))
    head = (
        "POST /adapters HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body[: len(body) // 2])
    return sock


def test_sigkill_during_uploads_leaves_a_consistent_store(servers, tiny_base, tmp_path) -> None:
    server = servers()
    parts = files_parts(*make_adapter(tiny_base, seed=1))
    r = httpx.post(server.url + "/adapters", files=parts, data={"adapter_id": "early"}, timeout=30)
    assert r.status_code == 201, r.text
    early_text = generate(server.url, "early")

    big_config, _ = make_adapter(tiny_base, seed=2)
    slow = start_slow_upload(server.url, big_config, b"\0" * (8 << 20))

    acked: list[str] = []
    stop = threading.Event()

    def upload_back_to_back() -> None:
        i = 0
        while not stop.is_set():
            parts = files_parts(*make_adapter(tiny_base, seed=10 + i))
            try:
                r = httpx.post(
                    server.url + "/adapters", files=parts, data={"adapter_id": f"burst{i}"}, timeout=30
                )
            except httpx.TransportError:
                return  # the server died under this upload
            if r.status_code == 201:
                acked.append(f"burst{i}")
            i += 1

    uploader = threading.Thread(target=upload_back_to_back)
    uploader.start()
    deadline = time.monotonic() + 30
    while len(acked) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # land the kill somewhere inside the next upload
    server.kill()
    stop.set()
    uploader.join(30)
    slow.close()
    assert len(acked) >= 3, "uploads did not get through before the kill"

    server = servers()
    listing = httpx.get(server.url + "/adapters").json()
    ids = [a["id"] for a in listing]
    assert set(ids) >= {"early", *acked}
    assert "slow" not in ids
    assert set(ids) - {"early", *acked} <= {
        f"burst{len(acked)}"
    }  # at most the one in flight, if it committed
    for adapter_id in ids:
        generate(server.url, adapter_id)
    assert generate(server.url, "early") == early_text

    data = tmp_path / "data"
    assert not list((data / "tmp").iterdir())
    folders = sorted(p.name for p in (data / "adapters").iterdir())
    rows = dict(sqlite3.connect(data / "index.sqlite3").execute("SELECT id, folder FROM adapters").fetchall())
    assert sorted(rows) == sorted(ids) and sorted(rows.values()) == folders  # one folder per row, no orphans
    for adapter_id, folder in rows.items():
        assert folder.partition("@")[0] == adapter_id
        assert sorted(p.name for p in (data / "adapters" / folder).iterdir()) == [CONFIG, WEIGHTS]

    # and the restarted server takes uploads again
    parts = files_parts(*make_adapter(tiny_base, seed=3))
    r = httpx.post(server.url + "/adapters", files=parts, data={"adapter_id": "after"}, timeout=30)
    assert r.status_code == 201
    server.stop()
