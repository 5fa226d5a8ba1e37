"""The Ray Serve application: ``loraplex serve --ray --replicas N``, or ``serve run server.cluster.app:build``.

``build_app`` binds the three deployments; ``run`` starts (or joins, ``--ray-address``) a Ray
cluster, serves the application on ``--host``/``--port`` and blocks until interrupted.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import ray
from ray import serve
from ray.serve import Application

from server.cluster.ingress import LoraplexIngress
from server.cluster.loopback import is_loopback, keep_local_ray_on_loopback
from server.cluster.replica import LoraplexReplica
from server.cluster.store import LoraplexStore
from server.config import Settings

log = logging.getLogger(__name__)

APP_NAME = "loraplex"


def replica_resources(settings: Settings, replica_cpus: float) -> dict[str, float]:
    """One GPU per replica when the replicas run on CUDA, else ``replica_cpus`` CPUs."""
    if settings.device.startswith("cuda"):
        return {"num_cpus": 1, "num_gpus": 1}
    return {"num_cpus": replica_cpus}


def absolute_paths(settings: Settings) -> Settings:
    """Paths resolved against the caller's directory: Ray's worker processes start elsewhere."""
    specs = [f"{adapter_id}={path.resolve()}" for adapter_id, path in settings.adapter_specs()]
    model = settings.model
    if model is not None and Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())
    return settings.model_copy(update={
        "data_dir": settings.data_dir.resolve(), "cache_dir": settings.cache_dir.resolve(),
        "adapter": specs, "model": model,
    })  # fmt: skip


def build_app(
    settings: Settings, replicas: int, *, replica_cpus: float = 1.0, affinity: bool = True
) -> Application:
    """Ingress + ``replicas`` engine replicas + one store, as a bindable Ray Serve application.

    ``affinity=False`` (benchmarks only) sends no multiplexed id: Ray balances without affinity.
    """
    values = absolute_paths(settings).model_dump()
    store = serve.deployment(LoraplexStore, name="LoraplexStore", num_replicas=1,
                             ray_actor_options={"num_cpus": 0}).bind(values)  # fmt: skip
    replica = serve.deployment(
        LoraplexReplica,
        name="LoraplexReplica",
        num_replicas=replicas,
        max_ongoing_requests=max(settings.max_queue, 1),
        health_check_period_s=2,
        health_check_timeout_s=30,
        graceful_shutdown_timeout_s=settings.shutdown_timeout,
        ray_actor_options=replica_resources(settings, replica_cpus),
    ).bind(values, store)
    ingress = serve.deployment(LoraplexIngress, name="LoraplexIngress", num_replicas=1,
                               max_ongoing_requests=max(settings.max_queue, 1) * max(replicas, 1),
                               ray_actor_options={"num_cpus": 0}).bind(replica, store, replicas, affinity, values)  # fmt: skip
    return ingress


def build(args: dict[str, str]) -> Application:
    """Application builder for ``serve run server.cluster.app:build replicas=2 port=8000 ...``.

    Every key is a ``serve`` setting (as for ``LORAPLEX_<NAME>``), plus ``replicas``.
    """
    values = dict(args)
    replicas = int(values.pop("replicas", 1))
    return build_app(Settings(**values), replicas)


def run(settings: Settings, replicas: int, address: str | None = None) -> None:
    """Start a local Ray (or join ``address``), serve on ``settings.host:port``, block until Ctrl-C
    or SIGTERM, then shut the application (and a local Ray) down."""
    if address is None:  # a local cluster: enough logical CPUs for every replica to be placed
        # "local", not None: None joins the cluster /tmp/ray/ray_current_cluster names (`ray start`),
        # and fails when that one is gone; --ray-address auto joins it on purpose
        # a loopback --host keeps Ray's own sockets on loopback too (loopback.py says how)
        local = keep_local_ray_on_loopback() if is_loopback(settings.host) else {}
        ray.init(
            address="local", num_cpus=max(os.cpu_count() or 1, replicas), include_dashboard=False, **local
        )
    else:
        ray.init(address=address)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build_app(settings, replicas), name=APP_NAME, route_prefix="/")
        log.info(
            "loraplex on Ray Serve: %d replica(s) at http://%s:%d", replicas, settings.host, settings.port
        )
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if address is None:
            serve.shutdown()
        else:  # leave the cluster's other applications (and Serve itself) running
            serve.delete(APP_NAME)
        ray.shutdown()
