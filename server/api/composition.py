"""Adapter composition over HTTP: LoRAX's ``parameters.merged_adapters`` and ``POST /adapters/compose``.

    merged_adapters {ids, weights, merge_strategy, density, majority_sign_method}
        ─► sources from the store (404 for an unknown id)
        ─► digest = sha256(ids with the sha256 of their weights and config, weights, strategy and its
           parameters)
        ─► cache hit, or compose once in a worker thread (``adapters.compose``)
        ─► a virtual adapter ``merged:<digest[:16]>`` that takes a slot, merges and batches like any
           other adapter (':' is not allowed in stored ids, so it never collides with one)

    POST /adapters/compose {sources: [{id, weight}], strategy, density, new_id, rank?}
        ─► the same composition (same digest, same DARE seed), written as a PEFT adapter
           (``adapters.compose_files``), recompressed by truncated SVD when ``rank`` is given
        ─► stored as ``new_id``: 201 with its summary and, under ``compose``, the report per module

DARE's random masks are seeded from the digest (``adapters.compose.seed_of``): a composition gives
the same adapter on every request, after a cache eviction, after a restart, and when stored.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from adapters.compose import CompositionSpec, compose, composition_digest, seed_of
from adapters.compose_files import ComposedFiles, composed_files
from adapters.errors import StoreNotReady
from adapters.peft_format import LoraAdapter
from adapters.registry import AdapterRepository
from server.api.compose_schemas import ComposeBody, MergedAdapters
from server.api.deps import SettingsDep, StoreDep
from server.api.errors import ApiError, adapter_not_found
from server.api.named_adapters import COMPOSITION_PREFIX
from server.api.screening import screening_of

router = APIRouter(tags=["adapters"])

VIRTUAL_PREFIX = COMPOSITION_PREFIX
MERGED_LABEL = "__merged__"  # the metrics' adapter label of composed requests (one label, not one per mix)
CACHE_ENTRIES = 16  # composed adapters kept in host memory (LRU)


@dataclass(frozen=True)
class Composition:
    adapter: LoraAdapter  # the composed adapter
    sources: tuple[LoraAdapter, ...]  # the stored versions it was composed from
    digest: str
    seed: int


class CompositionService:
    """Resolves compositions against the store and keeps the composed adapters (LRU)."""

    def __init__(self, store: AdapterRepository, max_rank: int, capacity: int = CACHE_ENTRIES) -> None:
        self.store = store
        self.max_rank = max_rank
        self.capacity = capacity
        self._cache: OrderedDict[str, LoraAdapter] = OrderedDict()
        self._lock = threading.Lock()
        self.compositions = 0  # composed (cache misses), for tests and logs

    async def sources(self, ids: Sequence[str], lookup: AdapterRepository | None = None) -> list[LoraAdapter]:
        """The current version of each id (read off the event loop); 404 for an unknown one.
        ``lookup``: the caller's view of the store (a tenant's names: ``server.api.tenancy``)."""
        store = lookup if lookup is not None else self.store
        found = []
        for adapter_id in ids:
            adapter = await store.aget(adapter_id) if adapter_id in store else None
            if adapter is None:
                raise adapter_not_found(adapter_id)
            found.append(adapter)
        return found

    def digest(self, sources: Sequence[LoraAdapter], weights: Sequence[float], spec: CompositionSpec) -> str:
        return composition_digest([(a.adapter_id, self.content_of(a)) for a in sources], weights, spec)

    def sha256_of(self, adapter: LoraAdapter) -> str:
        """The stored sha256 of this version's weights (its version string if it was replaced meanwhile)."""
        record = self.store.record(adapter.adapter_id)
        return record.sha256 if record is not None and record.version == adapter.version else adapter.version

    def content_of(self, adapter: LoraAdapter) -> str:
        """What identifies this version's content in a digest: the sha256 of its weights and of its
        config (a replace that changes only ``lora_alpha`` changes ΔW too). Content, not the version
        string: every cluster replica, and the store, get the same digest (and DARE seed)."""
        record = self.store.record(adapter.adapter_id)
        if record is None or record.version != adapter.version:
            return adapter.version  # replaced meanwhile: a key no current version shares
        return f"{record.sha256}:{record.config_sha256}"

    async def resolve(self, merged: MergedAdapters, lookup: AdapterRepository | None = None) -> Composition:
        """The virtual adapter of ``merged_adapters``: from the cache, or composed once now. The
        digest covers the sources' stored ids, so two tenants' ``bot`` never share a composition."""
        sources = await self.sources(merged.ids, lookup)
        spec = merged.spec()
        digest = self.digest(sources, merged.weights, spec)
        seed = seed_of(digest)
        with self._lock:
            adapter = self._cache.get(digest)
            if adapter is not None:
                self._cache.move_to_end(digest)
        if adapter is None:
            adapter = await asyncio.to_thread(
                compose,
                sources,
                merged.weights,
                dataclasses.replace(spec, seed=seed),
                adapter_id=VIRTUAL_PREFIX + digest[:16],
                version=digest,  # the whole digest: slots and cached KV blocks are keyed by it
                max_rank=self.max_rank,
            )
            with self._lock:
                self.compositions += 1
                self._cache[digest] = adapter
                while len(self._cache) > self.capacity:
                    self._cache.popitem(last=False)
        return Composition(adapter, tuple(sources), digest, seed)


def get_compositions(request: Request, settings: SettingsDep, store: StoreDep) -> ScopedCompositions:
    state = request.app.state
    service = getattr(state, "compositions", None)
    if service is None:
        service = CompositionService(state.registry, settings.max_rank)
        state.compositions = service
    return ScopedCompositions(service, store)


class ScopedCompositions:
    """The app's :class:`CompositionService` resolving source ids in the caller's namespace."""

    def __init__(self, service: CompositionService, lookup: AdapterRepository) -> None:
        self.service = service
        self.lookup = lookup

    async def sources(self, ids: Sequence[str]) -> list[LoraAdapter]:
        return await self.service.sources(ids, self.lookup)

    async def resolve(self, merged: MergedAdapters) -> Composition:
        return await self.service.resolve(merged, self.lookup)

    def digest(self, sources: Sequence[LoraAdapter], weights: Sequence[float], spec: CompositionSpec) -> str:
        return self.service.digest(sources, weights, spec)

    def sha256_of(self, adapter: LoraAdapter) -> str:
        return self.service.sha256_of(adapter)


CompositionsDep = Annotated[ScopedCompositions, Depends(get_compositions)]


async def resolve_merged(
    compositions: ScopedCompositions, merged: MergedAdapters | None
) -> Composition | None:
    return None if merged is None else await compositions.resolve(merged)


@router.post("/adapters/compose", status_code=201)
async def compose_adapters(
    request: Request,
    body: ComposeBody,
    store: StoreDep,
    compositions: CompositionsDep,
    settings: SettingsDep,
) -> JSONResponse:
    """Compose stored adapters (linear, ties, dare_linear, dare_ties) and store the result as ``new_id``,
    a regular PEFT adapter; with ``rank``, each module's ΔW truncated to that rank (exact SVD).
    201 with its summary and, under ``compose``, the sources, the DARE seed and, per module, the
    composed rank, the stored rank and the relative error ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F.

    Needs only the store (the sources' factors and the base model's shapes it was bound to), not
    the engine: on a Ray cluster it runs in the store deployment, like an upload."""
    base_shapes = store.base_shapes
    if not store.ready or base_shapes is None:
        raise StoreNotReady(
            "the base model is still loading (compositions are validated against it); retry shortly."
        )
    store.check_can_put(body.new_id, replace=False)  # 400 bad id, 409 taken
    if body.rank is not None and body.rank > settings.max_rank:
        raise ApiError(
            422,
            f"rank {body.rank} is above the server's limit of {settings.max_rank} (--max-rank); give a smaller rank.",
            "rank_too_large",
        )
    sources = await compositions.sources([s.id for s in body.sources])
    weights = [s.weight for s in body.sources]
    spec = body.spec()
    digest = compositions.digest(sources, weights, spec)
    seed = seed_of(digest)

    def build() -> ComposedFiles:
        adapter = compose(
            sources,
            weights,
            dataclasses.replace(spec, seed=seed),
            adapter_id=body.new_id,
            max_rank=None if body.rank is not None else settings.max_rank,
        )
        return composed_files(adapter, base_shapes, body.rank)

    written = await asyncio.to_thread(build)
    files, layers = written.files, written.layers
    record = await asyncio.to_thread(store.put, body.new_id, files)
    payload = {
        **record.summary(),
        **await screening_of(request, store, record.adapter_id),
        "compose": {
            "sources": [
                {
                    "id": source.id,
                    "weight": w,
                    "sha256": compositions.sha256_of(a),
                }  # the id as the caller names it
                for source, a, w in zip(body.sources, sources, weights, strict=True)
            ],
            "strategy": spec.strategy,
            "density": spec.density,
            "majority_sign_method": spec.majority_sign_method,
            "seed": seed,
            "rank": body.rank,
            "relative_error": written.relative_error,
            "max_relative_error": max((layer["relative_error"] for layer in layers), default=0.0),
            "layers": layers,
        },
    }
    return JSONResponse(payload, status_code=201, headers={"Location": f"/adapters/{record.adapter_id}"})
