"""``loraplex serve --ray --replicas 2 --host 127.0.0.1``: every listening socket of the process
tree (the CLI's driver, GCS, raylet, agents, metrics exporters, Serve's controller, proxy, ingress,
store and replicas) is on loopback (server/cluster/loopback.py; issue 31 finding 6)."""

from __future__ import annotations

import ipaddress
import os

import httpx
import psutil
import pytest

from server.cluster.loopback import (
    SETUP_HOOK,
    SINGLE_MACHINE_ENV,
    bind_serve_grpc_to_loopback,
    is_loopback,
    keep_local_ray_on_loopback,
)
from tests.server_process import REPO, wait_until


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return (mapped or address).is_loopback


def _listening(root: int) -> list[tuple[int, str, str]]:
    """(pid, process name and command, ip:port) of every listening TCP/UDP socket under ``root``.
    The pid tells processes apart: Ray's workers of one deployment share one title."""
    parent = psutil.Process(root)
    rows = []
    for proc in [parent, *parent.children(recursive=True)]:
        try:
            name = " ".join(proc.cmdline())[:120].rstrip()
            rows += [(proc.pid, name, f"{c.laddr.ip}:{c.laddr.port}") for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN]  # fmt: skip
        except psutil.Error:  # a worker that exited meanwhile
            continue
    return rows


@pytest.mark.parametrize(
    "host,expected",
    [("127.0.0.1", True), ("::1", True), ("localhost", True), ("0.0.0.0", False), ("10.1.2.3", False)],
)
def test_loopback_hosts(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected


def test_single_machine_mode_is_set_for_this_process_and_ray_s_children(monkeypatch) -> None:
    from ray._private import ray_constants

    monkeypatch.setenv(SINGLE_MACHINE_ENV, "1")  # restored after the test
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    options = keep_local_ray_on_loopback()
    assert os.environ[SINGLE_MACHINE_ENV] == "0" and ray_constants.ENABLE_RAY_CLUSTER is False
    assert options == {
        "_node_ip_address": "127.0.0.1",
        "runtime_env": {"worker_process_setup_hook": SETUP_HOOK},
    }


def test_the_setup_hook_binds_serve_grpc_servers_to_loopback(monkeypatch) -> None:
    from ray.serve._private import replica

    calls: list[str] = []
    monkeypatch.setattr(
        replica, "add_port_to_grpc_server", lambda server, address: calls.append(address) or 7
    )
    bind_serve_grpc_to_loopback()
    bind_serve_grpc_to_loopback()  # a second call does not wrap twice
    assert replica.add_port_to_grpc_server(None, "[::]:0") == 7
    replica.add_port_to_grpc_server(None, "10.1.2.3:5000")
    assert calls == ["127.0.0.1:0", "10.1.2.3:5000"]


def test_a_loopback_cluster_listens_only_on_loopback(servers) -> None:
    # ServerProcess passes --host 127.0.0.1; Ray's workers import this checkout's server package
    server = servers("--ray", "--replicas", "2", ready=False, env={"PYTHONPATH": str(REPO)})
    try:
        server.wait_ready(timeout=300)  # 200 once one replica serves ("degraded" until both do)

        def both_replicas_ready() -> bool:
            # Both replicas load the model at once on CI's 2 cores; the second can lag the first by
            # more than a minute, and only then does its actor open its sockets.
            return httpx.get(server.url + "/health", timeout=10).json().get("status") == "ok"

        wait_until(both_replicas_ready, 300, "both replicas to report ready", poll=0.5)
        r = httpx.post(server.url + "/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 4}}, timeout=120)  # fmt: skip
        assert r.status_code == 200, r.text

        seen: list[list[tuple[int, str, str]]] = [[]]

        def replicas_up() -> list[tuple[int, str, str]] | None:
            seen[0] = rows = _listening(server.proc.pid)
            # count processes, not titles: both replicas' workers are titled
            # "ray::ServeReplica:loraplex:LoraplexReplica" (a set of titles made this wait pass only
            # when the two titles' padding happened to differ)
            replicas = {pid for pid, name, _ in rows if "ServeReplica:loraplex:LoraplexReplica" in name}
            return rows if len(replicas) == 2 else None

        # Up to 300 s, as for /health: on CI's 2 loaded cores Serve can restart a replica whose
        # health check timed out while it loaded, and the new one loads the model again.
        try:
            rows = wait_until(replicas_up, 300, "both replicas' sockets", poll=0.5)
        except AssertionError as exc:
            names = sorted((name, pid) for pid, name, _ in seen[0])
            health = httpx.get(server.url + "/health", timeout=10).text
            raise AssertionError(f"{exc}; listening processes: {names}; /health: {health}") from None
        assert isinstance(rows, list)
        names = " | ".join(name for _, name, _ in rows)
        for part in (
            "gcs_server",
            "raylet",
            "DashboardAgent",
            "ServeController",
            "ProxyActor",
            "LoraplexIngress",
        ):
            assert part in names, f"{part} not found among the listening processes: {names}"
        assert any(address.endswith(f":{server.port}") for _, _, address in rows)  # Serve's HTTP proxy
        exposed = [(name, address) for _, name, address in rows if not _loopback(address.rsplit(":", 1)[0])]
        assert not exposed, f"{len(exposed)} of {len(rows)} listening sockets are not loopback: {exposed}"
    finally:
        server.stop()  # SIGTERM: the CLI shuts Serve and its local Ray down
