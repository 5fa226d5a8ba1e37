"""SIGKILL in the middle of writes and swaps, then a restart on the same data dir.

After every crash: each adapter is entirely present with its recorded sha256, or absent; no
file is left that the index does not list (start-up repair removed the leftovers of the
interrupted writes and quarantined nothing: they were the store's own); ``/admin/verify-base``
says intact; every adapter answers what it answered before the crash.

Where the kill lands is not steered to a byte: it comes while uploads, replaces, deletes (or
merged-mode swaps) run back to back in several threads, so it falls inside one of them or
between two. The checks hold wherever it falls; test_store.py checks each window by hand.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.adapter_files import CONFIG, WEIGHTS, files_parts, make_adapter
from tests.server_process import ServerProcess, wait_until

PROMPT = "Hello"


def generate(url: str, adapter_id: str | None) -> str:
    body = {"inputs": PROMPT, "parameters": {"adapter_id": adapter_id, "max_new_tokens": 8}}
    r = httpx.post(url + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["generated_text"]


def assert_store_consistent(data: Path, url: str) -> dict[str, str]:
    """Index, files and API agree after start-up repair; returns id -> weights sha256."""
    rows = (
        sqlite3.connect(data / "index.sqlite3")
        .execute("SELECT id, folder, sha256, config_sha256 FROM adapters")
        .fetchall()
    )
    for adapter_id, folder, sha, config_sha in rows:
        stored = data / "adapters" / folder
        assert sorted(p.name for p in stored.iterdir()) == [CONFIG, WEIGHTS], folder
        assert hashlib.sha256((stored / WEIGHTS).read_bytes()).hexdigest() == sha, adapter_id
        assert hashlib.sha256((stored / CONFIG).read_bytes()).hexdigest() == config_sha, adapter_id
    assert sorted(p.name for p in (data / "adapters").iterdir()) == sorted(r[1] for r in rows)  # no orphans
    assert not list((data / "tmp").iterdir())
    assert not (data / "quarantine").exists(), "a crash's leftovers were taken for corrupt data"
    listed = {a["id"]: a["sha256"] for a in httpx.get(url + "/adapters", timeout=30).json()}
    assert listed == {r[0]: r[2] for r in rows}
    verified = httpx.post(url + "/admin/verify-base", timeout=60).json()
    assert verified["intact"] is True, verified
    return listed


def run_until_killed(server: ServerProcess, workers: list[Callable[[threading.Event], None]],
                     ready: Callable[[], bool]) -> None:  # fmt: skip
    """Run ``workers`` in threads until ``ready()``, then SIGKILL the server and join them."""
    stop = threading.Event()
    threads = [threading.Thread(target=w, args=(stop,)) for w in workers]
    for thread in threads:
        thread.start()
    try:
        wait_until(ready, 60, "the writers to get through a few operations", poll=0.005)
    finally:
        server.kill()
        stop.set()
        for thread in threads:
            thread.join(60)


def test_sigkill_during_uploads_replaces_and_deletes(servers, tiny_base, tmp_path) -> None:
    data = tmp_path / "data"
    server = servers()
    url = server.url
    versions = {seed: make_adapter(tiny_base, seed=seed, r=16) for seed in (1, 2)}
    sha_of = {hashlib.sha256(w).hexdigest(): seed for seed, (_, w) in versions.items()}
    outputs: dict[int, str] = {}
    for seed in (1, 2):  # what "swing" answers with each version
        r = httpx.post(url + "/adapters", params={"replace": True}, files=files_parts(*versions[seed]),
                       data={"adapter_id": "swing"}, timeout=30)  # fmt: skip
        assert r.status_code == 201, r.text
        outputs[seed] = generate(url, "swing")
    assert outputs[1] != outputs[2]
    base_output = generate(url, None)
    acked: dict[str, list[str]] = defaultdict(list)
    answers: dict[str, str] = {}  # id -> output of the version acked last, for uploads

    def post(adapter_id: str, seed: int, replace: bool = False) -> bool:
        parts = files_parts(*make_adapter(tiny_base, seed=seed, r=16))
        r = httpx.post(url + "/adapters", params={"replace": replace}, files=parts,
                       data={"adapter_id": adapter_id}, timeout=30)  # fmt: skip
        return r.status_code == 201

    def uploader(stop: threading.Event) -> None:
        for i in range(10_000):
            if stop.is_set():
                return
            try:
                if post(f"up{i}", 100 + i):
                    acked["upload"].append(f"up{i}")
                    r = httpx.post(url + "/generate", json={"inputs": PROMPT, "parameters": {
                        "adapter_id": f"up{i}", "max_new_tokens": 8}}, timeout=30)  # fmt: skip
                    if r.status_code == 200:
                        answers[f"up{i}"] = r.json()["generated_text"]
            except httpx.TransportError:
                return  # the server died under this request

    def replacer(stop: threading.Event) -> None:
        for i in range(10_000):
            if stop.is_set():
                return
            try:
                if post("swing", 1 + i % 2, replace=True):
                    acked["replace"].append(str(1 + i % 2))
            except httpx.TransportError:
                return

    def deleter(stop: threading.Event) -> None:
        for i in range(10_000):
            if stop.is_set():
                return
            try:
                if not post(f"del{i}", 500 + i):
                    continue
                if httpx.delete(f"{url}/adapters/del{i}", timeout=30).status_code == 204:
                    acked["delete"].append(f"del{i}")
            except httpx.TransportError:
                return

    run_until_killed(
        server,
        [uploader, replacer, deleter],
        lambda: all(len(acked[k]) >= 3 for k in ("upload", "replace", "delete")),
    )

    server = servers()
    url = server.url  # (``post`` reads it)
    listed = assert_store_consistent(data, server.url)
    assert generate(server.url, None) == base_output
    for adapter_id in acked["upload"]:  # acknowledged uploads survive, with the same outputs
        assert adapter_id in listed
        if adapter_id in answers:
            assert generate(server.url, adapter_id) == answers[adapter_id]
    assert not set(acked["delete"]) & set(listed)  # acknowledged deletes stay deleted
    assert "swing" in listed  # replaced, never deleted: one whole version or the other
    seed = sha_of[listed["swing"]]
    assert generate(server.url, "swing") == outputs[seed]
    assert post("after", 7)  # and the restarted server takes writes again
    server.stop()


def test_sigkill_during_merged_mode_swaps_under_traffic(servers, tiny_base, tmp_path) -> None:
    server = servers("--mode", "merged", "--switch-wait", "0")
    url = server.url
    for name, seed in (("a", 1), ("b", 2)):
        r = httpx.post(url + "/adapters", files=files_parts(*make_adapter(tiny_base, seed=seed)),
                       data={"adapter_id": name}, timeout=30)  # fmt: skip
        assert r.status_code == 201, r.text
    before = {name: generate(url, name) for name in ("a", "b", None)}
    swaps_at_start = httpx.get(url + "/info").json()["swaps"]
    drift: list[tuple[str | None, str]] = []

    def traffic(adapter_id: str | None) -> Callable[[threading.Event], None]:
        def run(stop: threading.Event) -> None:
            while not stop.is_set():
                try:
                    text = generate(url, adapter_id)
                except httpx.TransportError:
                    return  # killed
                if text != before[adapter_id]:
                    drift.append((adapter_id, text))

        return run

    def swapping() -> bool:
        return httpx.get(url + "/info", timeout=10).json()["swaps"] >= swaps_at_start + 10

    run_until_killed(server, [traffic("a"), traffic("b"), traffic(None)], swapping)
    assert drift == []  # outputs never drifted while the adapters were swapped in and out

    server = servers("--mode", "merged")
    assert_store_consistent(tmp_path / "data", server.url)
    for name, text in before.items():
        assert generate(server.url, name) == text
    assert httpx.post(server.url + "/admin/verify-base", timeout=60).json()["intact"] is True
    server.stop()


def test_corrupt_data_at_start_up_is_quarantined_and_logged_and_the_rest_served(
    servers, tiny_base, tmp_path
) -> None:
    data = tmp_path / "data"
    server = servers()
    for name, seed in (("good", 1), ("truncated", 2), ("vanished", 3)):
        r = httpx.post(server.url + "/adapters", files=files_parts(*make_adapter(tiny_base, seed=seed)),
                       data={"adapter_id": name}, timeout=30)  # fmt: skip
        assert r.status_code == 201, r.text
    good_output = generate(server.url, "good")
    folders = {
        a: f for a, f in sqlite3.connect(data / "index.sqlite3").execute("SELECT id, folder FROM adapters")
    }
    server.stop()

    weights = data / "adapters" / folders["truncated"] / WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a truncated safetensors
    for path in (data / "adapters" / folders["vanished"]).iterdir():  # an index row whose files are gone
        path.unlink()
    (data / "adapters" / folders["vanished"]).rmdir()
    stray = data / "adapters" / "stray@v9-00000000"  # files with no index row
    stray.mkdir()
    (stray / CONFIG).write_bytes(make_adapter(tiny_base, seed=4)[0])

    server = servers()
    assert [a["id"] for a in httpx.get(server.url + "/adapters").json()] == ["good"]
    assert generate(server.url, "good") == good_output
    for gone in ("truncated", "vanished"):
        r = httpx.post(server.url + "/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": gone}})
        assert r.status_code == 404
    log = server.log_text()
    assert "adapter truncated is not served: its files hold" in log
    assert "adapter vanished is not served: its files are missing" in log
    assert "stray@v9-00000000 in the data dir is not served: no index row refers to it" in log
    quarantined = sorted(p.name.split("-", 1)[1] for p in (data / "quarantine").iterdir())
    assert quarantined == sorted([folders["truncated"], folders["vanished"], stray.name])
    assert sorted(p.name for p in (data / "adapters").iterdir()) == [folders["good"]]
    server.stop()
