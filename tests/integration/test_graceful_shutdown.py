"""SIGTERM drains the server: new requests get 503 + Retry-After, running ones finish, exit 0.

A real ``loraplex serve`` process on the tiny model. What is in flight when the signal comes
is held open by the test itself (a half-sent upload, a stream it has not read to the end), so
nothing depends on how fast the model decodes.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import time

import httpx

from tests.adapter_files import make_adapter
from tests.server_process import SlowUpload, wait_until

STREAM = {"inputs": "Hello", "parameters": {"max_new_tokens": 200, "ignore_eos": True}}


def _draining(url: str) -> bool:
    try:
        r = httpx.get(url + "/health", timeout=2)
    except httpx.TransportError:
        return False
    return r.status_code == 503 and r.json() == {"status": "draining"}


def _in_flight(url: str) -> int:
    return httpx.get(url + "/info", timeout=5).json()["http_requests_in_flight"]


def test_sigterm_refuses_new_requests_finishes_running_ones_and_exits_0(servers, tiny_base, tmp_path) -> None:
    server = servers("--shutdown-timeout", "30", "--log-level", "info")
    config, weights = make_adapter(tiny_base, seed=1)
    upload = SlowUpload(server.url, config, weights, adapter_id="late")  # in flight: half its body sent
    wait_until(lambda: _in_flight(server.url) == 2, 10, "the upload to be in flight")  # it + /info
    with httpx.stream("POST", server.url + "/generate_stream", json=STREAM, timeout=30) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        assert json.loads(first.removeprefix("data:"))["token"]

        server.signal(signal.SIGTERM)
        wait_until(lambda: _draining(server.url), 10, "/health to say draining")

        refused = httpx.post(server.url + "/generate", json={"inputs": "Hi"}, timeout=10)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "5"
        assert refused.json()["error_type"] == "shutting_down"
        assert "shutting down" in refused.json()["error"]
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}
        openai = httpx.post(server.url + "/v1/chat/completions", json=chat, timeout=10)
        assert openai.status_code == 503 and openai.headers["retry-after"] == "5"
        assert openai.json()["error"]["code"] == "shutting_down"
        assert httpx.get(server.url + "/adapters", timeout=10).status_code == 503

        # the upload that was running when the signal came is still taken and stored
        status, body = upload.finish()
        assert status == 201, body
        upload.close()

        # and so is the stream: every token, then its final event
        events = [json.loads(line.removeprefix("data:")) for line in lines if line.startswith("data:")]
    assert events[-1]["details"]["generated_tokens"] == 200
    assert events[-1]["details"]["finish_reason"] == "length"

    assert server.proc.wait(30) == 0
    assert "drained: every running request finished" in server.log_text()
    rows = sqlite3.connect(tmp_path / "data" / "index.sqlite3").execute("SELECT id FROM adapters").fetchall()
    assert rows == [("late",)]


def test_requests_still_running_at_the_shutdown_timeout_are_cut_off_and_the_exit_is_0(
    servers, tiny_base, tmp_path
) -> None:
    server = servers("--shutdown-timeout", "1", "--upload-timeout", "60")  # the upload outlives the drain
    config, weights = make_adapter(tiny_base, seed=1)
    upload = SlowUpload(server.url, config, weights)  # never finished: still running at the timeout
    wait_until(lambda: _in_flight(server.url) == 2, 10, "the upload to be in flight")  # it + /info
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    assert time.monotonic() - started < 15
    upload.close()
    log = server.log_text()
    assert "--shutdown-timeout (1 s) passed with 1 request(s) still running" in log
    assert not list((tmp_path / "data" / "tmp").iterdir())
    rows = sqlite3.connect(tmp_path / "data" / "index.sqlite3").execute("SELECT id FROM adapters").fetchall()
    assert rows == []


def test_a_second_signal_exits_without_waiting_for_the_drain(servers, tiny_base) -> None:
    server = servers("--shutdown-timeout", "60", "--upload-timeout", "120", "--log-level", "info")
    config, weights = make_adapter(tiny_base, seed=1)
    upload = SlowUpload(server.url, config, weights)  # would hold the drain open for 60 s
    wait_until(lambda: _in_flight(server.url) == 2, 10, "the upload to be in flight")  # it + /info
    server.signal(signal.SIGTERM)
    wait_until(lambda: _draining(server.url), 10, "/health to say draining")
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    server.proc.wait(30)
    assert time.monotonic() - started < 20  # well short of the 60 s drain
    upload.close()
    assert "second shutdown signal: exiting without waiting for running requests" in server.log_text()
