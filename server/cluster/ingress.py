"""``LoraplexIngress``: the cluster's HTTP entry (Ray Serve's proxy sends every request here).

- ``/health`` and ``/metrics`` describe the whole cluster, from the replicas' reports to the store;
- adapter management goes to the store (:func:`.routing.target_of`);
- everything else goes to a replica, with the adapter id it names as Ray's multiplexed model id
  (``""`` for the base model, ``merged:<digest>`` for a ``merged_adapters`` composition), so
  requests for an adapter (or a composition) stick to replicas that hold it.

Every request is screened first (keys, Host, cross-site: ``server.api.security.screen``) and its
body read only up to its limit (``--max-upload-mb`` for uploads, ``--max-body-kb`` else), before
any routing work: no key, no body read and no adapter loaded on a replica.

A replica that dies before its answer started (Ray raises an actor error) costs one retry on
another replica; a second failure, or one after bytes were streamed, is a 503 or a cut stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from ray import exceptions as ray_errors
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from adapters.tenants import Tenant, key_hash
from server.api.adapter_sources import requested_source
from server.api.errors import ApiError, error_payload, error_response
from server.api.named_adapters import json_object
from server.api.routes import rule_for
from server.api.security import accepted_keys, admit, bearer_token, identify, screen
from server.cluster.asgi_bridge import HttpCall, ResponseStart
from server.cluster.metrics_merge import merge_expositions
from server.cluster.routing import adapter_names, affinity_key, target_of
from server.config import Settings

log = logging.getLogger(__name__)

MULTIPLEXED_HEADER = "serve_multiplexed_model_id"  # Ray Serve's header for the multiplexed id
REPORT_MAX_AGE = 5.0  # seconds: a replica not heard from for longer counts as gone
REPLICA_GONE = (ray_errors.RayActorError, ray_errors.ActorUnavailableError)


class LoraplexIngress:
    """Ray Serve deployment: routes HTTP requests to the store or to a replica (see module doc)."""

    def __init__(
        self, replica: Any, store: Any, replicas: int, affinity: bool = True, values: dict | None = None
    ) -> None:
        self.settings = Settings(**(values or {}))  # the keys and limits of `loraplex serve`
        self.replica = replica  # DeploymentHandle of LoraplexReplica
        self.store = store  # DeploymentHandle of LoraplexStore
        self.expected = replicas
        self.affinity = affinity  # False: no multiplexed id, plain load balancing (bench/cluster.py)
        self.retries = 0  # requests retried once because their replica died before answering
        self._leaving: set[asyncio.Task] = set()  # tenants' cluster places being given back

    async def __call__(self, request: Request) -> Response:
        method, path = request.method, request.url.path
        target = target_of(method, path)
        if target == "health":
            return await self.health(show_error=self._keyed(request))
        if target == "metrics":
            return await self.metrics()
        if target == "unsupported":
            return error_response(
                501,
                f"{method} {path} is not available on a Ray cluster (the shrunk adapter would stay on one "
                "replica); shrink on a single `loraplex serve` and upload the result to the cluster.",
                "not_supported_in_cluster",
            )
        try:
            tenants = await self._tenant_of(request)
            caller = admit(self.settings, method, path, request.headers, tenants)
            if isinstance(caller, ApiError):
                raise caller
            body = await self._body(request, method, path)
        except ApiError as error:
            payload = error_payload(path, error.status_code, error.message, error.error_type)
            return JSONResponse(payload, status_code=error.status_code, headers=error.headers)
        client = (request.client.host, request.client.port) if request.client else ("127.0.0.1", 0)
        call = HttpCall(method, path, request.url.query.encode(), list(request.headers.raw), body, client)
        if target == "store":
            return await self._answer(
                lambda: self.store.options(stream=True).forward.remote(call), retry=False
            )
        names = adapter_names(path, request.query_params, body)
        chosen = request.headers.get(MULTIPLEXED_HEADER)  # a client may name the affinity key itself
        if chosen:
            names = list(dict.fromkeys([chosen, *names]))
        versions = {}
        if names:  # adapters missing from the store are fetched from --adapter-source first
            resolved = await self.store.resolve.remote(names, requested_source(json_object(body)), caller)
            if "error" in resolved:
                return error_response(*resolved["error"])
            versions, names = resolved["versions"], resolved["names"]  # stored ids: a tenant's acme~bot
        model_id = affinity_key(names, versions, body, chosen) if self.affinity else ""
        handle = self.replica.options(stream=True, multiplexed_model_id=model_id)
        # a tenant's generation takes one of its places in the whole cluster (the store counts them):
        # each replica's own count only sees its share, so N replicas would allow N times the quota
        quota_holder = (
            caller.tenant.id if caller.tenant is not None and rule_for(method, path).generation else None
        )
        if quota_holder is not None:
            refused = await self.store.quota_take.remote(quota_holder)
            if refused is not None:
                status, message, error_type, headers = refused
                return JSONResponse(error_payload(path, status, message, error_type), status, headers=headers)
        try:
            response = await self._answer(
                lambda: handle.forward.remote(call, versions, caller.tenant), retry=True
            )
        except BaseException:
            if quota_holder is not None:
                self._give_back(quota_holder)
            raise
        if quota_holder is not None:
            response = self._then_give_back(response, quota_holder)
        if path == "/info" and response.status_code == 200:
            return await self._cluster_info(response)
        return response

    def _give_back(self, tenant_id: str) -> None:
        """Return a tenant's cluster place (in the background: this may run while being cancelled)."""
        task = asyncio.ensure_future(self.store.quota_leave.remote(tenant_id))
        self._leaving.add(task)
        task.add_done_callback(self._leaving.discard)

    def _then_give_back(self, response: Response, tenant_id: str) -> Response:
        """``response``, giving the tenant's place back once it is sent (or the client left)."""
        if not isinstance(response, StreamingResponse):
            self._give_back(tenant_id)
            return response
        body = response.body_iterator

        async def sent_then_given_back() -> AsyncIterator[Any]:
            try:
                async for chunk in body:
                    yield chunk
            finally:
                self._give_back(tenant_id)

        response.body_iterator = sent_then_given_back()
        return response

    async def _tenant_of(self, request: Request) -> _OneTenant | None:
        """The tenant whose key the request carries, asked of the store (which owns the table) by the
        key's sha256; None when the key is none, or one of the operator's keys."""
        token = bearer_token(request.headers.get("authorization"))
        if token is None or identify(self.settings, token) is not None:
            return None
        return _OneTenant(await self.store.identify.remote(key_hash(token)))

    async def _body(self, request: Request, method: str, path: str) -> bytes:
        """The body, read up to its limit (413 past it: the rest is never read)."""
        upload = rule_for(method, path).upload
        limit = self.settings.max_upload_mb << 20 if upload else self.settings.max_body_kb << 10
        flag = "--max-upload-mb" if upload else "--max-body-kb"
        declared = request.headers.get("content-length")
        too_large = ApiError(
            413, f"the request body is larger than the server's limit ({limit} bytes, {flag}).", "too_large"
        )
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def _cluster_info(self, response: StreamingResponse) -> Response:
        """One replica's /info, with the cluster's adapters (a replica lists only those it cached)
        and, for the admin, every tenant with the cluster's usage (a replica counts its own share)."""
        body = json.loads(b"".join([chunk async for chunk in response.body_iterator]))
        store = await self.store.status.remote()
        body["adapters"] = store["adapters"]
        if "tenants" in body:  # only the admin's /info lists them
            body["tenants"] = await self.store.tenants_described.remote()
        body["replicas"] = self.expected
        return JSONResponse(body)

    async def _answer(self, start: Callable[[], Any], *, retry: bool) -> Response:
        """Stream a deployment's answer back; retry once on a replica that died before answering."""
        for attempt in range(2 if retry else 1):
            stream = start()
            try:
                first = await stream.__anext__()
            except REPLICA_GONE as exc:
                log.warning("replica failed before answering (attempt %d): %s", attempt + 1, exc)
                if attempt == 0 and retry:
                    self.retries += 1
                continue
            except StopAsyncIteration:
                break
            except ray_errors.RayTaskError as exc:
                log.error("request failed in the cluster: %s", exc)
                return error_response(
                    500, f"the request failed inside the cluster: {exc.cause!r}", "internal"
                )
            assert isinstance(first, ResponseStart)
            response = StreamingResponse(_rest(stream), status_code=first.status)
            response.raw_headers = list(first.headers)
            return response
        return error_response(
            503, "the replica serving this request stopped before answering (Ray restarts it); retry shortly.",
            "replica_unavailable", {"Retry-After": "1"},
        )  # fmt: skip

    # ------------------------------------------------------------------ cluster health and metrics

    async def _reports(self) -> dict[str, dict[str, Any]]:
        return await self.store.replica_reports.remote(REPORT_MAX_AGE)

    def _keyed(self, request: Request) -> bool:
        """A caller holding a key that opens reads (the start-up error names paths: only for them)."""
        if not accepted_keys(self.settings, "read"):
            return False
        return screen(self.settings, "GET", "/info", request.headers) is None

    async def health(self, show_error: bool = False) -> JSONResponse:
        """200 while at least one replica serves (``degraded`` below ``--replicas``), else 503."""
        reports, store = await self._reports(), await self.store.status.remote()
        ready = sorted(rid for rid, r in reports.items() if r["ready"])
        if store["error"] is not None:
            status, code = "failed", 503
        elif not ready or not store["ready"]:
            status, code = "loading", 503
        else:
            status, code = ("ok" if len(ready) >= self.expected else "degraded"), 200
        detail = [{k: v for k, v in r.items() if k not in ("metrics", "received")} for r in reports.values()]
        body = {
            "status": status,
            "replicas": {"ready": len(ready), "expected": self.expected, "detail": detail},
            "store": {"ready": store["ready"], "adapters": len(store["adapters"])},
            "retries": self.retries,
        }
        if store["error"] is not None:
            body["error"] = store["error"] if show_error else "start-up failed; the server's log says why."
        return JSONResponse(body, status_code=code)

    async def metrics(self) -> Response:
        """Every replica's metrics with a ``replica`` label, plus the cluster's own gauges."""
        reports = await self._reports()
        ready = GaugeMetricFamily("loraplex_replicas_ready", "Replicas serving (reported in the last 5 s).")
        ready.add_metric([], sum(1 for r in reports.values() if r["ready"]))
        loads = CounterMetricFamily(
            "loraplex_replica_adapter_loads",
            "Times a replica's multiplexed loader made an adapter resident (affinity keeps this low).",
            labels=["replica", "adapter"],
        )
        for rid, r in reports.items():
            for adapter, n in r["loads"].items():
                loads.add_metric([rid, adapter], n)
        text = merge_expositions({rid: r["metrics"] for rid, r in reports.items()}, extra=[ready, loads])
        return Response(text, media_type=CONTENT_TYPE_LATEST)


class _OneTenant:
    """The tenant table as far as one request needs it (``security.admit`` asks ``identify``)."""

    def __init__(self, tenant: Tenant | None) -> None:
        self.tenant = tenant

    def identify(self, key: str) -> Tenant | None:
        return self.tenant if self.tenant is not None and self.tenant.key_sha256 == key_hash(key) else None


async def _rest(stream: Any) -> AsyncIterator[bytes]:
    try:
        async for chunk in stream:
            yield chunk
    except REPLICA_GONE as exc:  # the status line is sent: all we can do is end the stream early
        log.error("replica failed mid-stream; the answer is cut short: %s", exc)
