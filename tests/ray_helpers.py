"""A local Ray Serve cluster of loraplex for the ``tests/integration/test_ray_cluster*.py`` modules.

Run them with ``PYTHONPATH=$PWD`` from a worktree: Ray's workers import ``server`` by path, not
from the driver's sys.path.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import ray  # the `loraplex[ray]` extra: `make setup` installs it
from ray import serve

from server.cluster.app import APP_NAME, build_app
from server.config import Settings
from tests.conftest import CACHE_DIR
from tests.live_server import free_port


@contextmanager
def ray_cluster(settings: Settings, replicas: int) -> Iterator[httpx.Client]:
    """loraplex's Serve application (``replicas`` engine replicas, one store) on a new local Ray,
    listening on ``settings.port``; yields a client once every replica is ready, then shuts down."""
    # "local": a new Ray of its own, even where /tmp/ray/ray_current_cluster names another (or a dead) one
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": settings.port})
        serve.run(build_app(settings, replicas), name=APP_NAME, route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{settings.port}", timeout=120) as client:
            wait_ready(client, replicas)
            yield client
    finally:
        serve.shutdown()
        ray.shutdown()


def tiny_cluster_settings(model_dir: Path, root: Path, **overrides: Any) -> Settings:
    """Settings for a cluster serving ``model_dir`` (the ``tiny_base_dir`` fixture: the tiny random
    Llama) on the native runner, the store's data under ``root/store``."""
    values: dict[str, Any] = dict(
        port=free_port(), model=str(model_dir), data_dir=root / "store", cache_dir=CACHE_DIR, runner="native",
        dtype="float32", device="cpu", kv_cache_tokens=512, max_total_tokens=256, max_rank=16,
    )  # fmt: skip
    return Settings(**(values | overrides))


def wait_ready(client: httpx.Client, replicas: int, timeout: float = 120) -> dict:
    """``/health`` once at least ``replicas`` replicas report ready."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = client.get("/health")
            if r.status_code == 200 and r.json()["replicas"]["ready"] >= replicas:
                return r.json()
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the cluster did not become ready"
        time.sleep(0.5)
