"""loraplex on a real local Ray Serve cluster: 2 replicas of the embedded model, one store.

One cluster for the module (Ray and 2 replicas take ~20-30 s to start on 2 cores). The single
server the outputs are compared with runs first, in-process, and is closed before Ray starts.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import ray  # the `loraplex[ray]` extra: `make setup` installs it

from server.config import Settings
from tests.api_helpers import start_client
from tests.conftest import CACHE_DIR, make_peft_adapter
from tests.live_server import free_port
from tests.ray_helpers import ray_cluster

pytestmark = pytest.mark.integration

ADAPTERS = {  # the first two are --adapter start-up adapters of the cluster; "up" is uploaded through it
    "qv": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "mlp": dict(r=4, lora_alpha=8, target_modules=["up_proj", "down_proj"]),
    "up": dict(r=8, lora_alpha=8, target_modules=["k_proj", "o_proj"]),
}
PROMPTS = ["The capital of France is", "Three colors are"]
NEW_TOKENS = 10
MIXES = {  # merged_adapters (linear) compared with the single server; "up" is a start-up adapter there.
    # The first weight is large so that the two mixes' greedy tokens differ (the adapters are small)
    "qv+mlp": {"ids": ["qv", "mlp"], "weights": [6.0, 0.5], "merge_strategy": "linear"},
    "up+mlp": {"ids": ["up", "mlp"], "weights": [6.0, 0.5], "merge_strategy": "linear"},
}
COMPOSE = {  # POST /adapters/compose: DARE, so the store must draw the same seeded masks as one server
    "sources": [{"id": "qv", "weight": 1.0}, {"id": "mlp", "weight": 0.5}],
    "strategy": "dare_linear", "density": 0.5, "new_id": "qvmlp",
}  # fmt: skip


@dataclass
class Cluster:
    url: str
    client: httpx.Client
    reference: dict[tuple[str | None, str], list[int]]  # (adapter, prompt) -> a single server's greedy ids
    root: Path
    composed: dict  # the single server's answer to POST /adapters/compose with COMPOSE

    def generate(
        self, prompt: str, adapter: str | None, n: int = NEW_TOKENS, ignore_eos: bool = False
    ) -> httpx.Response:
        params = {"adapter_id": adapter, "max_new_tokens": n, "details": True, "ignore_eos": ignore_eos}
        return self.client.post("/generate", json={"inputs": prompt, "parameters": params})

    def replicas(self) -> list[dict]:
        """Each replica's report (fresh: reports arrive every second)."""
        time.sleep(1.5)
        return self.client.get("/health").json()["replicas"]["detail"]


def _ids(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["details"]["tokens"]]


def _upload(client: httpx.Client, adapter_id: str, folder: Path, *, replace: bool = False) -> httpx.Response:
    files = [
        ("files", (name, io.BytesIO((folder / name).read_bytes())))
        for name in ("adapter_config.json", "adapter_model.safetensors")
    ]
    return client.post(
        "/adapters", params={"replace": str(replace).lower()}, files=files, data={"adapter_id": adapter_id}
    )


@pytest.fixture(scope="module")
def cluster(embedded_model, tokenizer, embedded_dir, tmp_path_factory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("ray-cluster")
    for seed, (name, kwargs) in enumerate(ADAPTERS.items()):
        make_peft_adapter(embedded_model, root / name, seed=seed + 10, b_scale=0.05, **kwargs)
    specs = [f"{name}={root / name}" for name in ADAPTERS]

    single = start_client(embedded_model, tokenizer, root / "single", adapter=specs,
                          model_path=embedded_dir, runner="native")  # fmt: skip
    reference = {}
    for adapter in [None, *ADAPTERS]:
        for prompt in PROMPTS:
            params = {"adapter_id": adapter, "max_new_tokens": NEW_TOKENS, "details": True}
            r = single.post("/generate", json={"inputs": prompt, "parameters": params})
            reference[adapter, prompt] = _ids(r)  # type: ignore[arg-type]
    for mix, merged in MIXES.items():
        params = {"merged_adapters": merged, "max_new_tokens": NEW_TOKENS, "details": True}
        reference[mix, PROMPTS[0]] = _ids(
            single.post("/generate", json={"inputs": PROMPTS[0], "parameters": params})
        )
    params = {"adapter_id": "qv", "adapter_scale": 0.5, "max_new_tokens": NEW_TOKENS, "details": True}
    reference["qv*0.5", PROMPTS[0]] = _ids(
        single.post("/generate", json={"inputs": PROMPTS[0], "parameters": params})
    )
    composed = single.post("/adapters/compose", json=COMPOSE)
    assert composed.status_code == 201, composed.text
    params = {"adapter_id": COMPOSE["new_id"], "max_new_tokens": NEW_TOKENS, "details": True}
    reference["qvmlp", PROMPTS[0]] = _ids(
        single.post("/generate", json={"inputs": PROMPTS[0], "parameters": params})
    )
    single.__exit__(None, None, None)

    port = free_port()
    settings = Settings(
        port=port, data_dir=root / "store", cache_dir=CACHE_DIR, adapter=specs[:2], runner="native",
        dtype="float32", device="cpu", kv_cache_tokens=1024, max_total_tokens=512, max_queue=2,
    )  # fmt: skip
    started = time.monotonic()
    with ray_cluster(settings, 2) as client:
        print(f"\ncluster of 2 replicas ready in {time.monotonic() - started:.1f} s")
        yield Cluster(f"http://127.0.0.1:{port}", client, reference, root, composed.json())


def test_health_lists_both_replicas_and_the_store(cluster: Cluster) -> None:
    body = cluster.client.get("/health").json()
    assert body["status"] == "ok"
    assert body["replicas"]["expected"] == 2 and body["replicas"]["ready"] == 2
    assert len({r["replica"] for r in body["replicas"]["detail"]}) == 2
    assert body["store"] == {"ready": True, "adapters": 2}
    assert all(r["mode"] == "auto" for r in body["replicas"]["detail"])


def test_outputs_equal_a_single_server(cluster: Cluster) -> None:
    """Greedy ids through the cluster == one server's, for the base, start-up and uploaded adapters."""
    assert _upload(cluster.client, "up", cluster.root / "up").status_code == 201
    for adapter in [None, *ADAPTERS]:
        for prompt in PROMPTS:
            assert _ids(cluster.generate(prompt, adapter)) == cluster.reference[adapter, prompt], adapter
    # the OpenAI route, streamed through the ingress and Ray's proxy, gives the same text
    text = "".join(line for line in _sse_text(cluster.client, "qv", PROMPTS[0]))
    expected = cluster.client.post(
        "/generate",
        json={"inputs": PROMPTS[0], "parameters": {"adapter_id": "qv", "max_new_tokens": NEW_TOKENS}},
    ).json()["generated_text"]
    assert text == expected


def _sse_text(client: httpx.Client, model: str, prompt: str) -> list[str]:
    import json

    pieces = []
    body = {"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
    assert len(pieces) > 1  # streamed in pieces, not one buffered answer
    return pieces


def test_affinity_keeps_each_adapter_on_one_replica(cluster: Cluster) -> None:
    names = ["qv", "mlp"]
    before = cluster.replicas()
    # sequential, one request at a time; 16 tokens each, so that each replica sees enough uniform steps
    # for auto mode to pay for a merge (2 x swap / step, and an all-MLP adapter's swap is the dearest)
    for i in range(8):
        assert cluster.generate(PROMPTS[i % 2], names[i % 2], n=16).status_code == 200
    after = cluster.replicas()
    # Auto mode merges once uniform traffic has lasted a merge and an unmerge's worth of steps, as
    # timed on the replica: on a loaded machine that can take longer than the 4 requests above, so
    # each adapter not merged yet gets more of the same traffic (bounded) before the checks below.
    for _ in range(6):
        merged_now = {r["merged_adapter"] for r in after}
        missing = [name for name in names if name not in merged_now]
        if not missing:
            break
        print(f"not merged yet: {missing}; replicas: {[(r['merged_adapter'], r['swaps']) for r in after]}")
        for name in missing:
            assert cluster.generate(PROMPTS[0], name, n=32).status_code == 200
        after = cluster.replicas()
    served = _served(before, after)
    print(f"\nsequential workload, requests per replica per adapter: {served}")
    print(f"multiplexed loads per replica: { {r['replica']: r['loads'] for r in after} }")
    for name in names:  # each adapter's requests went to one replica
        assert len([rid for rid, c in served.items() if c[name]]) == 1, served

    # per-replica merging: each replica's own traffic was one adapter, so its auto mode merged it
    merged = {r["replica"]: (r["merged_adapter"], r["swaps"]) for r in after}
    print(f"merged adapter and swaps per replica: {merged}")
    for rid, counts in served.items():
        (only,) = counts
        assert merged[rid][0] == only and merged[rid][1] >= 1, merged

    # Ray's header names the affinity key; the body still chooses the adapter that runs
    (holder,) = [rid for rid, c in served.items() if c["mlp"]]
    headers = {"serve_multiplexed_model_id": "mlp"}
    for prompt in PROMPTS:
        params = {"adapter_id": "up", "max_new_tokens": NEW_TOKENS, "details": True}
        r = cluster.client.post("/generate", json={"inputs": prompt, "parameters": params}, headers=headers)
        assert _ids(r) == cluster.reference["up", prompt]
    routed = _served(after, cluster.replicas())
    assert routed[holder]["mlp"] == len(PROMPTS), routed
    after = cluster.replicas()

    with cf.ThreadPoolExecutor(6) as pool:  # concurrent: 6 at a time, 3 adapters
        adapters = ["qv", "mlp", "up"] * 4
        codes = list(pool.map(lambda a: cluster.generate(PROMPTS[0], a, n=4).status_code, adapters))
    assert codes == [200] * len(adapters)
    final = cluster.replicas()
    concurrent = _served(after, final)
    print(f"concurrent workload, requests per replica per adapter: {concurrent}")
    loads = {r["replica"]: r["loads"] for r in final}
    print(f"multiplexed loads per replica after both workloads: {loads}")
    # every adapter was made resident on at most both replicas, once each: never reloaded
    for name in ("qv", "mlp", "up"):
        assert 1 <= sum(replica_loads.get(name, 0) for replica_loads in loads.values()) <= 2


def _served(before: list[dict], after: list[dict]) -> dict[str, Counter]:
    old = {r["replica"]: Counter(r["requests"]) for r in before}
    return {r["replica"]: Counter(r["requests"]) - old.get(r["replica"], Counter()) for r in after}


def test_replace_and_delete_are_seen_by_every_replica(cluster: Cluster) -> None:
    """Both replicas hold "swap"; a replace and a delete through the cluster reach both."""
    assert _upload(cluster.client, "swap", cluster.root / "qv").status_code == 201
    with cf.ThreadPoolExecutor(8) as pool:  # more than one replica's --max-queue: both get some
        answers = list(pool.map(lambda _: _ids(cluster.generate(PROMPTS[0], "swap")), range(8)))
    assert answers == [cluster.reference["qv", PROMPTS[0]]] * 8
    holders = [r["replica"] for r in cluster.replicas() if "swap" in r["adapters_cached"]]
    print(f"\nreplicas holding 'swap' before the replace: {holders}")
    assert len(holders) == 2

    # replace "swap" with the weights of "mlp": every later request, on either replica, sees them
    assert _upload(cluster.client, "swap", cluster.root / "mlp", replace=True).status_code == 201
    with cf.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: _ids(cluster.generate(PROMPTS[0], "swap")), range(8)))
    assert answers == [cluster.reference["mlp", PROMPTS[0]]] * 8

    assert cluster.client.delete("/adapters/swap").status_code == 204
    with cf.ThreadPoolExecutor(8) as pool:
        gone = list(pool.map(lambda _: cluster.generate(PROMPTS[0], "swap", n=2), range(8)))
    assert [r.status_code for r in gone] == [404] * 8
    assert {r.json()["error_type"] for r in gone} == {"adapter_not_found"}
    for report in cluster.replicas():  # the replicas' reports also drop deleted versions at once
        assert "swap" not in report["adapters_cached"]
    assert "swap" not in [a["id"] for a in cluster.client.get("/adapters").json()]


def test_info_lists_the_stores_adapters(cluster: Cluster) -> None:
    info = cluster.client.get("/info").json()
    assert info["replicas"] == 2 and info["mode"] == "auto"
    assert set(info["adapters"]) == {a["id"] for a in cluster.client.get("/adapters").json()}


def test_metrics_carry_a_replica_label(cluster: Cluster) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    time.sleep(1.5)  # the replicas' last reports
    text = cluster.client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = [s for s in families["loraplex_requests"].samples if s.name == "loraplex_requests_total"]
    assert len({s.labels["replica"] for s in requests}) == 2  # both replicas served generations
    assert sum(s.value for s in requests if s.labels["adapter"] == "qv" and s.labels["status"] == "200") >= 8
    assert families["loraplex_replicas_ready"].samples[0].value == 2
    loads = families["loraplex_replica_adapter_loads"].samples
    assert {s.labels["adapter"] for s in loads} >= {"qv", "mlp", "up"}
    assert text.count("# TYPE loraplex_requests_total counter") <= 1  # one family, not one per replica


def _on_both_replicas(cluster: Cluster, params: dict, n: int = 8) -> list[list[int]]:
    """``n`` concurrent generations of PROMPTS[0]: more than one replica's --max-queue (2), so both
    replicas serve some (as in the replace test); their greedy ids."""
    body = {"inputs": PROMPTS[0], "parameters": {**params, "max_new_tokens": NEW_TOKENS, "details": True}}
    with cf.ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: _ids(cluster.client.post("/generate", json=body)), range(n)))


def test_compositions_equal_a_single_server(cluster: Cluster) -> None:
    """merged_adapters, adapter_scale and POST /adapters/compose through the cluster give one
    server's tokens on every replica; a replaced source is never composed stale."""
    before = cluster.replicas()
    expected = cluster.reference["qv+mlp", PROMPTS[0]]
    answers = _on_both_replicas(cluster, {"merged_adapters": MIXES["qv+mlp"]})
    assert answers == [expected] * 8
    served = _served(before, cluster.replicas())
    keys = {key for counts in served.values() for key in counts if key.startswith("merged:")}
    print(f"\nmerged_adapters requests per replica: {served}")
    assert len(keys) == 1  # one affinity key for the composition, not its first source's
    assert sum(counts[next(iter(keys))] for counts in served.values()) == 8

    # adapter_scale needs nothing of the cluster: the body goes to the replica as it is
    assert _ids(
        cluster.client.post("/generate", json={"inputs": PROMPTS[0], "parameters": {
            "adapter_id": "qv", "adapter_scale": 0.5, "max_new_tokens": NEW_TOKENS, "details": True}})
    ) == cluster.reference["qv*0.5", PROMPTS[0]]  # fmt: skip

    # a source replaced in the store: every replica that composed the old version composes the new one
    assert _upload(cluster.client, "src", cluster.root / "qv").status_code == 201
    mix = {**MIXES["qv+mlp"], "ids": ["src", "mlp"]}
    assert _on_both_replicas(cluster, {"merged_adapters": mix}, n=4) == [expected] * 4
    assert len([rep for rep in cluster.replicas() if "src" in rep["adapters_cached"]]) == 2
    assert _upload(cluster.client, "src", cluster.root / "up", replace=True).status_code == 201
    replaced = cluster.reference["up+mlp", PROMPTS[0]]
    assert replaced != expected  # else the next check could not fail
    assert _on_both_replicas(cluster, {"merged_adapters": mix}, n=4) == [replaced] * 4

    # POST /adapters/compose runs in the store: the same adapter (bytes, DARE seed) as one server's
    r = cluster.client.post("/adapters/compose", json=COMPOSE)
    assert r.status_code == 201, r.text
    for key in ("sha256", "rank", "layers"):
        assert r.json()[key] == cluster.composed[key], key
    assert r.json()["compose"]["seed"] == cluster.composed["compose"]["seed"]
    assert _on_both_replicas(cluster, {"adapter_id": "qvmlp"}) == [cluster.reference["qvmlp", PROMPTS[0]]] * 8
    holders = [rep["replica"] for rep in cluster.replicas() if "qvmlp" in rep["adapters_cached"]]
    assert len(holders) == 2  # fetched from the store by both replicas, like an upload
    assert cluster.client.post("/adapters/compose", json=COMPOSE).json()["error_type"] == "adapter_exists"
    for adapter_id in ("src", "qvmlp"):
        assert cluster.client.delete(f"/adapters/{adapter_id}").status_code == 204


def test_a_killed_replica_is_replaced_and_loses_no_adapter(cluster: Cluster) -> None:
    """Kill the replica running a request: the request is retried once elsewhere (nothing was
    sent yet), /health says degraded, Ray starts a new replica, which serves every adapter."""
    before = cluster.client.get("/health").json()
    old_ids = {r["replica"] for r in before["replicas"]["detail"]}
    with cf.ThreadPoolExecutor(1) as pool:
        # 400 tokens past any EOS: still running seconds after the replica's report shows it busy
        running = pool.submit(cluster.generate, PROMPTS[0], "qv", 400, True)
        victim = None
        deadline = time.monotonic() + 20
        while victim is None and time.monotonic() < deadline:
            time.sleep(0.3)
            busy = [r["replica"] for r in cluster.client.get("/health").json()["replicas"]["detail"]
                    if r["running_requests"] > 0]  # fmt: skip
            victim = busy[0] if busy else None
        assert victim is not None, "the long request never showed up in a replica's report"
        actor = next(
            a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith("#" + victim)
        )
        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
        killed_at = time.monotonic()
        statuses = set()  # /health watched while the retried request runs: degraded until replaced
        while not running.done() and time.monotonic() - killed_at < 120:
            statuses.add(cluster.client.get("/health").json()["status"])
            time.sleep(0.3)
        answer = running.result(timeout=120)
    assert answer.status_code == 200, answer.text  # retried on the other replica
    while True:
        health = cluster.client.get("/health")
        statuses.add(health.json()["status"])
        ids = {r["replica"] for r in health.json()["replicas"]["detail"]}
        if health.json()["replicas"]["ready"] == 2 and victim not in ids:
            break
        assert time.monotonic() - killed_at < 120, "Ray did not replace the killed replica"
        time.sleep(0.5)
    print(
        f"\nreplica {victim} killed; replaced after {time.monotonic() - killed_at:.1f} s; /health said {statuses}"
    )
    assert health.json()["retries"] >= 1
    assert "degraded" in statuses
    (new,) = ids - old_ids
    # every adapter is still served exactly as before, the new replica's share included (affinity
    # keeps most of them on the old replica, which holds them all: it spills when that one is busy)
    served_new: Counter = Counter()
    deadline = time.monotonic() + 60
    while not set(served_new) & {"qv", "mlp", "up"} and time.monotonic() < deadline:
        with cf.ThreadPoolExecutor(6) as pool:
            jobs = [(a, p) for a in ("qv", "mlp", "up") for p in PROMPTS]
            ids_out = list(pool.map(lambda job: _ids(cluster.generate(job[1], job[0])), jobs))
        assert ids_out == [cluster.reference[job] for job in jobs]
        served_new = Counter(next(r for r in cluster.replicas() if r["replica"] == new)["requests"])
    print(f"new replica {new} served: {dict(served_new)}")
    assert set(served_new) & {"qv", "mlp", "up"}  # adapters fetched from the store, not lost
