"""GET /health and GET /info."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server import __version__
from server.api.deps import BaseDep, EngineDep, RegistryDep, SettingsDep

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    engine = getattr(request.app.state, "engine", None)
    error = getattr(request.app.state, "load_error", None)
    if error is not None:
        return JSONResponse({"status": "failed", "error": error}, status_code=503)
    if engine is None or not engine.running:
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/info")
async def info(engine: EngineDep, base: BaseDep, registry: RegistryDep, settings: SettingsDep) -> dict:
    return {
        "version": __version__,
        "model": base.name,
        "model_path": str(base.path),
        "dtype": str(base.dtype).removeprefix("torch."),
        "device": str(base.device),
        "mode": settings.mode,
        "merged_adapter": engine.merged_adapter_id,
        "swaps": engine.stats.swaps,
        "kernel": engine.config.kernel,
        "limits": {
            "max_batch": engine.config.max_batch,
            "max_input_tokens": engine.config.max_input_tokens,
            "max_total_tokens": engine.config.max_total_tokens,
            "max_prefill_tokens": engine.config.max_prefill_tokens,
            "max_loaded_adapters": engine.config.max_loaded_adapters,
            "max_rank": settings.max_rank,
        },
        "adapters": registry.ids(),
        "adapters_loaded": [key.partition("@")[0] for key in engine.slots.resident_keys],
        "running_requests": engine.num_running,
        "waiting_requests": engine.num_waiting,
    }
