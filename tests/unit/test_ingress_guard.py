"""The Ray ingress screens a request (key, Host) and bounds its body before any routing work: an
unauthenticated request naming an adapter reads no body and asks the store nothing (issue 31,
findings 1 and 6). The ingress runs here without a cluster, on fake deployment handles."""

from __future__ import annotations

import httpx
from starlette.requests import Request

from server.cluster.ingress import LoraplexIngress

KEY = "ingress-key"


class FakeStore:
    """Stands for the store's DeploymentHandle: records every call the ingress makes."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str):
        self.calls.append(name)
        raise AssertionError(f"the ingress called the store's {name} before screening the request")


def client(store: FakeStore, **values) -> httpx.AsyncClient:
    ingress = LoraplexIngress(replica=None, store=store, replicas=1, values={"api_key": KEY, **values})

    async def app(scope, receive, send) -> None:
        response = await ingress(Request(scope, receive))
        await response(scope, receive, send)

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1")


async def test_no_key_is_refused_before_the_body_or_the_store() -> None:
    store, pulled = FakeStore(), {"bytes": 0}

    async def body():
        for _ in range(64):
            pulled["bytes"] += 1 << 16
            yield b"a" * (1 << 16)

    async with client(store) as c:
        r = await c.post("/generate", content=body(), headers={"content-type": "application/json"})
        assert r.status_code == 401 and r.json()["error_type"] == "unauthorized"
        r = await c.post("/v1/completions", json={"model": "victim", "prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert store.calls == [] and pulled["bytes"] == 0


async def test_a_body_over_the_limit_is_413_before_routing() -> None:
    store = FakeStore()
    auth = {"Authorization": f"Bearer {KEY}"}
    async with client(store, max_body_kb=4) as c:
        r = await c.post("/generate", content=b"a" * 5000, headers=auth)
        assert r.status_code == 413 and "--max-body-kb" in r.json()["error"]

        async def chunked():
            for _ in range(8):
                yield b"a" * 1024

        r = await c.post("/generate", content=chunked(), headers=auth)
        assert r.status_code == 413
    assert store.calls == []


class _Remote:
    def __init__(self, value) -> None:
        self.value = value

    async def remote(self, *args):
        return self.value


class FailedStore:
    """A store whose start-up failed with an error naming a path."""

    replica_reports = _Remote({})
    status = _Remote({"error": "no model at /srv/secret/model", "ready": False, "adapters": []})


async def test_cluster_health_tells_the_start_up_error_only_to_key_holders() -> None:
    async with client(FailedStore()) as c:  # type: ignore[arg-type]
        r = await c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "failed" and "/srv/secret" not in r.text
        r = await c.get("/health", headers={"Authorization": f"Bearer {KEY}"})
        assert "/srv/secret" in r.json()["error"]
