"""Keep a local Ray cluster's own sockets on loopback when ``--host`` is a loopback address.

By default (Ray 2.60 on Linux) a local cluster's processes listen on every interface whatever
Serve's HTTP host is: measured with ``--host 127.0.0.1``, 14 of 16 listening sockets were not
loopback (GCS, raylet, core-worker gRPC servers on ``::``; the dashboard agent, runtime-env agent
and metrics exporters on ``0.0.0.0`` or the node's address). ``ray.init(_node_ip_address=
"127.0.0.1")`` does not change that: Ray replaces a loopback node address by the machine's
external one (``services.resolve_ip_for_localhost``) unless clusters are disabled.

Two measures, both only for a cluster loraplex starts itself (``--ray`` without
``--ray-address``) on a loopback ``--host``:

1. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: Ray's single-machine mode (its default on macOS and
   Windows). The node's address becomes 127.0.0.1, and the GCS, raylet, workers, agents and
   metrics exporters bind to it. The variable is read when ``ray`` is imported, so the already
   imported constant is set too; Ray's child processes read the variable.
2. Serve's replicas start an inter-deployment gRPC server on ``[::]:0`` (hard-coded in
   ``ray/serve/_private/replica.py``, no setting): a worker setup hook (``bind_serve_grpc_to_loopback``,
   passed as ``runtime_env={"worker_process_setup_hook": ...}``) makes it bind 127.0.0.1 instead.
   This patches a private Ray name; ``tests/integration/test_ray_loopback.py`` lists every
   listening socket of a real ``loraplex serve --ray`` process tree, so a Ray upgrade that breaks
   it fails that test instead of opening a port silently.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from typing import Any

SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
SETUP_HOOK = "server.cluster.loopback.bind_serve_grpc_to_loopback"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def keep_local_ray_on_loopback() -> dict[str, Any]:
    """Put Ray in single-machine mode (see the module docstring) and return the ``ray.init``
    keyword arguments that keep the cluster on loopback."""
    os.environ[SINGLE_MACHINE_ENV] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # imported before the variable was set: it read the default
        constants.ENABLE_RAY_CLUSTER = False  # type: ignore[attr-defined]
    return {"_node_ip_address": "127.0.0.1", "runtime_env": {"worker_process_setup_hook": SETUP_HOOK}}


def bind_serve_grpc_to_loopback() -> None:
    """Ray worker setup hook: Serve replicas' inter-deployment gRPC server binds 127.0.0.1, not ``[::]``."""
    from ray.serve._private import replica

    original = replica.add_port_to_grpc_server
    if getattr(original, "loopback", False):
        return

    def add_port(server: Any, address: str) -> int:
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return original(server, address)

    add_port.loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = add_port
