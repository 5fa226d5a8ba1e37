"""Adapter analysis routes: spectral diagnostics, plots, comparison, shrinking, download.

    GET  /adapters/compare?a=ID&b=ID[&layers=REGEX]   subspace similarity φ per shared module
    GET  /adapters/{id}/analysis[?layers=REGEX]        docs/analysis.md diagnostics, JSON
    GET  /adapters/{id}/analysis.png                   spectra, σ1/σmax(W) heatmap, effective rank
    GET  /adapters/{id}/analysis.html                  the figures and the per-layer table, one page
    POST /adapters/{id}/shrink                         {"method", "value", "new_id"} -> 201, new adapter
    GET  /adapters/{id}/download                       zip: <id>/adapter_config.json + .safetensors

This router must be included before ``adapters.router``: there, ``GET /adapters/{adapter_id}``
would otherwise take ``/adapters/compare`` for an adapter named "compare".

The math runs in worker threads (``asyncio.to_thread``), never on the event loop. Base weights
come from ``engine.base_weights()`` (the pristine weights, whatever adapter is merged; safe from
worker threads).
Errors: 400 bad id, 404 unknown adapter, 409 new_id exists, 422 bad regex / method / value /
a shrink that does not reduce the rank, 503 while the model loads.
"""

from __future__ import annotations

import asyncio
import io
import threading
import zipfile
from collections.abc import Callable
from typing import Annotated, Any, Literal

import torch
from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from adapters import plots, report
from adapters.analysis import (
    AnalysisMemo,
    BaseStatsCache,
    ShrinkError,
    analyze,
    check_shrink_request,
    compare,
    compile_layer_filter,
    filter_analysis,
    shrink_adapter,
)
from adapters.index import AdapterRecord
from adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, LoraAdapter
from adapters.registry import AdapterRepository
from server.api.adapters import stored_record
from server.api.deps import EngineDep, StoreDep
from server.api.errors import ApiError, adapter_not_found
from server.api.screening import screening_of

router = APIRouter(tags=["analysis"])

AdapterIdPath = Annotated[str, Path(description="Adapter id.")]
LayersQuery = Annotated[
    str | None,
    Query(max_length=500, description=r"Regex searched in module names, e.g. q_proj or layers\.1[0-9]\."),
]


class ShrinkBody(BaseModel):
    method: Literal["sv_fro", "sv_ratio", "sv_cumulative", "spn_ckpt", "rank"] = Field(
        description="sv_fro: keep √(Σ_{≤k}σ²/Σσ²) ≥ value, in (0, 1]; sv_cumulative: Σ_{≤k}σ/Σσ ≥ value, "
        "in (0, 1]; sv_ratio: σ_i ≥ σ_1/value, value ≥ 1; spn_ckpt: σ_i ≥ value·σ_max(W), value > 0; "
        "rank: this rank, an integer from 1 to the adapter's rank - 1."
    )
    value: float
    new_id: str = Field(description="Id of the new adapter (1-64 of A-Z a-z 0-9 . _ -).")


# --------------------------------------------------------------------------- service


class AnalysisService:
    """Per-app analysis state: the memo of finished analyses and the base-weight statistics."""

    def __init__(self, weight: Callable[[str], torch.Tensor], cache_factory: Callable[[], BaseStatsCache]):
        self.weight = weight  # module -> pristine base weight [out, in], CPU, any thread
        self.memo = AnalysisMemo()
        self._cache_factory = cache_factory
        self._cache: BaseStatsCache | None = None
        self._lock = threading.Lock()

    def base_cache(self) -> BaseStatsCache:
        """Opened on first use, in a worker thread (it reads the cache file)."""
        with self._lock:
            if self._cache is None:
                self._cache = self._cache_factory()
            return self._cache

    def analysis(self, adapter: LoraAdapter) -> dict[str, Any]:
        """The full (unfiltered) analysis, memoized by adapter key. Blocking."""
        return self.memo.get_or_compute(adapter.key, lambda: analyze(adapter, self.weight, self.base_cache()))

    def base_spectral_norm(self, module: str) -> float:
        return self.base_cache().get(module, self.weight(module)).spectral_norm


def get_service(request: Request, engine: EngineDep) -> AnalysisService:
    state = request.app.state
    service = getattr(state, "analysis", None)
    if service is None:
        settings, base = state.settings, state.base
        weights = engine.base_weights()

        def open_cache() -> BaseStatsCache:
            return BaseStatsCache(settings.cache_dir / "analysis", base.name, weights.digest)

        service = AnalysisService(weights.weight, open_cache)
        state.analysis = service
    return service


ServiceDep = Annotated[AnalysisService, Depends(get_service)]


# --------------------------------------------------------------------------- helpers


async def _adapter(store: AdapterRepository, adapter_id: str) -> LoraAdapter:
    stored_record(store, adapter_id)
    adapter = await store.aget(adapter_id)
    if adapter is None:  # deleted meanwhile
        raise adapter_not_found(adapter_id)
    return adapter


def _check_layers(layers: str | None) -> None:
    try:
        compile_layer_filter(layers)
    except ValueError as exc:
        raise ApiError(422, str(exc), "invalid_layers") from exc


async def _analysis(
    service: AnalysisService, store: AdapterRepository, adapter_id: str, layers: str | None
) -> dict:
    _check_layers(layers)

    raw = getattr(store, "raw", store)  # stored ids: the memo holds every tenant's analyses

    def current_key(aid: str) -> str | None:
        record = raw.record(aid)
        return record.key if record is not None else None

    service.memo.retain(current_key)  # forget replaced and deleted versions
    adapter = await _adapter(store, adapter_id)
    full = await asyncio.to_thread(service.analysis, adapter)
    return filter_analysis(full, layers)


# --------------------------------------------------------------------------- routes


@router.get("/adapters/compare")
async def compare_adapters(
    store: StoreDep,
    a: Annotated[str, Query(description="First adapter id.")],
    b: Annotated[str, Query(description="Second adapter id.")],
    layers: LayersQuery = None,
) -> dict:
    """Subspace similarity φ(i, j) (LoRA paper Eq. 4) of the left and right singular subspaces of
    ΔW, per module both adapters adapt, with a summary."""
    _check_layers(layers)
    first, second = await _adapter(store, a), await _adapter(store, b)
    try:
        return await asyncio.to_thread(compare, first, second, layers)
    except ValueError as exc:
        raise ApiError(422, str(exc), "incompatible") from exc


@router.get("/adapters/{adapter_id}/analysis")
async def adapter_analysis(
    adapter_id: AdapterIdPath, store: StoreDep, service: ServiceDep, layers: LayersQuery = None
) -> dict:
    """Spectral diagnostics per adapted layer (docs/analysis.md) and their summary."""
    return await _analysis(service, store, adapter_id, layers)


@router.get("/adapters/{adapter_id}/analysis.png", response_class=Response)
async def adapter_analysis_png(
    adapter_id: AdapterIdPath, store: StoreDep, service: ServiceDep, layers: LayersQuery = None
) -> Response:
    result = await _analysis(service, store, adapter_id, layers)
    png = await asyncio.to_thread(plots.analysis_png, result)
    return Response(png, media_type="image/png")


@router.get("/adapters/{adapter_id}/analysis.html", response_class=HTMLResponse)
async def adapter_analysis_html(
    adapter_id: AdapterIdPath, store: StoreDep, service: ServiceDep, layers: LayersQuery = None
) -> HTMLResponse:
    result = await _analysis(service, store, adapter_id, layers)
    page = await asyncio.to_thread(lambda: report.render_html(result, plots.panel_pngs(result)))
    return HTMLResponse(page)


@router.post("/adapters/{adapter_id}/shrink", status_code=201)
async def shrink(
    request: Request, adapter_id: AdapterIdPath, body: ShrinkBody, store: StoreDep, service: ServiceDep
) -> JSONResponse:
    """Store a lower-rank copy (truncated exact SVD per layer) as ``new_id``; 201 with its summary
    and, under ``shrink``, the kept rank and Frobenius fraction retained per layer."""
    source = await _adapter(store, adapter_id)
    store.check_can_put(body.new_id, replace=False)  # 400 bad id, 409 taken
    try:
        check_shrink_request(source, body.method, body.value)
        norm = service.base_spectral_norm if body.method == "spn_ckpt" else None
        result = await asyncio.to_thread(shrink_adapter, source, body.method, body.value, norm)
    except ShrinkError as exc:
        raise ApiError(422, exc.message, exc.error_type) from exc
    if norm is not None:
        await asyncio.to_thread(service.base_cache().flush)
    record = await asyncio.to_thread(store.put, body.new_id, result.files)
    payload = {
        **record.summary(),
        **await screening_of(request, store, record.adapter_id),
        "shrink": {
            "source_id": source.adapter_id,
            "method": body.method,
            "value": body.value,
            "original_rank": source.max_rank,
            "original_parameters": source.num_parameters,
            "fro_retained": result.fro_retained,
            "layers": result.layers,
        },
    }
    return JSONResponse(payload, status_code=201, headers={"Location": f"/adapters/{record.adapter_id}"})


@router.get("/adapters/{adapter_id}/download", response_class=Response)
async def download(adapter_id: AdapterIdPath, store: StoreDep) -> Response:
    """The stored adapter as a zip holding ``<id>/adapter_config.json`` and ``<id>/adapter_model.safetensors``
    (upload it back with ``POST /adapters``, field 'archive')."""
    stored_record(store, adapter_id)
    record, body = await asyncio.to_thread(_zip_current, store, adapter_id)
    headers = {
        "Content-Disposition": f'attachment; filename="{record.adapter_id}.zip"',
        "ETag": f'"{record.sha256}"',
    }
    return Response(body, media_type="application/zip", headers=headers)


def _zip_current(store: AdapterRepository, adapter_id: str) -> tuple[AdapterRecord, bytes]:
    """Zip the current version's two files (read and checked by the store)."""
    found = store.read_files(adapter_id)
    if found is None:
        raise adapter_not_found(adapter_id)
    record, files = found
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(f"{adapter_id}/{CONFIG_FILE}", files.config, zipfile.ZIP_DEFLATED)
        zf.writestr(
            f"{adapter_id}/{WEIGHTS_FILE}", files.weights, zipfile.ZIP_STORED
        )  # floats barely compress
    return record, buffer.getvalue()
