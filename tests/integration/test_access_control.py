"""API and admin keys, the queue limit (429), the request timeout (504), request ids and JSON logs."""

from __future__ import annotations

import io
import json
import logging
import time

import httpx
import openai
import pytest
import torch
from transformers import LlamaForCausalLM

from server.logs import make_handler
from tests.adapter_files import files_parts, make_adapter
from tests.api_helpers import start_client
from tests.conftest import tiny_llama_config
from tests.live_server import start_live_server
from tests.prom import metric_value

API_KEY, ADMIN_KEY = "api-secret", "admin-secret"
API = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
GEN = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
LONG = {"max_new_tokens": 4000, "ignore_eos": True}


@pytest.fixture(scope="module")
def keyed(tiny_base, tokenizer, tmp_path_factory):
    client = start_client(
        tiny_base, tokenizer, tmp_path_factory.mktemp("keys"), api_key=API_KEY, admin_key=ADMIN_KEY
    )
    yield client
    client.__exit__(None, None, None)


@pytest.fixture(scope="module")
def long_model(tokenizer) -> LlamaForCausalLM:
    """A tiny model with room for 4000 new tokens: requests that outlast the limits under test."""
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(len(tokenizer), max_position_embeddings=8192)).eval()


def test_health_and_metrics_stay_open(keyed) -> None:
    assert keyed.get("/health").status_code == 200
    assert keyed.get("/metrics").status_code == 200


def test_generation_needs_a_key(keyed) -> None:
    missing = keyed.post("/generate", json=GEN)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert (
        missing.json()["error_type"] == "unauthorized" and "Authorization: Bearer" in missing.json()["error"]
    )
    wrong = keyed.post("/generate", json=GEN, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert keyed.post("/generate", json=GEN, headers={"Authorization": "Basic " + API_KEY}).status_code == 401
    assert keyed.post("/generate", json=GEN, headers=API).status_code == 200
    assert keyed.post("/generate", json=GEN, headers=ADMIN).status_code == 200  # admin key works for reads
    assert keyed.get("/info").status_code == 401 and keyed.get("/info", headers=API).status_code == 200


def test_admin_routes_need_the_admin_key(keyed, tiny_base) -> None:
    config, weights = make_adapter(tiny_base, seed=1)
    upload = {"files": files_parts(config, weights), "data": {"adapter_id": "guarded"}}
    assert keyed.post("/adapters", **upload).status_code == 401
    forbidden = keyed.post("/adapters", **upload, headers=API)
    assert forbidden.status_code == 403 and forbidden.json()["error_type"] == "forbidden"
    assert "LORAPLEX_ADMIN_KEY" in forbidden.json()["error"]
    assert keyed.post("/adapters", **upload, headers=ADMIN).status_code == 201
    assert keyed.get("/adapters").status_code == 401
    assert [a["id"] for a in keyed.get("/adapters", headers=API).json()] == ["guarded"]
    assert keyed.post("/adapters?replace=true", **upload, headers=API).status_code == 403
    assert keyed.delete("/adapters/guarded", headers=API).status_code == 403
    compose = {"sources": [{"id": "guarded", "weight": 0.5}], "new_id": "composed"}
    assert keyed.post("/adapters/compose", json=compose).status_code == 401
    assert keyed.post("/adapters/compose", json=compose, headers=API).status_code == 403
    assert keyed.post("/adapters/compose", json=compose, headers=ADMIN).status_code == 201
    assert keyed.delete("/adapters/composed", headers=ADMIN).status_code == 204
    assert keyed.post("/admin/verify-base", headers=API).status_code == 403
    assert keyed.post("/admin/verify-base", headers=ADMIN).status_code == 200
    assert keyed.delete("/adapters/guarded", headers=ADMIN).status_code == 204


def test_openai_routes_answer_401_in_openai_shape(keyed) -> None:
    r = keyed.get("/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert keyed.get("/v1/models", headers=API).status_code == 200


def test_openai_sdk_with_keys(tiny_base, tokenizer, tmp_path) -> None:
    live = start_live_server(tiny_base, tokenizer, tmp_path, api_key=API_KEY)
    try:
        bad = openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0)
        with bad, pytest.raises(openai.AuthenticationError):
            bad.models.list()
        with openai.OpenAI(base_url=live.url + "/v1", api_key=API_KEY, max_retries=0) as good:
            reply = good.completions.create(model="tiny-llama", prompt="Hi", max_tokens=2, temperature=0)
            assert reply.usage.completion_tokens >= 1
    finally:
        live.stop()


def test_request_id_in_and_out(keyed) -> None:
    generated = keyed.get("/health").headers["x-request-id"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    assert keyed.get("/health", headers={"x-request-id": "trace-42"}).headers["x-request-id"] == "trace-42"
    odd = keyed.get("/health", headers={"x-request-id": "bad id\twith spaces"}).headers["x-request-id"]
    assert odd != "bad id\twith spaces" and len(odd) == 32
    assert keyed.post("/generate", json=GEN).headers["x-request-id"]  # refusals carry one too


def test_json_access_log_names_the_request(keyed) -> None:
    stream = io.StringIO()
    handler = make_handler("json", stream)
    logger = logging.getLogger("loraplex.access")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        keyed.post("/generate", json=GEN, headers={**API, "x-request-id": "req-json-1"})
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    line = next(entry for entry in lines if entry["request_id"] == "req-json-1")
    assert line["status"] == 200 and line["path"] == "/generate" and line["method"] == "POST"
    assert line["level"] == "info" and line["logger"] == "loraplex.access" and line["duration_s"] >= 0


def test_queue_full_is_429_with_retry_after(long_model, tokenizer, tmp_path) -> None:
    live = start_live_server(long_model, tokenizer, tmp_path, max_queue=1, max_total_tokens=4096)
    try:
        body = {"inputs": "Hi", "parameters": LONG}
        with httpx.stream("POST", live.url + "/generate_stream", json=body, timeout=30) as held:
            lines = held.iter_lines()  # kept referenced: a collected iterator closes the connection
            next(line for line in lines if line.startswith("data:"))
            busy = httpx.post(live.url + "/generate", json=GEN, timeout=30)
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
            assert busy.json()["error_type"] == "overloaded" and "--max-queue" in busy.json()["error"]
            chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]}
            busy_openai = httpx.post(live.url + "/v1/chat/completions", json=chat, timeout=30)
            assert (
                busy_openai.status_code == 429 and busy_openai.json()["error"]["type"] == "rate_limit_error"
            )
            assert httpx.get(live.url + "/health").status_code == 200  # non-generation routes still answer
        deadline = time.monotonic() + 10
        while (r := httpx.post(live.url + "/generate", json=GEN, timeout=30)).status_code == 429:
            assert time.monotonic() < deadline, "the place held by the closed stream was never given back"
            time.sleep(0.05)
        assert r.status_code == 200
    finally:
        live.stop()


def test_request_timeout_is_504_or_a_final_error_event(long_model, tokenizer, tmp_path) -> None:
    live = start_live_server(long_model, tokenizer, tmp_path, request_timeout=0.5, max_total_tokens=4096)
    try:
        started = time.monotonic()
        r = httpx.post(live.url + "/generate", json={"inputs": "Hi", "parameters": LONG}, timeout=30)
        assert r.status_code == 504 and r.json()["error_type"] == "timeout"
        assert "--request-timeout" in r.json()["error"] and time.monotonic() - started < 5
        with httpx.stream("POST", live.url + "/generate_stream", json={"inputs": "Hi", "parameters": LONG},
                          timeout=30) as s:  # fmt: skip
            events = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]
        assert events[-1]["error_type"] == "timeout" and len(events) > 1
        o = httpx.post(live.url + "/v1/completions",
                       json={"model": "tiny-llama", "prompt": "Hi", "max_tokens": 4000, "temperature": 0}, timeout=30)  # fmt: skip
        assert o.status_code == 504 and o.json()["error"]["code"] == "timeout"
        engine = live.app.state.engine
        deadline = time.monotonic() + 5
        while engine.num_running or engine.num_waiting:
            assert time.monotonic() < deadline, "timed-out requests still hold batch rows"
            time.sleep(0.02)
        metrics = httpx.get(live.url + "/metrics").text
        for route in ("/generate", "/generate_stream", "/v1/completions"):
            assert metric_value(metrics, "loraplex_requests_total", route=route, status="504") == 1.0
    finally:
        live.stop()
