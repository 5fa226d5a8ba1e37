"""Tenants (issue 28): keys managed by the admin, namespaces, shared adapters, quotas, visibility."""

from __future__ import annotations

import io
import json
import logging
import threading
from pathlib import Path

import httpx
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


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def upload(client, headers, adapter_id: str, model, seed: int):
    config, weights = make_adapter(model, seed=seed)
    return client.post("/adapters", files=files_parts(config, weights), data={"adapter_id": adapter_id},
                       headers=headers)  # fmt: skip


def tokens(client, headers, adapter_id: str | None, prompt: str = "Hello there") -> list[tuple[int, float]]:
    params = {"max_new_tokens": 4, "details": True, **({"adapter_id": adapter_id} if adapter_id else {})}
    r = client.post("/generate", json={"inputs": prompt, "parameters": params}, headers=headers)
    assert r.status_code == 200, r.text
    return [(t["id"], round(t["logprob"], 4)) for t in r.json()["details"]["tokens"]]


@pytest.fixture(scope="module")
def served(tiny_base, tokenizer, tmp_path_factory):
    """A keyed server with tenants acme and globex, each with its own ``bot``, and a shared ``common``."""
    workdir = tmp_path_factory.mktemp("tenants")
    client = start_client(tiny_base, tokenizer, workdir, api_key=API_KEY, admin_key=ADMIN_KEY)
    keys = {}
    for tenant in ("acme", "globex"):
        created = client.post("/admin/tenants", json={"id": tenant}, headers=ADMIN)
        assert created.status_code == 201, created.text
        keys[tenant] = created.json()["key"]
    assert upload(client, bearer(keys["acme"]), "bot", tiny_base, seed=1).status_code == 201
    assert upload(client, bearer(keys["globex"]), "bot", tiny_base, seed=2).status_code == 201
    assert upload(client, bearer(keys["globex"]), "secret", tiny_base, seed=3).status_code == 201
    assert upload(client, ADMIN, "common", tiny_base, seed=4).status_code == 201
    yield client, keys, workdir
    client.__exit__(None, None, None)


def test_tenant_management_is_the_admins(served) -> None:
    client, keys, _ = served
    listed = client.get("/admin/tenants", headers=ADMIN)
    assert listed.status_code == 200 and [t["id"] for t in listed.json()] == ["acme", "globex"]
    assert all(k not in listed.text for k in keys.values()) and "key" not in listed.json()[0]
    assert listed.json()[0]["adapters"] == 1 and listed.json()[0]["storage_bytes"] > 0
    assert client.get("/admin/tenants", headers=API).status_code == 403
    forbidden = client.get("/admin/tenants", headers=bearer(keys["acme"]))
    assert forbidden.status_code == 403 and "admin key" in forbidden.json()["error"]
    assert client.post("/admin/tenants", json={"id": "acme"}, headers=ADMIN).status_code == 409
    assert client.post("/admin/tenants", json={"id": "bad/id"}, headers=ADMIN).status_code == 422
    assert (
        client.post("/admin/tenants", json={"id": "x", "max_adapters": -1}, headers=ADMIN).status_code == 422
    )
    assert client.patch("/admin/tenants/nobody", json={"max_adapters": 3}, headers=ADMIN).status_code == 404


def test_two_tenants_bot_adapters_give_their_own_outputs(served) -> None:
    client, keys, _ = served
    acme, globex = tokens(client, bearer(keys["acme"]), "bot"), tokens(client, bearer(keys["globex"]), "bot")
    assert acme != globex
    assert acme == tokens(client, ADMIN, "acme~bot") and globex == tokens(client, ADMIN, "globex~bot")
    assert acme != tokens(client, ADMIN, None)  # the adapter is applied, not the base
    body = {"inputs": "Hi", "parameters": {"adapter_id": "bot", "max_new_tokens": 1}}
    own = client.post("/generate", json=body, headers=bearer(keys["acme"]))
    assert own.json()["details"]["adapter_id"] == "bot" and own.headers["x-adapter-id"] == "bot"
    body["parameters"]["adapter_id"] = "acme~bot"
    assert client.post("/generate", json=body, headers=ADMIN).json()["details"]["adapter_id"] == "acme~bot"


def test_listings_show_own_and_shared_adapters(served) -> None:
    client, keys, _ = served
    ids = lambda headers: [a["id"] for a in client.get("/adapters", headers=headers).json()]  # noqa: E731
    assert ids(bearer(keys["acme"])) == ["bot", "common"]
    assert ids(bearer(keys["globex"])) == ["bot", "common", "secret"]
    assert ids(API) == ["common"]  # the default tenant sees the shared adapters
    assert ids(ADMIN) == ["acme~bot", "common", "globex~bot", "globex~secret"]  # qualified by tenant
    models = client.get("/v1/models", headers=bearer(keys["acme"])).json()["data"]
    assert {m["id"] for m in models} == {"tiny-llama", "bot", "common"}
    info = client.get("/info", headers=bearer(keys["acme"])).json()
    assert info["tenant"] == "acme" and "tenants" not in info and info["adapters"] == ["bot", "common"]
    assert not any("globex" in a or "secret" in a for a in info["adapters_loaded"])
    admin_info = client.get("/info", headers=ADMIN).json()
    assert admin_info["tenant"] == "_admin" and [t["id"] for t in admin_info["tenants"]] == ["acme", "globex"]


def _answers(client, headers, adapter_id: str) -> list[tuple[int, str]]:
    """What each route answers for ``adapter_id``, with the id itself blanked out."""
    gen = {"max_new_tokens": 2}
    merged = {"ids": ["common", adapter_id], "weights": [0.5, 0.5]}
    calls = [
        ("POST", "/generate", {"inputs": "Hi", "parameters": {**gen, "adapter_id": adapter_id}}),
        ("POST", "/generate_stream", {"inputs": "Hi", "parameters": {**gen, "adapter_id": adapter_id}}),
        ("POST", "/", {"inputs": "Hi", "parameters": {**gen, "adapter_id": adapter_id}}),
        ("POST", "/v1/completions", {"model": adapter_id, "prompt": "Hi", "max_tokens": 2}),
        (
            "POST",
            "/v1/chat/completions",
            {"model": adapter_id, "messages": [{"role": "user", "content": "Hi"}]},
        ),
        ("POST", "/v1/responses", {"model": adapter_id, "input": "Hi", "max_output_tokens": 2}),
        ("POST", "/generate", {"inputs": "Hi", "parameters": {**gen, "merged_adapters": merged}}),
        ("POST", "/adapters/compose", {"sources": [{"id": adapter_id, "weight": 1.0}], "new_id": "mix"}),
        ("GET", f"/adapters/{adapter_id}", None),
        ("GET", f"/adapters/{adapter_id}/analysis", None),
        ("GET", f"/adapters/compare?a=common&b={adapter_id}", None),
        ("GET", f"/adapters/{adapter_id}/download", None),
        ("POST", f"/adapters/{adapter_id}/shrink", {"method": "rank", "value": 2, "new_id": "small"}),
        ("DELETE", f"/adapters/{adapter_id}", None),
    ]
    out = []
    for method, path, body in calls:
        r = client.request(method, path, json=body, headers=headers)
        out.append((r.status_code, r.text.replace(adapter_id, "<id>")))
    return out


def test_another_tenants_adapter_is_exactly_the_plain_404_on_every_route(served) -> None:
    client, keys, _ = served
    acme = bearer(keys["acme"])
    missing = _answers(client, acme, "nothere")
    assert [status for status, _ in missing] == [404] * len(missing), missing
    assert _answers(client, acme, "secret") == missing  # globex's: no existence leak
    assert _answers(client, acme, "globex~secret") == _answers(client, acme, "globex~nothere")
    assert client.get("/adapters/secret", headers=bearer(keys["globex"])).status_code == 200  # still there


def test_the_admins_shared_adapter_is_usable_not_changeable_by_tenants(served, tiny_base) -> None:
    client, keys, _ = served
    acme = bearer(keys["acme"])
    assert tokens(client, acme, "common") == tokens(client, ADMIN, "common")
    refused = client.delete("/adapters/common", headers=acme)
    assert refused.status_code == 403 and "shared" in refused.json()["error"]
    assert client.get("/adapters/common", headers=bearer(keys["globex"])).status_code == 200
    mix = {"sources": [{"id": "bot", "weight": 0.5}, {"id": "common", "weight": 0.5}], "new_id": "mix"}
    composed = client.post("/adapters/compose", json=mix, headers=acme)
    assert composed.status_code == 201 and composed.json()["id"] == "mix"
    assert [s["id"] for s in composed.json()["compose"]["sources"]] == ["bot", "common"]
    assert client.get("/adapters/mix", headers=bearer(keys["globex"])).status_code == 404
    assert client.delete("/adapters/mix", headers=acme).status_code == 204
    assert client.delete("/adapters/common", headers=API).status_code == 403  # the API key never writes


def test_storage_and_adapter_quotas_are_429_quota_exceeded(served, tiny_base) -> None:
    client, keys, _ = served
    acme = bearer(keys["acme"])
    assert (
        client.patch("/admin/tenants/acme", json={"max_adapters": 1}, headers=ADMIN).json()["max_adapters"]
        == 1
    )
    over = upload(client, acme, "second", tiny_base, seed=5)
    assert over.status_code == 429 and over.json()["error_type"] == "quota_exceeded"
    assert "max_adapters" in over.json()["error"]
    assert upload(client, bearer(keys["globex"]), "third", tiny_base, seed=5).status_code == 201  # not globex
    client.patch("/admin/tenants/acme", json={"max_adapters": None, "max_storage_mb": 0}, headers=ADMIN)
    full = upload(client, acme, "second", tiny_base, seed=5)
    assert full.status_code == 429 and "max_storage_mb" in full.json()["error"]
    mix = {"sources": [{"id": "bot", "weight": 1.0}], "new_id": "mix"}
    assert client.post("/adapters/compose", json=mix, headers=acme).status_code == 429
    client.patch("/admin/tenants/acme", json={"max_storage_mb": None}, headers=ADMIN)
    assert upload(client, acme, "second", tiny_base, seed=5).status_code == 201
    assert client.delete("/adapters/second", headers=acme).status_code == 204
    assert client.delete("/adapters/third", headers=bearer(keys["globex"])).status_code == 204


def test_tokens_per_minute_quota_is_429_with_retry_after(served) -> None:
    client, keys, _ = served
    made = client.post("/admin/tenants", json={"id": "metered", "max_tokens_per_minute": 5}, headers=ADMIN)
    metered = bearer(made.json()["key"])
    try:
        tokens(client, metered, "common")  # a prompt and 4 tokens: past 5
        short = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}
        refused = client.post("/generate", json=short, headers=metered)
        assert refused.status_code == 429 and refused.json()["error_type"] == "quota_exceeded"
        assert "max_tokens_per_minute" in refused.json()["error"]
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert tokens(client, bearer(keys["acme"]), "bot")  # another tenant is served meanwhile
        text = client.get("/metrics").text
        assert metric_value(text, "loraplex_requests_total", tenant="metered", status="429") == 1
        assert metric_value(text, "loraplex_generated_tokens_total", tenant="metered") == 4
        assert metric_value(text, "loraplex_generated_tokens_total", tenant="acme") >= 4
        usage = client.get("/admin/tenants/metered", headers=ADMIN).json()
        assert usage["tokens_last_minute"] >= 5 and usage["running_requests"] == 0
    finally:
        client.delete("/admin/tenants/metered", headers=ADMIN)


def test_rotation_revokes_the_old_key(served, tiny_base) -> None:
    client, _, _ = served
    old = client.post("/admin/tenants", json={"id": "rotor"}, headers=ADMIN).json()["key"]
    assert client.get("/adapters", headers=bearer(old)).status_code == 200
    rotated = client.post("/admin/tenants/rotor/keys", headers=ADMIN)
    assert rotated.status_code == 201
    new = rotated.json()["key"]
    assert new != old and client.get("/adapters", headers=bearer(new)).status_code == 200
    assert client.get("/adapters", headers=bearer(old)).status_code == 401
    assert upload(client, bearer(new), "spin", tiny_base, seed=6).status_code == 201
    assert "rotor~spin" in [a["id"] for a in client.get("/adapters", headers=ADMIN).json()]
    assert client.delete("/admin/tenants/rotor", headers=ADMIN).status_code == 204
    assert client.get("/adapters", headers=bearer(new)).status_code == 401
    assert "rotor~spin" not in [
        a["id"] for a in client.get("/adapters", headers=ADMIN).json()
    ]  # its adapters go


def test_the_access_log_names_the_tenant_and_no_key_is_logged_or_stored(served, tiny_base) -> None:
    client, keys, workdir = served
    stream = io.StringIO()
    handler = make_handler("json", stream)
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        made = client.post("/admin/tenants", json={"id": "logged"}, headers=ADMIN).json()["key"]
        tokens(client, bearer(keys["acme"]), "bot")
        client.get("/adapters", headers=bearer(made))
        client.post("/admin/tenants/logged/keys", headers=ADMIN)
        client.get("/health")
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    access = [line for line in lines if line["logger"] == "loraplex.access"]
    assert len(access) >= 5 and all("tenant" in line for line in access)
    assert {"_admin", "acme", "logged"} <= {line["tenant"] for line in access}
    logged = stream.getvalue()
    for key in [*keys.values(), made, ADMIN_KEY]:
        assert key not in logged
        for path in Path(workdir).rglob("*"):
            if path.is_file():
                assert key.encode() not in path.read_bytes(), path
    client.delete("/admin/tenants/logged", headers=ADMIN)


def test_tenants_need_the_admin_key(tiny_base, tokenizer, tmp_path) -> None:
    client = start_client(tiny_base, tokenizer, tmp_path, api_key=API_KEY)
    try:
        refused = client.post("/admin/tenants", json={"id": "acme"}, headers=API)
        assert refused.status_code == 409 and "LORAPLEX_ADMIN_KEY" in refused.json()["error"]
    finally:
        client.__exit__(None, None, None)


def test_a_restart_keeps_tenants_and_their_adapters(tiny_base, tokenizer, tmp_path) -> None:
    first = start_client(tiny_base, tokenizer, tmp_path, api_key=API_KEY, admin_key=ADMIN_KEY)
    key = first.post("/admin/tenants", json={"id": "acme", "max_adapters": 4}, headers=ADMIN).json()["key"]
    assert upload(first, bearer(key), "bot", tiny_base, seed=1).status_code == 201
    before = tokens(first, bearer(key), "bot")
    first.__exit__(None, None, None)
    second = start_client(tiny_base, tokenizer, tmp_path, api_key=API_KEY, admin_key=ADMIN_KEY)
    try:
        assert second.get("/admin/tenants/acme", headers=ADMIN).json()["max_adapters"] == 4
        assert [a["id"] for a in second.get("/adapters", headers=bearer(key)).json()] == ["bot"]
        assert tokens(second, bearer(key), "bot") == before
    finally:
        second.__exit__(None, None, None)


@pytest.fixture(scope="module")
def long_model(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(len(tokenizer), max_position_embeddings=8192)).eval()


def test_concurrency_quota_and_a_tenant_deleted_mid_stream(long_model, tokenizer, tmp_path) -> None:
    live = start_live_server(long_model, tokenizer, tmp_path, api_key=API_KEY, admin_key=ADMIN_KEY,
                             max_total_tokens=4096)  # fmt: skip
    try:
        keys = {}
        for tenant in ("acme", "globex"):
            made = httpx.post(live.url + "/admin/tenants", json={"id": tenant, "max_concurrent_requests": 1},
                              headers=ADMIN)  # fmt: skip
            keys[tenant] = made.json()["key"]
        acme = bearer(keys["acme"])
        long_body = {"inputs": "Hi", "parameters": {"max_new_tokens": 300, "ignore_eos": True}}
        short = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}
        events: list[str] = []
        started = threading.Event()

        def hold() -> None:
            with httpx.stream(
                "POST", live.url + "/generate_stream", json=long_body, headers=acme, timeout=60
            ) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        events.append(line)
                        started.set()

        holder = threading.Thread(target=hold)
        holder.start()
        assert started.wait(30)
        busy = httpx.post(live.url + "/generate", json=short, headers=acme, timeout=30)
        assert busy.status_code == 429 and busy.json()["error_type"] == "quota_exceeded"
        assert "max_concurrent_requests" in busy.json()["error"] and busy.headers["retry-after"] == "1"
        assert httpx.post(live.url + "/generate", json=short, headers=bearer(keys["globex"]),
                          timeout=30).status_code == 200  # fmt: skip
        assert httpx.delete(live.url + "/admin/tenants/acme", headers=ADMIN).status_code == 204
        assert httpx.post(live.url + "/generate", json=short, headers=acme, timeout=30).status_code == 401
        holder.join(60)
        last = json.loads(events[-1].removeprefix("data:"))
        assert last["details"]["finish_reason"] == "length" and last["details"]["generated_tokens"] == 300
    finally:
        live.stop()
