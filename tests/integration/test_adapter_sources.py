"""``--adapter-source s3://...``: adapters fetched on first use from a real S3 API on loopback (moto's server).

A fetched adapter answers like the same files uploaded; a changed object is served as a new version
after the refresh period; a missing one is 404, an invalid one 422, an unreachable source 503, and
other requests are served meanwhile; LoRAX's ``adapter_source`` is honoured.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator

import boto3
import pytest
from botocore.config import Config
from moto.server import ThreadedMotoServer

from adapters.sources import S3Location, S3Source
from tests.adapter_files import make_adapter, raw_safetensors
from tests.api_helpers import start_client
from tests.integration.test_adapters_api import generate, upload

BUCKET, PREFIX = "loras", "team/adapters"
REFRESH_S = 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3() -> Iterator:
    """moto's S3 server on 127.0.0.1, found the standard AWS way (env vars) by the server's boto3."""
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    }  # fmt: skip
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield client
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    server.stop()


def put(s3, adapter_id: str, config: bytes | None, weights: bytes | None) -> None:
    for name, body in (("adapter_config.json", config), ("adapter_model.safetensors", weights)):
        if body is not None:
            s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{adapter_id}/{name}", Body=body)


@pytest.fixture(scope="module")
def server(s3, tiny_base, tokenizer, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sources")
    client = start_client(
        tiny_base, tokenizer, tmp, max_upload_mb=1, max_rank=16, max_total_tokens=256,
        adapter_source=[f"s3://{BUCKET}/{PREFIX}"], adapter_source_refresh=REFRESH_S,
    )  # fmt: skip
    assert upload(client, *make_adapter(tiny_base, seed=100), "resident").status_code == 201
    yield client
    client.__exit__(None, None, None)


def post_generate(client, adapter_id: str, **parameters):
    body = {
        "inputs": "Hello there",
        "parameters": {"adapter_id": adapter_id, "max_new_tokens": 8, **parameters},
    }
    return client.post("/generate", json=body)


def test_fetched_adapter_answers_like_the_same_files_uploaded(server, s3, tiny_base) -> None:
    files = make_adapter(tiny_base, seed=1, r=8, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    put(s3, "from-s3", *files)
    assert "from-s3" not in [a["id"] for a in server.get("/adapters").json()]
    fetched = generate(server, "from-s3")
    assert upload(server, *files, "uploaded-twin").status_code == 201
    assert fetched == generate(server, "uploaded-twin")
    assert fetched != generate(server, None)  # the adapter changes the answer: the comparison means something
    summary = server.get("/adapters/from-s3").json()  # stored locally as a cache
    twin = server.get("/adapters/uploaded-twin").json()
    assert summary["sha256"] == twin["sha256"]
    assert summary["source"]["uri"] == f"s3://{BUCKET}/{PREFIX}"
    assert summary["source"]["weights_etag"] and "source" not in twin
    # screened like the upload (issue 30): the same coverage and warnings
    assert summary["coverage"] == twin["coverage"] and summary["coverage"]["modules"] == 8
    assert summary["warnings"] == twin["warnings"]
    fetches = server.get("/info").json()["adapter_sources"]["fetches"]
    assert fetches >= 1
    assert generate(server, "from-s3", adapter_source="s3") == fetched  # served from the cache
    info = server.get("/info").json()["adapter_sources"]
    assert info == {"uris": [f"s3://{BUCKET}/{PREFIX}"], "fetches": fetches, "refresh_seconds": REFRESH_S}


def test_changed_object_is_served_as_a_new_version_after_the_refresh(server, s3, tiny_base) -> None:
    put(s3, "moving", *make_adapter(tiny_base, seed=2))
    first = generate(server, "moving")
    old = server.app.state.store.record("moving")
    new_files = make_adapter(tiny_base, seed=3)
    put(s3, "moving", *new_files)
    assert generate(server, "moving") == first  # within the refresh period: the cached version
    time.sleep(REFRESH_S + 0.1)
    second = generate(server, "moving")
    assert upload(server, *new_files, "moving-reference").status_code == 201
    assert second == generate(server, "moving-reference") != first
    record = server.app.state.store.record("moving")
    assert record.version != old.version and record.sha256 != old.sha256
    assert server.get("/adapters/moving").json()["source"]["sha256"] == record.sha256
    time.sleep(REFRESH_S + 0.1)
    assert generate(server, "moving") == second  # unchanged ETags: the same version
    assert server.app.state.store.record("moving").version == record.version


def test_missing_and_invalid_adapters(server, s3, tiny_base) -> None:
    r = post_generate(server, "nowhere")
    assert r.status_code == 404, r.text
    config, weights = make_adapter(tiny_base, seed=4)
    put(s3, "bad-json", b"{not json", weights)
    put(
        s3,
        "bad-weights",
        config,
        raw_safetensors({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 99]}}),
    )
    put(s3, "no-weights", config, None)
    put(s3, "too-high-rank", *make_adapter(tiny_base, seed=5, r=32))  # over --max-rank 16
    for adapter_id in ("bad-json", "bad-weights", "no-weights", "too-high-rank"):
        r = post_generate(server, adapter_id)
        assert r.status_code == 422, (adapter_id, r.text)
        assert adapter_id in r.json()["error"] and f"s3://{BUCKET}/{PREFIX}" in r.json()["error"]
    listed = [a["id"] for a in server.get("/adapters").json()]
    assert not {"nowhere", "bad-json", "bad-weights", "no-weights", "too-high-rank"} & set(listed)
    assert generate(server, "resident")  # still serving


def test_openai_model_names_a_source_adapter(server, s3, tiny_base) -> None:
    put(s3, "oa-adapter", *make_adapter(tiny_base, seed=7))
    body = {"prompt": "Hello there", "max_tokens": 6, "temperature": 0}
    r = server.post("/v1/completions", json={**body, "model": "oa-adapter"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == generate(server, "oa-adapter", n=6)
    r = server.post("/v1/completions", json={**body, "model": "oa-missing"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text


def test_adapter_source_parameter(server, s3, tiny_base) -> None:
    put(s3, "only-in-s3", *make_adapter(tiny_base, seed=6))
    r = post_generate(server, "only-in-s3", adapter_source="local")
    assert r.status_code == 404, r.text  # local: no source is asked
    assert server.app.state.store.record("only-in-s3") is None
    assert post_generate(server, "only-in-s3", adapter_source="s3").status_code == 200
    r = post_generate(server, "resident", adapter_source="s3")
    assert r.status_code == 409 and r.json()["error_type"] == "source_conflict", r.text
    r = post_generate(server, "not-there", adapter_source="s3")
    assert r.status_code == 404 and f"s3://{BUCKET}/{PREFIX}" in r.json()["error"], r.text
    r = post_generate(server, "resident", adapter_source="hub")
    assert r.status_code == 400 and r.json()["error_type"] == "source_not_configured", r.text
    assert post_generate(server, "resident", adapter_source="ftp").status_code == 422


def test_unreachable_source_is_503_and_other_requests_are_served(server) -> None:
    """A source that accepts connections and never answers: its fetch times out off the event loop."""
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)  # connects succeed (backlog); nothing ever answers
        port = hole.getsockname()[1]
        config = Config(connect_timeout=1, read_timeout=3, retries={"max_attempts": 1})
        dead = S3Source(
            S3Location.parse("s3://silent/x"),
            lambda: boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", config=config),
        )
        sources = server.app.state.sources
        sources.sources.append(dead)  # after the moto source, which lacks the id
        try:
            answers: dict[str, object] = {}
            stalled = threading.Thread(target=lambda: answers.update(r=post_generate(server, "ghost")))
            stalled.start()
            time.sleep(0.3)
            started = time.monotonic()
            assert generate(server, "resident")
            base = server.app.state.base.name  # names the base model: no source is asked
            completion = {"model": base, "prompt": "Hi", "max_tokens": 2}
            assert server.post("/v1/completions", json=completion).status_code == 200
            assert stalled.is_alive(), "the other requests had to wait for the stalled fetch"
            assert time.monotonic() - started < 2.5
            stalled.join(30)
            r = answers["r"]
            assert r.status_code == 503, r.text
            assert r.json()["error_type"] == "source_unavailable" and "s3://silent/x" in r.json()["error"]
        finally:
            sources.sources.remove(dead)
    assert post_generate(server, "ghost").status_code == 404  # the server is fine; ghost is simply missing
    assert json.loads(server.get("/health").text)


def test_serve_checks_the_source_option() -> None:
    """A malformed source stops `serve` with a message."""
    from typer.testing import CliRunner

    from server.cli import app

    bad = CliRunner().invoke(app, ["serve", "--adapter-source", "https://bucket/x"])
    assert bad.exit_code == 2 and "not an S3 location" in bad.output


def test_fetched_adapter_whose_targets_match_nothing_is_a_422_naming_them(server, s3, tiny_base) -> None:
    config = json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]}).encode()
    put(s3, "gpt2-like", config, make_adapter(tiny_base, seed=3)[1])
    r = post_generate(server, "gpt2-like")
    assert r.status_code == 422, r.text
    assert "c_attn" in r.json()["error"] and "match no module" in r.json()["error"]
    assert "gpt2-like" not in [a["id"] for a in server.get("/adapters").json()]


class SlowSource:
    """A source that sleeps before each fetch (a slow S3), recording the engine's steps meanwhile."""

    def __init__(self, inner: S3Source, engine, seconds: float) -> None:
        self.inner, self.engine, self.seconds = inner, engine, seconds
        self.uri = inner.uri
        self.steps_during: list[int] = []

    def etags(self, adapter_id: str):
        return self.inner.etags(adapter_id)

    def fetch(self, adapter_id: str, max_bytes: int):
        before = self.engine.steps
        time.sleep(self.seconds)
        self.steps_during.append(self.engine.steps - before)
        return self.inner.fetch(adapter_id, max_bytes)


def test_a_slow_source_stalls_no_running_stream(server, s3, tiny_base) -> None:
    """Issue 29: while a cold adapter is fetched (slowly), a running stream keeps decoding (engine
    steps go on during the fetch), and the fetched adapter is served once it arrives."""
    sources = server.app.state.sources
    engine = server.app.state.engine
    put(s3, "slow-one", *make_adapter(tiny_base, seed=7, r=8))
    slow = SlowSource(sources.sources[0], engine, seconds=1.0)
    sources.sources.insert(0, slow)
    try:
        long_body = {"inputs": "Tell me", "parameters": {"adapter_id": "resident", "max_new_tokens": 200,
                                                        "ignore_eos": True, "details": True}}  # fmt: skip
        answers: dict[str, object] = {}
        running = threading.Thread(target=lambda: answers.update(r=server.post("/generate", json=long_body)))
        running.start()
        deadline = time.monotonic() + 10
        while engine.num_running == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.num_running == 1, "the long stream never started"
        cold = post_generate(server, "slow-one")
        running.join(60)
    finally:
        sources.sources.remove(slow)
    assert cold.status_code == 200, cold.text
    assert answers["r"].status_code == 200 and answers["r"].json()["details"]["generated_tokens"] == 200
    assert slow.steps_during and slow.steps_during[0] >= 10, slow.steps_during
