"""A real server process killed (SIGKILL) in the middle of uploads restarts with a consistent store.

The server runs as ``python -m server.cli serve`` on 127.0.0.1 with a tiny model saved to disk.
While a slow client streams a large upload and another client uploads adapters back to back,
the process is killed; after a restart every acknowledged (201) adapter is listed and servable
with the same outputs, the half-sent upload left nothing, and the data dir holds exactly the
listed adapters' folders and no staging leftovers.
"""

from __future__ import annotations

import sqlite3
import threading
import time

import httpx

from tests.adapter_files import CONFIG, WEIGHTS, files_parts, make_adapter
from tests.server_process import SlowUpload


def generate(url: str, adapter_id: str) -> str:
    body = {"inputs": "Hello", "parameters": {"adapter_id": adapter_id, "max_new_tokens": 8}}
    r = httpx.post(url + "/generate", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["generated_text"]


def test_sigkill_during_uploads_leaves_a_consistent_store(servers, tiny_base, tmp_path) -> None:
    server = servers()
    parts = files_parts(*make_adapter(tiny_base, seed=1))
    r = httpx.post(server.url + "/adapters", files=parts, data={"adapter_id": "early"}, timeout=30)
    assert r.status_code == 201, r.text
    early_text = generate(server.url, "early")

    big_config, _ = make_adapter(tiny_base, seed=2)
    slow = SlowUpload(server.url, big_config, b"\0" * (8 << 20))

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
