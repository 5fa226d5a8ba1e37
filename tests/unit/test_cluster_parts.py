"""The Ray-free parts of ``server.cluster``: routing, the ASGI bridge, merged metrics, CLI flags."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from server.cli import app as cli
from server.cluster.asgi_bridge import HttpCall, ResponseStart, run_asgi
from server.cluster.metrics_merge import merge_expositions
from server.cluster.routing import adapter_names, target_of
from server.metrics import Metrics


@pytest.mark.parametrize(
    ("method", "path", "target"),
    [
        ("GET", "/health", "health"),
        ("GET", "/metrics", "metrics"),
        ("GET", "/adapters", "store"),
        ("POST", "/adapters", "store"),
        ("GET", "/adapters/a1", "store"),
        ("DELETE", "/adapters/a1", "store"),
        ("GET", "/adapters/a1/download", "store"),
        ("GET", "/adapters/compare", "replica"),
        ("GET", "/adapters/a1/analysis", "replica"),
        ("GET", "/adapters/a1/analysis.png", "replica"),
        ("POST", "/adapters/a1/shrink", "unsupported"),
        ("POST", "/generate", "replica"),
        ("POST", "/generate_stream", "replica"),
        ("POST", "/v1/chat/completions", "replica"),
        ("GET", "/v1/models", "replica"),
        ("GET", "/info", "replica"),
    ],
)
def test_target_of(method: str, path: str, target: str) -> None:
    assert target_of(method, path) == target


def test_adapter_names_come_from_the_body_path_and_compare_query() -> None:
    body = json.dumps({"inputs": "x", "parameters": {"adapter_id": "a"}, "model": "b"}).encode()
    assert adapter_names("/generate", {}, body) == ["a", "b"]
    assert adapter_names("/v1/completions", {}, b'{"model": "m", "prompt": "x"}') == ["m"]
    assert adapter_names("/adapters/z/analysis", {}, b"") == ["z"]
    assert adapter_names("/adapters/compare", {"a": "p", "b": "q"}, b"") == ["p", "q"]
    assert adapter_names("/generate", {}, b"not json") == []


def _app() -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(payload: dict) -> dict:
        return {"got": payload}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def pieces():
            for i in range(3):
                yield f"data: {i}\n\n"

        return StreamingResponse(pieces(), media_type="text/event-stream")

    return app


async def _collect(app: FastAPI, call: HttpCall) -> tuple[ResponseStart, list[bytes]]:
    items = [item async for item in run_asgi(app, call)]
    start, chunks = items[0], items[1:]
    assert isinstance(start, ResponseStart)
    return start, chunks  # type: ignore[return-value]


def test_run_asgi_answers_like_the_app() -> None:
    app = _app()
    body = b'{"k": 1}'
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    start, chunks = asyncio.run(_collect(app, HttpCall("POST", "/echo", headers=headers, body=body)))
    assert start.status == 200
    assert json.loads(b"".join(chunks)) == {"got": {"k": 1}}
    start, chunks = asyncio.run(_collect(app, HttpCall("GET", "/stream")))
    assert (b"content-type", b"text/event-stream; charset=utf-8") in start.headers
    assert chunks == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]  # streamed piece by piece
    start, _ = asyncio.run(_collect(app, HttpCall("GET", "/missing")))
    assert start.status == 404


def test_merged_metrics_have_one_family_and_a_replica_label() -> None:
    texts = {}
    for replica, n in (("r1", 2), ("r2", 3)):
        metrics = Metrics(lambda: (None, None))
        for _ in range(n):
            metrics.observe_request("/generate", "a", 200, 0.1)
        texts[replica] = metrics.exposition().decode()
    text = merge_expositions(texts).decode()
    assert text.count("# TYPE loraplex_requests_total counter") == 1
    families = {f.name: f for f in text_string_to_metric_families(text)}
    values = {
        s.labels["replica"]: s.value
        for s in families["loraplex_requests"].samples
        if s.name == "loraplex_requests_total"
    }
    assert values == {"r1": 2.0, "r2": 3.0}


@pytest.mark.parametrize("flags", [["--replicas", "2"], ["--ray-address", "auto"]])
def test_cluster_flags_need_ray(flags: list[str], tmp_path) -> None:
    result = CliRunner().invoke(cli, ["serve", "--data-dir", str(tmp_path), *flags])
    assert result.exit_code == 2
    assert "need --ray" in result.output
