"""``serve --ray`` with tenants (issue 28): the store deployment owns the tenant table; the ingress
checks a tenant's key there (by its sha256) and the replica serves the tenant's namespace.

Two replicas of the tiny random Llama: a tenant's quotas hold for the whole cluster, not per replica.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.adapter_files import files_parts, make_adapter
from tests.ray_helpers import ray_cluster, tiny_cluster_settings

pytestmark = pytest.mark.integration
ADMIN = {"Authorization": "Bearer cluster-admin"}
API = {"Authorization": "Bearer cluster-api"}


@pytest.fixture(scope="module")
def cluster(tiny_base_dir, tmp_path_factory) -> Iterator[httpx.Client]:
    root = tmp_path_factory.mktemp("ray-tenants")
    settings = tiny_cluster_settings(tiny_base_dir, root, api_key="cluster-api", admin_key="cluster-admin")
    with ray_cluster(settings, 2) as client:
        yield client


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _tokens(client: httpx.Client, headers: dict, adapter_id: str) -> list[int]:
    params = {"adapter_id": adapter_id, "max_new_tokens": 6, "details": True}
    r = client.post("/generate", json={"inputs": "Hello there", "parameters": params}, headers=headers)
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


def test_the_cluster_enforces_the_tenant_rules(cluster: httpx.Client, tiny_base) -> None:
    keys = {}
    for tenant in ("acme", "globex"):
        made = cluster.post("/admin/tenants", json={"id": tenant}, headers=ADMIN)
        assert made.status_code == 201, made.text
        keys[tenant] = made.json()["key"]
    assert cluster.get("/admin/tenants", headers=_bearer(keys["acme"])).status_code == 403
    for seed, (tenant, adapter_id) in enumerate((("acme", "bot"), ("globex", "bot"), ("globex", "secret"))):
        config, weights = make_adapter(tiny_base, seed=30 + seed, targets=("q_proj", "v_proj", "o_proj"))
        up = cluster.post("/adapters", files=files_parts(config, weights), data={"adapter_id": adapter_id},
                          headers=_bearer(keys[tenant]))  # fmt: skip
        assert up.status_code == 201, up.text
    acme, globex = _bearer(keys["acme"]), _bearer(keys["globex"])
    assert _tokens(cluster, acme, "bot") == _tokens(cluster, ADMIN, "acme~bot")
    assert _tokens(cluster, globex, "bot") == _tokens(cluster, ADMIN, "globex~bot")
    assert _tokens(cluster, acme, "bot") != _tokens(cluster, globex, "bot")
    assert [a["id"] for a in cluster.get("/adapters", headers=acme).json()] == ["bot"]
    assert [a["id"] for a in cluster.get("/adapters", headers=API).json()] == []

    def answers(adapter_id: str) -> list[tuple[int, str]]:
        calls = [
            (
                "POST",
                "/generate",
                {"inputs": "Hi", "parameters": {"adapter_id": adapter_id, "max_new_tokens": 2}},
            ),
            ("POST", "/v1/completions", {"model": adapter_id, "prompt": "Hi", "max_tokens": 2}),
            ("GET", f"/adapters/{adapter_id}", None),
            ("GET", f"/adapters/{adapter_id}/analysis", None),
            ("GET", f"/adapters/{adapter_id}/download", None),
            ("DELETE", f"/adapters/{adapter_id}", None),
        ]
        out = []
        for method, path, body in calls:
            r = cluster.request(method, path, json=body, headers=acme)
            out.append((r.status_code, r.text.replace(adapter_id, "<id>")))
        return out

    missing = answers("nothere")
    assert {status for status, _ in missing} == {404}, missing
    assert answers("secret") == missing  # globex's adapter: exactly the unknown id's answer

    rotated = cluster.post("/admin/tenants/acme/keys", headers=ADMIN).json()["key"]
    assert cluster.get("/adapters", headers=acme).status_code == 401
    assert _tokens(cluster, _bearer(rotated), "bot") == _tokens(cluster, ADMIN, "acme~bot")
    assert cluster.delete("/admin/tenants/acme", headers=ADMIN).status_code == 204
    assert cluster.get("/adapters", headers=_bearer(rotated)).status_code == 401
    assert [a["id"] for a in cluster.get("/adapters", headers=ADMIN).json()] == [
        "globex~bot",
        "globex~secret",
    ]


def test_a_tenants_quotas_hold_for_the_whole_cluster(cluster: httpx.Client) -> None:
    """Counted per replica, two replicas would let a tenant run twice its quota; the store counts."""
    made = cluster.post("/admin/tenants", json={"id": "busy", "max_concurrent_requests": 1}, headers=ADMIN)
    assert made.status_code == 201, made.text
    busy = _bearer(made.json()["key"])
    long = {"inputs": "Hello there", "parameters": {"max_new_tokens": 200, "ignore_eos": True}}
    with ThreadPoolExecutor(4) as pool:  # the base model: Ray spreads these over both replicas
        answers = list(pool.map(lambda _: cluster.post("/generate", json=long, headers=busy), range(4)))
    assert sorted(a.status_code for a in answers) == [200, 429, 429, 429], [a.text for a in answers]
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.json()["error_type"] == "quota_exceeded"
    assert "max_concurrent_requests" in refused.json()["error"] and refused.headers["retry-after"]
    deadline = time.monotonic() + 10  # the place comes back once the answer is sent (Retry-After: 1)
    while (again := cluster.post("/generate", json=long, headers=busy)).status_code == 429:
        assert time.monotonic() < deadline, "the tenant's cluster place was never given back"
        time.sleep(0.5)
    assert again.status_code == 200, again.text

    made = cluster.post("/admin/tenants", json={"id": "chatty", "max_tokens_per_minute": 50}, headers=ADMIN)
    chatty = _bearer(made.json()["key"])
    first = {"inputs": "Hello there", "parameters": {"max_new_tokens": 60, "ignore_eos": True}}
    assert cluster.post("/generate", json=first, headers=chatty).status_code == 200  # > 50 tokens
    time.sleep(1.0)  # the replica passes its count on to the store without waiting for it
    short = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}
    with ThreadPoolExecutor(4) as pool:  # on either replica, including one that served nothing of it
        later = list(pool.map(lambda _: cluster.post("/generate", json=short, headers=chatty), range(4)))
    assert [a.status_code for a in later] == [429] * 4, [a.text for a in later]
    assert all("max_tokens_per_minute" in a.json()["error"] for a in later)


def _base_requests(cluster: httpx.Client) -> dict[str, int]:
    """Requests for the base model each replica served (fresh: replicas report every second)."""
    time.sleep(1.5)
    return {
        r["replica"]: r["requests"].get("", 0) for r in cluster.get("/health").json()["replicas"]["detail"]
    }


def test_the_admins_info_shows_each_tenants_usage_in_the_whole_cluster(cluster: httpx.Client) -> None:
    """/info is answered by one replica; the tenants it lists come from the store with the cluster's counts."""
    made = cluster.post("/admin/tenants", json={"id": "spread"}, headers=ADMIN)
    assert made.status_code == 201, made.text
    spread = _bearer(made.json()["key"])
    body = {"inputs": "Hello there", "parameters": {"max_new_tokens": 6, "ignore_eos": True, "details": True}}
    start, counted = _base_requests(cluster), 0
    for _ in range(5):  # until both replicas served some of its requests
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: cluster.post("/generate", json=body, headers=spread), range(4)))
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        counted += sum(
            a.json()["details"]["prompt_tokens"] + a.json()["details"]["generated_tokens"] for a in answers
        )
        served = _base_requests(cluster)
        if all(served[rid] > start.get(rid, 0) for rid in served):
            break
    assert len(served) == 2 and all(served[rid] > start.get(rid, 0) for rid in served), (start, served)
    info = cluster.get("/info", headers=ADMIN).json()
    usage = next(t for t in info["tenants"] if t["id"] == "spread")
    assert usage["tokens_last_minute"] == counted and usage["running_requests"] == 0
    assert cluster.get("/admin/tenants/spread", headers=ADMIN).json()["tokens_last_minute"] == counted
