"""GET /health and GET /info."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from adapters.tenants import owner_of
from server import __version__
from server.api.deps import BaseDep, EngineDep, RegistryDep, SettingsDep
from server.api.errors import ApiError
from server.api.security import accepted_keys, app_tenants, bearer_token, check_access, principal_of
from server.api.tenancy import Principal
from server.api.tenants import describe_tenant

if TYPE_CHECKING:
    from server.engine.engine import Engine

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    engine = getattr(request.app.state, "engine", None)
    error = getattr(request.app.state, "load_error", None)
    if error is not None:  # the reason (paths, messages) only for callers holding a key
        shown = error if _keyed_caller(request) else "start-up failed; the server's log says why."
        return JSONResponse({"status": "failed", "error": shown}, status_code=503)
    drain = getattr(request.app.state, "drain", None)
    if drain is not None and drain.draining:  # balancers: send new traffic elsewhere
        return JSONResponse({"status": "draining"}, status_code=503, headers=drain.refusal().headers)
    if engine is None or not engine.running:
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ok"})


def _keyed_caller(request: Request) -> bool:
    """Whether the caller sent a key that opens the read routes (never true when no key is set:
    then anyone could call, and /health is polled by machines that need no details)."""
    settings = getattr(request.app.state, "settings", None)
    if settings is None or not accepted_keys(settings, "read"):
        return False
    try:
        check_access(
            settings, "read", bearer_token(request.headers.get("authorization")), app_tenants(request.app)
        )
    except ApiError:
        return False
    return True


def _kv_cache(engine: Engine) -> dict:
    kv = engine.runner.kv_usage()
    return {
        "used_tokens": kv.used_tokens,
        "capacity_tokens": kv.capacity,  # null: grows on demand (the Hugging Face runner)
        "free_tokens": None if kv.capacity is None else kv.capacity - kv.used_tokens,
        "bytes_reserved": kv.bytes_reserved,
        "preemptions": engine.stats.preemptions,
    }


def _prefix_cache(engine: Engine) -> dict:
    """``--prefix-cache``: whether it runs (the HF runner has none) and its counters since start."""
    stats = engine.runner.prefix_cache_stats()
    if not engine.prefix_cache or stats is None:
        reason = (
            "--prefix-cache off"
            if engine.runner.supports_prefix_cache
            else (f"the {engine.runner.name} runner has no prefix cache (the native runner has)")
        )
        return {"enabled": False, "reason": reason}
    block = getattr(getattr(engine.runner, "kv", None), "block_size", None)
    return {
        "enabled": True,
        "block_size": block,
        "lookups": stats.lookups,
        "lookup_tokens": stats.lookup_tokens,
        "hit_tokens": stats.hit_tokens,
        "hit_rate": round(stats.hit_tokens / stats.lookup_tokens, 4) if stats.lookup_tokens else 0.0,
        "cached_blocks": stats.cached_blocks,
        "evictable_blocks": stats.evictable_blocks,
        "evictions": stats.evictions,
    }


def _speculation(engine: Engine, principal: Principal) -> dict:
    """``--speculate``: whether speculative decoding runs (the HF runner cannot roll back its
    cache), the drafts proposed per step, and the drafted and accepted tokens since start, in all
    and by adapter (the adapters this caller may see; ``__base__``: no adapter)."""
    stats = engine.stats.speculation
    if not engine.speculate:
        reason = (
            "--speculate 0"
            if engine.runner.supports_speculation or not engine.config.speculate
            else f"the {engine.runner.name} runner does not verify drafts (the native runner does)"
        )
        return {"enabled": False, "reason": reason}
    by_adapter = {}
    for stored, (drafted, accepted) in sorted(stats.by_adapter.items()):
        name = stored if stored == "__base__" else _shown(principal, stored)
        if name is not None:
            by_adapter[name] = {
                "drafted_tokens": drafted,
                "accepted_tokens": accepted,
                "acceptance_rate": round(accepted / drafted, 4) if drafted else 0.0,
            }
    return {
        "enabled": True,
        "method": "prompt_lookup",
        "speculate": engine.speculate,
        "max_batch": engine.config.speculate_max_batch,
        "verify_rows": stats.steps,
        "drafted_tokens": stats.drafted,
        "accepted_tokens": stats.accepted,
        "acceptance_rate": round(stats.accepted / stats.drafted, 4) if stats.drafted else 0.0,
        "by_adapter": by_adapter,
    }


def _decode(engine: Engine) -> dict:
    """How decode steps run (``--compile``): eager, compile (CPU) or cuda_graphs, and the graphs made;
    ``weights``: the projections' layout (native runner: ``packed`` for oneDNN on the CPU, or
    ``dense``, or ``quantized``; the HF runner's are dense); ``quantization``: ``--quantization``;
    ``lora_backend``: the LoRA backend graph-run steps use (eager steps: the runner's)."""
    graphs = getattr(engine.runner, "graphs", None)
    return {
        "kind": getattr(engine.runner, "decode_kind", "eager"),
        "weights": getattr(engine.runner, "weight_layout", "dense"),
        "quantization": getattr(engine.runner, "quantization", "none"),
        "lora_backend": (graphs.lora_form if graphs is not None else engine.runner.lora_backend).name,
        "graphs": graphs.captures if graphs is not None else 0,
        "warm_up_seconds": round(graphs.warm_up_seconds, 2) if graphs is not None else 0.0,
    }


@router.get("/info")
async def info(
    request: Request, engine: EngineDep, base: BaseDep, registry: RegistryDep, settings: SettingsDep
) -> dict:
    principal = principal_of(request)
    out = {
        "version": __version__,
        "model": base.name,
        "model_path": str(base.path),
        "dtype": str(base.dtype).removeprefix("torch."),
        "device": str(base.device),
        "mode": engine.config.mode,  # a quantized base runs auto as unmerged
        "merged_adapter": _shown(principal, engine.merged_adapter_id),
        "swaps": engine.stats.swaps,
        "generated_tokens": engine.stats.generated_tokens,
        "lora_backend": engine.runner.lora_backend.name,  # --lora-backend, auto resolved
        "runner": engine.runner.name,
        "decode": _decode(engine),
        "kv_cache": _kv_cache(engine),
        "prefix_cache": _prefix_cache(engine),
        "speculation": _speculation(engine, principal),
        "limits": {
            "max_batch": engine.config.max_batch,
            "max_input_tokens": engine.config.max_input_tokens,
            "max_total_tokens": engine.config.max_total_tokens,
            "max_prefill_tokens": engine.config.max_prefill_tokens,
            "max_loaded_adapters": engine.config.max_loaded_adapters,
            "max_rank": settings.max_rank,
        },
        "adapters": registry.ids(),
        "adapters_loaded": [
            shown
            for key in engine.slots.resident_keys
            if (shown := _shown(principal, key.partition("@")[0])) is not None
        ],
        "adapter_slot_users": engine.slots.in_use,
        "running_requests": engine.num_running,
        "waiting_requests": engine.num_waiting,
        "http_requests_in_flight": _in_flight(request),
        "adapter_sources": _sources(request),
        "tenant": principal.label,  # who is asking (the console shows it): a tenant's id, _admin, _default
    }
    if principal.kind == "admin" and app_tenants(request.app) is not None:
        out["tenants"] = [describe_tenant(request, t) for t in app_tenants(request.app).list()]
    return out


def _shown(principal: Principal, stored: str | None) -> str | None:
    """A stored adapter id as this caller names it; None when it is not one it may see (another
    tenant's adapters are never named to a tenant, not even as loaded in a slot)."""
    if stored is None or principal.kind == "admin":
        return stored
    owner, name = owner_of(stored)
    if owner is None:
        return stored  # a shared adapter, or a composition's digest (merged:...)
    return name if principal.tenant is not None and owner == principal.tenant.id else None


def _sources(request: Request) -> dict:
    """``--adapter-source``: the locations searched, in order, and the adapters fetched from them."""
    sources = getattr(request.app.state, "sources", None)
    if sources is None:
        return {"uris": [], "fetches": 0}
    return {"uris": sources.uris, "fetches": sources.fetches, "refresh_seconds": sources.refresh_seconds}


def _in_flight(request: Request) -> int | None:
    """HTTP requests being answered (uploads and streams to their last byte), this one included."""
    drain = getattr(request.app.state, "drain", None)
    return drain.in_flight if drain is not None else None
