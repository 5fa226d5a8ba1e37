"""Clients that misbehave and a disk that fills up: the server cuts them off, keeps nothing half
done, and serves everyone else meanwhile (a real uvicorn server on loopback, the tiny model)."""

from __future__ import annotations

import asyncio
import errno
import select
import socket
import threading
import time

import httpx
import pytest
import torch
from transformers import LlamaForCausalLM

import adapters.blobs
from tests.adapter_files import files_parts, make_adapter
from tests.conftest import tiny_llama_config
from tests.live_server import start_live_server
from tests.server_process import multipart_upload, read_response, wait_until

UPLOAD_TIMEOUT = 2.0


@pytest.fixture
def live(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer), max_position_embeddings=8192)).eval()
    server = start_live_server(
        model, tokenizer, tmp_path, max_total_tokens=4096, max_batch=256, upload_timeout=UPLOAD_TIMEOUT
    )
    yield server
    server.stop()


def _generate(url: str, adapter_id: str | None = None) -> httpx.Response:
    body = {"inputs": "Hello", "parameters": {"adapter_id": adapter_id, "max_new_tokens": 4}}
    return httpx.post(url + "/generate", json=body, timeout=30)


def test_an_upload_trickled_byte_by_byte_is_cut_off_and_holds_up_no_one(live, tiny_base, tmp_path) -> None:
    head, body = multipart_upload("trickle", *make_adapter(tiny_base, seed=1))
    sock = socket.create_connection(("127.0.0.1", int(live.url.rsplit(":", 1)[1])))
    started = time.monotonic()
    sock.sendall(head)
    answer: dict[str, object] = {}

    def trickle() -> None:
        """One byte every 10 ms (the whole body would take minutes) until the server answers."""
        for i in range(len(body)):
            if select.select([sock], [], [], 0.01)[0]:  # the server answered (and closes)
                break
            try:
                sock.send(body[i : i + 1])
            except OSError:
                break
        answer["status"], answer["body"] = read_response(sock, 30)
        answer["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=trickle)
    thread.start()
    served = 0
    while thread.is_alive():  # meanwhile every other request is answered at once
        asked = time.monotonic()
        assert _generate(live.url).status_code == 200
        assert httpx.get(live.url + "/health", timeout=5).status_code == 200
        assert time.monotonic() - asked < 1.5
        served += 1
    thread.join()
    sock.close()

    assert answer["status"] == 408, answer
    assert b'"upload_timeout"' in answer["body"] and b"--upload-timeout" in answer["body"]
    assert UPLOAD_TIMEOUT <= answer["seconds"] < UPLOAD_TIMEOUT + 5
    assert served >= 3
    assert httpx.get(live.url + "/adapters").json() == []
    assert not list((tmp_path / "data" / "tmp").iterdir())


async def _leave_mid_stream(client: httpx.AsyncClient, url: str, adapter_id: str | None) -> int:
    """Read two token events of a long stream, then hang up."""
    body = {
        "inputs": "Hello",
        "parameters": {"adapter_id": adapter_id, "max_new_tokens": 4000, "ignore_eos": True},
    }
    async with client.stream("POST", url + "/generate_stream", json=body) as response:
        assert response.status_code == 200
        seen = 0
        async for line in response.aiter_lines():
            seen += line.startswith("data:")
            if seen == 2:
                return seen
    return seen


def test_200_clients_leaving_mid_stream_free_every_row_and_slot(live, tiny_base) -> None:
    for name, seed in (("a", 1), ("b", 2)):
        r = httpx.post(live.url + "/adapters", files=files_parts(*make_adapter(tiny_base, seed=seed)),
                       data={"adapter_id": name}, timeout=30)  # fmt: skip
        assert r.status_code == 201, r.text

    async def crowd() -> list[int]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            adapters = ["a", "b", None]
            return await asyncio.gather(
                *(_leave_mid_stream(client, live.url, adapters[i % 3]) for i in range(200))
            )

    assert asyncio.run(crowd()) == [2] * 200

    def idle() -> dict | None:
        info = httpx.get(live.url + "/info", timeout=5).json()
        quiet = (
            info["running_requests"] == 0
            and info["waiting_requests"] == 0
            and info["adapter_slot_users"] == 0
            and info["kv_cache"]["used_tokens"] == 0
            and info["http_requests_in_flight"] == 1  # this /info request
        )
        return info if quiet else None

    wait_until(idle, 30, "every row, slot and request of the 200 streams to be released", poll=0.05)
    assert _generate(live.url, "a").status_code == 200


def test_a_full_disk_during_an_upload_is_507_keeps_nothing_and_serving_goes_on(
    live, tiny_base, tmp_path, monkeypatch
) -> None:
    assert httpx.post(live.url + "/adapters", files=files_parts(*make_adapter(tiny_base, seed=1)),
                      data={"adapter_id": "kept"}, timeout=30).status_code == 201  # fmt: skip
    before = _generate(live.url, "kept").json()["generated_text"]
    real_open = open

    def full_disk_open(path, mode="r", *args, **kwargs):
        """Writes into the data dir stop halfway with ENOSPC, as on a full disk."""
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode:
            write = f.write

            def half_then_full(data):
                write(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")

            f.write = half_then_full
        return f

    monkeypatch.setattr(adapters.blobs, "open", full_disk_open, raising=False)
    for adapter_id, replace in (("new", False), ("kept", True)):
        r = httpx.post(live.url + "/adapters", params={"replace": replace},
                       files=files_parts(*make_adapter(tiny_base, seed=2)), data={"adapter_id": adapter_id},
                       timeout=30)  # fmt: skip
        assert r.status_code == 507, r.text
        assert r.json()["error_type"] == "insufficient_storage"
        assert "disk is full" in r.json()["error"] and "nothing of it was kept" in r.json()["error"]
        assert _generate(live.url, "kept").json()["generated_text"] == before  # serving goes on
    monkeypatch.undo()

    assert [a["id"] for a in httpx.get(live.url + "/adapters").json()] == ["kept"]
    data = tmp_path / "data"
    assert not list((data / "tmp").iterdir()) and len(list((data / "adapters").iterdir())) == 1
    r = httpx.post(live.url + "/adapters", files=files_parts(*make_adapter(tiny_base, seed=2)),
                   data={"adapter_id": "new"}, timeout=30)  # fmt: skip
    assert r.status_code == 201, r.text
