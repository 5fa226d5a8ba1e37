"""The Ray-free parts of ``server.cluster``: routing, affinity keys, the store's app, the ASGI bridge,
merged metrics, CLI flags."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from adapters.archive import AdapterFiles
from adapters.compose import MAX_SOURCES
from adapters.store import AdapterStore
from server.cli import app as cli
from server.cluster.asgi_bridge import HttpCall, ResponseStart, run_asgi
from server.cluster.metrics_merge import merge_expositions
from server.cluster.routing import (
    adapter_names,
    affinity_key,
    composition_key,
    is_composition_key,
    target_of,
)
from server.cluster.store import LoraplexStore, store_app
from server.config import Settings
from server.metrics import Metrics
from tests.adapter_files import linear_shapes, make_adapter


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
        ("POST", "/adapters/compose", "store"),
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


def _merged_body(ids: list, weights: list[float] | None = None, **merged) -> bytes:
    params = {"merged_adapters": {"ids": ids, "weights": weights or [0.5] * len(ids), **merged}}
    return json.dumps({"inputs": "x", "parameters": params}).encode()


def test_adapter_names_include_the_sources_of_merged_adapters() -> None:
    """A replica syncs what a request names: a composition's sources too (capped like the schema)."""
    assert adapter_names("/generate", {}, _merged_body(["a", "b", "a"])) == ["a", "b"]
    assert adapter_names("/generate", {}, _merged_body(["a", 3, "", None])) == ["a"]  # the 422 is the app's
    body = json.dumps({"model": "m", "parameters": {"merged_adapters": {"ids": ["s"]}}}).encode()
    assert adapter_names("/generate", {}, body) == ["m", "s"]
    many = [f"s{i}" for i in range(MAX_SOURCES + 5)]
    assert adapter_names("/generate", {}, _merged_body(many)) == many[:MAX_SOURCES]
    assert adapter_names("/generate", {}, b'{"parameters": {"merged_adapters": {"ids": "a"}}}') == []


V1, V2 = ("1" * 64, "c" * 64), ("2" * 64, "c" * 64)


def test_composition_key_names_the_composition_and_its_source_versions() -> None:
    body = _merged_body(["a", "b"], [0.7, 0.3], merge_strategy="linear")
    key = composition_key(body, {"a": V1, "b": V1})
    assert key is not None and key.startswith("merged:") and len(key) == len("merged:") + 16
    assert key == composition_key(body, {"a": V1, "b": V1})  # stable: same composition, same replicas
    assert key != composition_key(body, {"a": V2, "b": V1})  # a replaced source: a new key
    assert key != composition_key(
        _merged_body(["a", "b"], [0.3, 0.7], merge_strategy="linear"), {"a": V1, "b": V1}
    )
    assert key != composition_key(
        _merged_body(["b", "a"], [0.7, 0.3], merge_strategy="linear"), {"a": V1, "b": V1}
    )
    assert composition_key(body, {"a": V1, "b": None}) is None  # an unknown source: the replica's 404
    assert composition_key(b'{"inputs": "x", "parameters": {"adapter_id": "a"}}', {"a": V1}) is None
    assert composition_key(b"not json", {}) is None
    assert is_composition_key(key) and not is_composition_key("a")


def test_affinity_key_prefers_the_header_then_a_composition_then_the_adapter() -> None:
    merged = _merged_body(["a", "b"])
    plain = b'{"inputs": "x", "parameters": {"adapter_id": "a"}}'
    versions = {"a": V1, "b": V1, "h": V2, "gone": None}
    assert affinity_key(["a"], versions, plain) == "a"
    assert affinity_key(["a", "b"], versions, merged) == composition_key(merged, versions)
    assert affinity_key(["h", "a", "b"], versions, merged, chosen="h") == "h"  # the client's choice
    assert affinity_key(["gone", "a"], versions, plain, chosen="gone") == "a"  # not stored: ignored
    assert affinity_key([], {}, b'{"inputs": "x"}') == ""  # the base model: any replica
    assert affinity_key(["gone"], versions, b'{"model": "gone"}') == ""


def test_the_store_app_composes_without_an_engine(tiny_base, tmp_path) -> None:
    """POST /adapters/compose in the cluster's store: no engine, only the stored factors and the
    shapes a replica bound; the result is stored (replicas fetch it like an upload)."""
    store = AdapterStore(tmp_path / "store")
    client = TestClient(store_app(Settings(data_dir=tmp_path / "store", max_rank=64), store))
    body = {"sources": [{"id": "a", "weight": 1.0}, {"id": "b", "weight": 0.5}], "new_id": "ab"}
    loading = client.post("/adapters/compose", json=body)
    assert loading.status_code == 503 and loading.json()["error_type"] == "not_ready"
    store.bind_base(linear_shapes(tiny_base), 64)
    for seed, name in enumerate("ab"):
        config, weights = make_adapter(
            tiny_base, seed=seed, r=4, targets=("q_proj", "o_proj")[seed : seed + 1]
        )
        store.put(name, AdapterFiles(config, weights))
    r = client.post("/adapters/compose", json=body)
    assert r.status_code == 201, r.text
    assert r.json()["compose"]["sources"][0]["sha256"] == store.record("a").sha256
    assert client.get("/adapters/ab").json()["id"] == "ab" and "ab" in store
    assert client.post("/adapters/compose", json=body).json()["error_type"] == "adapter_exists"


def test_the_store_describes_tenants_with_the_clusters_counts(tiny_base, tmp_path) -> None:
    """The admin's /info on a cluster lists tenants from the store deployment: its adapters and the
    whole cluster's counts (the ingress takes the places, every replica passes on its tokens)."""
    settings = Settings(
        data_dir=tmp_path / "store", cache_dir=tmp_path / "cache", admin_key="adm", api_key="k"
    )
    store = LoraplexStore(settings.model_dump())
    store.bind_base(linear_shapes(tiny_base), 64)
    store.store.tenants.create("acme", {"max_tokens_per_minute": 1000})
    store.store.tenants.create("globex", {})
    config, weights = make_adapter(tiny_base, seed=3, r=4)
    store.store.put("acme~bot", AdapterFiles(config, weights))
    assert store.quota_take("acme") is None and store.quota_take("acme") is None  # two requests in flight
    store.quota_charge("acme", 7)  # counted by one replica
    store.quota_charge("acme", 5)  # and by the other
    store.quota_leave("acme")  # one answered
    described = {t["id"]: t for t in store.tenants_described()}
    acme = described["acme"]
    assert (acme["running_requests"], acme["tokens_last_minute"], acme["adapters"]) == (1, 12, 1)
    assert acme["storage_bytes"] == len(config) + len(weights) and acme["max_tokens_per_minute"] == 1000
    assert (described["globex"]["running_requests"], described["globex"]["tokens_last_minute"]) == (0, 0)
    client = TestClient(store.app, base_url="http://localhost")  # /admin/tenants runs here on a cluster
    shown = client.get("/admin/tenants/acme", headers={"Authorization": "Bearer adm"})
    assert shown.status_code == 200 and shown.json() == acme


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
