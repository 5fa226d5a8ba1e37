"""``serve --ray`` with ``--adapter-source``: the store deployment fetches from S3 (moto's server on
loopback) for the whole cluster, and the replica serves the fetched adapter like an uploaded one.

One replica of the tiny random Llama (saved as a checkpoint with the embedded tokenizer), so the
cluster starts in seconds rather than loading the embedded model.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.adapter_files import make_adapter
from tests.integration.test_adapter_sources import BUCKET, PREFIX, put, s3  # noqa: F401 (fixture)
from tests.ray_helpers import ray_cluster, tiny_cluster_settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(s3, tiny_base_dir, tmp_path_factory) -> Iterator[httpx.Client]:  # noqa: F811
    root = tmp_path_factory.mktemp("ray-sources")
    settings = tiny_cluster_settings(
        tiny_base_dir, root, max_upload_mb=1, adapter_source=[f"s3://{BUCKET}/{PREFIX}"]
    )
    # the AWS_* variables the s3 fixture set reach Ray's workers: they inherit this process's environment
    with ray_cluster(settings, 1) as client:
        yield client


def _generate(client: httpx.Client, adapter_id: str, **parameters) -> httpx.Response:
    params = {"adapter_id": adapter_id, "max_new_tokens": 8, "details": True, **parameters}
    return client.post("/generate", json={"inputs": "Hello there", "parameters": params})


def _ids(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["details"]["tokens"]]


def test_the_cluster_fetches_from_the_source_like_an_upload(cluster, s3, tiny_base) -> None:  # noqa: F811
    files = make_adapter(tiny_base, seed=21, targets=("q_proj", "v_proj", "o_proj"))
    put(s3, "cl-s3", *files)
    fetched = _ids(_generate(cluster, "cl-s3"))
    parts = [("files", ("adapter_config.json", files[0])), ("files", ("adapter_model.safetensors", files[1]))]
    assert cluster.post("/adapters", data={"adapter_id": "cl-up"}, files=parts).status_code == 201
    assert fetched == _ids(_generate(cluster, "cl-up"))
    base = cluster.post(
        "/generate", json={"inputs": "Hello there", "parameters": {"max_new_tokens": 8, "details": True}}
    )
    assert fetched != _ids(base)  # the adapter changes the answer: the comparison means something
    summary = cluster.get("/adapters/cl-s3").json()  # the store's copy, with its source
    assert summary["source"]["uri"] == f"s3://{BUCKET}/{PREFIX}"
    assert summary["sha256"] == cluster.get("/adapters/cl-up").json()["sha256"]


def test_the_cluster_answers_missing_invalid_and_hub(cluster, s3, tiny_base) -> None:  # noqa: F811
    assert _generate(cluster, "cl-nowhere").status_code == 404
    config, _ = make_adapter(tiny_base, seed=22)
    put(s3, "cl-bad", config, b"not safetensors")
    r = _generate(cluster, "cl-bad")
    assert r.status_code == 422 and "cl-bad" in r.json()["error"], r.text
    r = _generate(cluster, "cl-nowhere", adapter_source="hub")
    assert r.status_code == 400 and r.json()["error_type"] == "source_not_configured", r.text
    base = cluster.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
    assert base.status_code == 200, base.text  # still serving
