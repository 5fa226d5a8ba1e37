"""``LoraplexReplica``: one single-server loraplex app (engine on one device) inside the cluster.

Each replica runs ``server.app.create_app`` unchanged, with a private ``--data-dir`` that is a
*cache* of the store's adapters. Before a request runs, the replica makes that cache equal to the
store for every adapter the request names (the ingress sends the versions it looked up): a
missing or outdated version is fetched by ``(id, sha256)``, a deleted one is deleted, so a replica
never serves a deleted or replaced version. The running app then resolves ids exactly as one
server does (404 for unknown ids, the engine's slots, merged or mixed batches in ``--mode auto``).

Affinity: the multiplexed model id is the adapter id (``""`` for the base model, which every
replica holds, so base requests go to any replica; ``merged:<digest>`` for a ``merged_adapters``
composition, whose sources are among the adapters the request names, so they are synced too).
Ray's router sends a request to a replica that already loaded its adapter; the multiplexed loader
(:meth:`LoraplexReplica.load_adapter`, at most ``--max-loaded-adapters`` per replica) syncs the
adapter and reads it into host memory, and counts these loads (``loads`` in the replica's report)
so affinity can be measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from adapters.store import AdapterStore, sha256_hex
from adapters.tenants import Tenant
from server.app import create_app
from server.cluster.asgi_bridge import HttpCall, ResponseStart, run_asgi
from server.cluster.routing import Version, is_composition_key
from server.config import Settings

log = logging.getLogger(__name__)

REPORT_INTERVAL = 1.0  # seconds between reports to the store (/health and /metrics read them)


def replica_id() -> str:
    context = serve.get_replica_context()
    return context.replica_id.unique_id


class LoraplexReplica:
    """Ray Serve deployment: the engine and routes of one server, adapters synced from the store."""

    async def __init__(self, settings: dict[str, Any], store: Any) -> None:
        self.store = store  # DeploymentHandle of LoraplexStore
        self.cache_dir = tempfile.TemporaryDirectory(prefix="loraplex-replica-")
        # start-up adapters and adapter sources: the store's (it fetches; replicas sync from it)
        local = {**settings, "data_dir": self.cache_dir.name, "adapter": [], "adapter_source": []}
        self.settings = Settings(**local)
        self.id = replica_id()
        self.loads: Counter[str] = Counter()  # adapter id -> times the multiplexed loader ran for it
        self.requests: Counter[str] = Counter()  # adapter id ("" = base) -> requests served
        self.fetches: Counter[str] = Counter()  # adapter id -> versions fetched from the store
        self._sync_locks: dict[str, asyncio.Lock] = {}

        async def load_adapter(adapter_id: str) -> str:  # a plain function: Ray's wrapper keeps state on it
            return await self._load_adapter(adapter_id)

        limit = self.settings.max_loaded_adapters  # max_num_models_per_replica = --max-loaded-adapters
        self.load_adapter = serve.multiplexed(max_num_models_per_replica=limit)(load_adapter)
        self.app = create_app(self.settings)
        # every token this replica counts for a tenant also goes to the store, which counts the
        # whole cluster's tokens per minute (the ingress checks the quota there before routing)
        self.app.state.gate.tenants.on_charge = self._pass_on_tokens
        self._lifespan = contextlib.AsyncExitStack()
        await self._lifespan.enter_async_context(self.app.router.lifespan_context(self.app))
        await self.app.state.loading  # the model loads here: the replica is ready when __init__ returns
        if self.app.state.engine is None:
            raise RuntimeError(f"replica start-up failed: {self.app.state.load_error}")
        engine = self.app.state.engine
        await self.store.bind_base.remote(
            dict(engine.base_shapes), self.settings.max_rank, self.app.state.base.name
        )
        self._reporter = asyncio.create_task(self._report_forever())
        log.info("replica %s ready", self.id)

    def _pass_on_tokens(self, tenant_id: str, tokens: int) -> None:
        self.store.quota_charge.remote(tenant_id, tokens)  # not awaited: the request goes on

    @property
    def local(self) -> AdapterStore:
        return self.app.state.store

    # ------------------------------------------------------------------ requests

    async def forward(
        self, call: HttpCall, versions: dict[str, Version | None], tenant: Tenant | None = None
    ) -> AsyncIterator[ResponseStart | bytes]:
        """Answer one request with this replica's app, after syncing the adapters it names.
        ``tenant``: the caller's row as the store has it now (the ingress checked its key there),
        so this app knows the key and the quotas too."""
        if tenant is not None:
            self.local.tenants.mirror(tenant)
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self.load_adapter(model_id)  # Ray records that this replica holds model_id
        for adapter_id, version in versions.items():
            await self.sync(adapter_id, version)
        self.requests[model_id] += 1
        async for item in run_asgi(self.app, call):
            yield item

    async def _load_adapter(self, adapter_id: str) -> str:
        """The multiplexed loader: make ``adapter_id`` resident here (files synced, weights in host memory).

        A composition's key (``merged:...``) is only counted: :meth:`forward` syncs its sources,
        and the app composes it on its first request (then keeps it in its composition cache).
        """
        if is_composition_key(adapter_id):
            self.loads[adapter_id] += 1
            return adapter_id
        versions = await self.store.describe.remote([adapter_id])
        await self.sync(adapter_id, versions.get(adapter_id))
        if adapter_id in self.local:
            await self.local.aget(adapter_id)
        self.loads[adapter_id] += 1
        return adapter_id

    async def sync(self, adapter_id: str, version: Version | None) -> None:
        """Make the local copy of ``adapter_id`` the store's ``version`` (None: not stored, delete it)."""
        lock = self._sync_locks.setdefault(adapter_id, asyncio.Lock())
        async with lock:
            for _ in range(3):  # the store may replace it again while we fetch
                if self._matches(adapter_id, version):
                    return
                if version is None:
                    await asyncio.to_thread(self._drop, adapter_id)
                    return
                files = await self.store.read_files.remote(adapter_id, version[0])
                if files is not None and sha256_hex(files.weights) == version[0]:
                    await asyncio.to_thread(self._install, adapter_id, files)
                    return
                version = (await self.store.describe.remote([adapter_id]))[adapter_id]
            raise RuntimeError(f"adapter {adapter_id!r} keeps changing in the store; retry")

    def _matches(self, adapter_id: str, version: Version | None) -> bool:
        record = self.local.record(adapter_id) if adapter_id else None
        if version is None:
            return record is None
        return record is not None and (record.sha256, record.config_sha256) == version

    def _install(self, adapter_id: str, files: Any) -> None:
        self.fetches[adapter_id] += 1
        record = self.local.put(adapter_id, files, replace=True, keep_identical=True)  # retires the old one
        log.info("replica %s: adapter %s synced (%s)", self.id, adapter_id, record.sha256[:12])

    def _drop(self, adapter_id: str) -> None:
        if self.local.record(adapter_id) is None:
            return
        self.local.delete(adapter_id)  # the store's retire event frees its slot
        log.info("replica %s: adapter %s deleted (gone from the store)", self.id, adapter_id)

    async def _drop_stale(self, current: dict[str, Version | None]) -> None:
        """Forget local copies the store deleted or replaced (the next request fetches the new one).

        ``current`` may be older than a copy a request synced meanwhile (the store answered the
        report just before a replace): each mismatch is checked again with the store, under the
        adapter's sync lock, so a copy that is the store's current version is never dropped.
        """
        for adapter_id, version in current.items():
            if not self._matches(adapter_id, version):
                async with self._sync_locks.setdefault(adapter_id, asyncio.Lock()):
                    fresh = (await self.store.describe.remote([adapter_id]))[adapter_id]
                    if not self._matches(adapter_id, fresh):
                        await asyncio.to_thread(self._drop, adapter_id)

    # ------------------------------------------------------------------ health and reports

    def check_health(self) -> None:
        """Ray Serve calls this periodically: an engine that stopped makes Ray replace the replica."""
        engine = self.app.state.engine
        if engine is None or not engine.running:
            raise RuntimeError(f"replica {self.id}: the engine is not running")

    def state(self) -> dict[str, Any]:
        engine = self.app.state.engine
        snap = engine.describe() if engine is not None else None  # every engine figure from one snapshot
        return {
            "replica": self.id,
            "ready": engine is not None and engine.running,
            "mode": self.settings.mode,
            "merged_adapter": snap.merged_adapter if snap is not None else None,
            "swaps": snap.stats.swaps if snap is not None else 0,
            "adapters_loaded": [k.partition("@")[0] for k in snap.slots.resident_keys] if snap else [],
            "adapters_cached": self.local.ids(),
            "loads": dict(self.loads),
            "fetches": dict(self.fetches),
            "slot_loads": snap.slots.loads if snap is not None else 0,
            "slot_evictions": snap.slots.evictions if snap is not None else 0,
            "requests": dict(self.requests),
            "running_requests": snap.queue.running if snap is not None else 0,
            "metrics": self.app.state.metrics.exposition().decode(),
            "time": time.time(),
        }

    async def _report_forever(self) -> None:
        while True:
            try:
                current = await self.store.report.remote(self.id, self.state())
                await self._drop_stale(current)
            except Exception:  # the store restarting: report again next time
                log.debug("report to the store failed", exc_info=True)
            await asyncio.sleep(REPORT_INTERVAL)

    async def __del__(self) -> None:
        self._reporter.cancel()
        await self._lifespan.aclose()
        self.cache_dir.cleanup()
