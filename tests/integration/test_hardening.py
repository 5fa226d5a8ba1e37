"""Attacks from outside on a real ``loraplex serve`` process (issue 31): whatever one request sends,
the server answers it quickly and keeps serving everyone else (``/health`` within 0.5 s during the
attack, RSS growth bounded). Each attack is bounded (a few seconds, loopback only)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.adapter_files import files_parts, make_adapter
from tests.server_process import ServerProcess, read_response

API_KEY = "hardening-api-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
HEALTH_LIMIT_S = 0.5
MIB = 1 << 20


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class HealthProbe:
    """Polls ``/health`` in a thread while an attack runs; keeps the slowest answer's latency."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.worst = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                started = time.monotonic()
                assert client.get(self.url + "/health").status_code == 200
                self.worst = max(self.worst, time.monotonic() - started)
                time.sleep(0.05)

    def __enter__(self) -> HealthProbe:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(30)


def raw_request(url: str, head: str, body_chunks: Callable[[], object], timeout: float = 10) -> int:
    """Send ``head`` then the body chunks until the server answers (or the body ends); the status."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head.encode())
        sock.setblocking(True)
        for chunk in body_chunks():  # type: ignore[attr-defined]
            try:
                sock.sendall(chunk)
            except OSError:
                break  # the server answered and closed: read what it said
        status, _ = read_response(sock, timeout)
        return status


def huge_json(size: int, chunk: int = MIB):
    """A JSON body ``{"inputs": "aaaa..."}`` of ``size`` bytes, in ``chunk``-byte pieces."""

    def chunks():
        yield b'{"inputs": "'
        for _ in range(size // chunk):
            yield b"a" * chunk
        yield b'"}'

    return chunks


def attack(server: ServerProcess, attackers: list[Callable[[], int]]) -> tuple[list[int], float, int, float]:
    """Run the attackers at once while probing /health: statuses, worst /health latency, RSS growth,
    and seconds the attack took."""
    statuses: list[int] = [0] * len(attackers)
    rss_before = rss_bytes(server.proc.pid)
    peak = rss_before

    def run(i: int) -> None:
        statuses[i] = attackers[i]()

    started = time.monotonic()
    with HealthProbe(server.url) as probe:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(attackers))]
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            peak = max(peak, rss_bytes(server.proc.pid))
            time.sleep(0.02)
            assert time.monotonic() - started < 60, "the attack did not end"
    return statuses, probe.worst, peak - rss_before, time.monotonic() - started


@pytest.fixture
def keyed(servers) -> ServerProcess:
    return servers(env={"LORAPLEX_API_KEY": API_KEY})


def test_bodies_without_a_key_are_refused_before_they_are_read(keyed) -> None:
    """Finding 1: three 34 MiB bodies with no key: 401 at once, nothing buffered."""
    size = 34 * MIB
    head = (
        "POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {size + 14}\r\n\r\n"
    )
    attackers = [lambda: raw_request(keyed.url, head, huge_json(size)) for _ in range(3)]
    statuses, worst, grown, seconds = attack(keyed, attackers)
    assert statuses == [401, 401, 401]
    assert worst <= HEALTH_LIMIT_S and grown < 48 * MIB and seconds < 5, (worst, grown, seconds)


def test_bodies_over_the_limit_are_cut_off_while_they_arrive(keyed) -> None:
    """Finding 1, with the key: a declared size over --max-body-kb is a 413 before reading; a
    chunked body (no declared size) is cut off once it passes the limit."""
    size = 34 * MIB
    declared = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {size + 14}\r\n\r\n"
    )
    chunked_head = (
        f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )

    def chunked():
        for piece in huge_json(size)():
            yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        yield b"0\r\n\r\n"

    attackers = [
        lambda: raw_request(keyed.url, declared, huge_json(size)),
        lambda: raw_request(keyed.url, chunked_head, chunked),
        lambda: raw_request(keyed.url, chunked_head, chunked),
    ]
    statuses, worst, grown, seconds = attack(keyed, attackers)
    assert statuses == [413, 413, 413]
    assert worst <= HEALTH_LIMIT_S and grown < 48 * MIB and seconds < 5, (worst, grown, seconds)
    r = httpx.post(keyed.url + "/generate", json={"inputs": "x" * (3 * MIB)}, headers=AUTH)
    assert r.status_code == 413 and "--max-body-kb" in r.json()["error"]
    ok = httpx.post(keyed.url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}},
                    headers=AUTH, timeout=60)  # fmt: skip
    assert ok.status_code == 200, ok.text


def test_regexes_from_users_and_configs_never_stall_the_server(keyed, tiny_base) -> None:
    """Findings 2 and 5: ``layers=(.+)+!`` (hours on a backtracking engine) on analysis and compare,
    and an upload whose target_modules/rank_pattern are such patterns, all answer at once."""
    config, weights = make_adapter(tiny_base, seed=3)
    up = httpx.post(keyed.url + "/adapters", data={"adapter_id": "victim"}, files=files_parts(config, weights),
                    headers=AUTH, timeout=60)  # fmt: skip
    assert up.status_code == 201, up.text
    evil = r"(.+)+!"
    evil_config = json.dumps(
        {**json.loads(config), "target_modules": evil, "rank_pattern": {evil: 2}}
    ).encode()

    def get(path: str, params: dict) -> Callable[[], int]:
        return lambda: httpx.get(keyed.url + path, params=params, headers=AUTH, timeout=30).status_code

    def upload() -> int:
        files = files_parts(evil_config, weights)
        return httpx.post(keyed.url + "/adapters", data={"adapter_id": "evil"}, files=files, headers=AUTH,
                          timeout=30).status_code  # fmt: skip

    attackers = [
        get("/adapters/victim/analysis", {"layers": evil}),
        get("/adapters/compare", {"a": "victim", "b": "victim", "layers": evil}),
        get("/adapters/victim/analysis", {"layers": r"^(?=model\.layers\.0\.self_attn\.q).{4}(.+)+!"}),
        upload,
    ]
    statuses, worst, _, seconds = attack(keyed, attackers)
    assert statuses == [200, 200, 422, 422]
    assert worst <= HEALTH_LIMIT_S and seconds < 20, (worst, seconds)
    assert httpx.get(keyed.url + "/adapters/evil", headers=AUTH).status_code == 404


def test_long_prompts_are_refused_before_tokenizing_and_tokenized_off_the_event_loop(servers) -> None:
    """Finding 3: 8 MiB prompts (the body limit raised to let them in) are 422 from their character
    count; prompts under --max-prompt-chars are tokenized in worker threads, so /health never waits."""
    server = servers("--max-body-kb", "16384", env={"LORAPLEX_API_KEY": API_KEY})
    huge, long = "word " * (8 * MIB // 5), "word " * 50_000  # 8 MiB; 250,000 characters
    model = httpx.get(server.url + "/v1/models", headers=AUTH).json()["data"][0]["id"]
    chat = [{"role": "user", "content": huge}]

    def post(path: str, body: dict) -> Callable[[], int]:
        return lambda: httpx.post(server.url + path, json=body, headers=AUTH, timeout=60).status_code

    attackers = [
        post("/generate", {"inputs": huge}),
        post("/v1/completions", {"model": model, "prompt": huge}),
        post("/v1/chat/completions", {"model": model, "messages": chat}),
    ]
    statuses, worst, grown, seconds = attack(server, attackers)
    assert statuses == [422, 422, 422]
    assert worst <= HEALTH_LIMIT_S and grown < 256 * MIB and seconds < 10, (worst, grown, seconds)
    r = httpx.post(server.url + "/generate", json={"inputs": huge}, headers=AUTH, timeout=60)
    assert "--max-prompt-chars" in r.json()["error"]

    attackers = [post("/generate", {"inputs": long}) for _ in range(3)]
    attackers.append(
        post("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": long}]})
    )
    statuses, worst, _, seconds = attack(server, attackers)
    # tokenized, then over --max-input-tokens (OpenAI's route: 400 context_length_exceeded)
    assert statuses == [422, 422, 422, 400]
    assert worst <= HEALTH_LIMIT_S, worst


def test_bad_ids_nested_json_and_long_stops_are_clear_4xx(keyed, tiny_base) -> None:
    """Findings 9, 10 and 13: an id with a trailing newline, a config or safetensors header nested
    thousands deep, a bad rank_pattern regex, a 20,000-character stop: each a 4xx naming the
    problem, never a 500 or a stored adapter."""
    config, weights = make_adapter(tiny_base, seed=4)

    def upload(adapter_id: str, config: bytes, weights: bytes) -> httpx.Response:
        return httpx.post(keyed.url + "/adapters", data={"adapter_id": adapter_id},
                          files=files_parts(config, weights), headers=AUTH, timeout=60)  # fmt: skip

    r = upload("newline\n", config, weights)
    assert r.status_code == 400 and r.json()["error_type"] == "invalid_adapter_id", r.text
    deep = b"[" * 100_000 + b"]" * 100_000
    r = upload("deep-config", deep, weights)
    assert r.status_code == 422 and "nested too deeply" in r.json()["error"], r.text
    header = b'{"a": ' + deep + b"}"
    r = upload("deep-header", config, len(header).to_bytes(8, "little") + header)
    assert r.status_code == 422 and "nested too deeply" in r.json()["error"], r.text
    bad_pattern = json.dumps({**json.loads(config), "rank_pattern": {"q_proj(": 4}}).encode()
    r = upload("bad-pattern", bad_pattern, weights)
    assert r.status_code == 422 and "rank_pattern" in r.json()["error"], r.text
    for adapter_id in ("deep-config", "deep-header", "bad-pattern"):
        assert httpx.get(f"{keyed.url}/adapters/{adapter_id}", headers=AUTH).status_code == 404
    r = httpx.post(keyed.url + "/generate", headers=AUTH,
                   json={"inputs": "Hi", "parameters": {"stop": ["x" * 20_000] * 16}})  # fmt: skip
    assert r.status_code == 422 and "stop" in r.json()["error"], r.text
    model = httpx.get(keyed.url + "/v1/models", headers=AUTH).json()["data"][0]["id"]
    r = httpx.post(keyed.url + "/v1/completions", headers=AUTH,
                   json={"model": model, "prompt": "Hi", "stop": ["x" * 20_000]})  # fmt: skip
    assert r.status_code == 422 and "stop" in r.json()["error"]["message"], r.text


def test_access_log_lines_cannot_be_forged(servers) -> None:
    """Finding 11: a path with an encoded newline stays on its own (escaped) access-log line."""
    server = servers("--log-level", "info")
    forged = 'FORGED 127.0.0.1 - "GET /admin/secret" 200'
    httpx.get(server.url + "/%0a" + forged.replace(" ", "%20").replace('"', "%22"))
    httpx.get(server.url + "/health")  # a later line: the access log has been written
    lines = server.log_text().splitlines()
    assert not any(line.startswith("FORGED") for line in lines)
    assert any("\\nFORGED" in line for line in lines), lines[-5:]


def test_health_tells_the_start_up_error_only_to_key_holders(tmp_path) -> None:
    """Finding 12: a failed start-up's message (it names paths) is not shown on the open /health."""
    missing = tmp_path / "secret-model-location"
    server = ServerProcess(missing, tmp_path / "data2", tmp_path / "failed.log",
                           env={"LORAPLEX_API_KEY": API_KEY}, ready=False)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                r = httpx.get(server.url + "/health", timeout=5)
                if r.json().get("status") == "failed":
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server never reported its failed start-up"
            time.sleep(0.2)
        assert r.status_code == 503 and "secret-model-location" not in r.text
        keyed_view = httpx.get(server.url + "/health", headers=AUTH, timeout=5)
        assert "secret-model-location" in keyed_view.json()["error"]
    finally:
        server.kill()


def test_without_keys_cross_site_writes_and_foreign_hosts_are_refused(servers, tiny_base) -> None:
    """Finding 7 (no keys, as the Docker image starts): a web page's cross-site form post cannot
    store or replace an adapter, and a rebound DNS name (a foreign Host) is not served."""
    server = servers()
    config, weights = make_adapter(tiny_base, seed=5)

    def upload(adapter_id: str, **headers: str) -> httpx.Response:
        return httpx.post(server.url + "/adapters", data={"adapter_id": adapter_id},
                          files=files_parts(config, weights), headers=headers, timeout=60)  # fmt: skip

    r = upload("planted", origin="https://evil.example", **{"sec-fetch-site": "cross-site"})
    assert r.status_code == 403 and r.json()["error_type"] == "cross_site"
    assert upload("planted", origin="https://evil.example").status_code == 403
    assert httpx.get(server.url + "/adapters/planted").status_code == 404
    assert upload("mine", origin=server.url, **{"sec-fetch-site": "same-origin"}).status_code == 201
    assert upload("cli").status_code == 201  # curl and the SDKs send no Origin

    rebound = httpx.get(server.url + "/v1/models", headers={"host": "attacker.example"})
    assert rebound.status_code == 400 and "--allowed-hosts" in rebound.json()["error"]["message"]
    assert httpx.get(server.url + "/health", headers={"host": "10.0.0.7:8080"}).status_code == 200
