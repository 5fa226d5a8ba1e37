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
    from server.engine.describe import EngineSnapshot, RunnerInfo, SpeculationInfo

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


def _kv_cache(snap: EngineSnapshot) -> dict:
    kv = snap.kv
    return {
        "used_tokens": kv.used_tokens,
        "capacity_tokens": kv.capacity_tokens,  # null: grows on demand (the Hugging Face runner)
        "free_tokens": kv.free_tokens,
        "bytes_reserved": kv.bytes_reserved,
        "preemptions": snap.stats.preemptions,
    }


def _prefix_cache(snap: EngineSnapshot) -> dict:
    """``--prefix-cache``: whether it runs (the HF runner has none) and its counters since start."""
    cache = snap.prefix_cache
    if not cache.enabled:
        return {"enabled": False, "reason": cache.reason}
    return {
        "enabled": True,
        "block_size": snap.kv.block_size,
        "lookups": cache.lookups,
        "lookup_tokens": cache.lookup_tokens,
        "hit_tokens": cache.hit_tokens,
        "hit_rate": round(cache.hit_rate, 4),
        "cached_blocks": cache.cached_blocks,
        "evictable_blocks": cache.evictable_blocks,
        "evictions": cache.evictions,
    }


def _speculation(spec: SpeculationInfo, principal: Principal) -> dict:
    """``--speculate``: whether speculative decoding runs (the HF runner cannot roll back its
    cache), the drafts proposed per step, and the drafted and accepted tokens since start, in all
    and by adapter (the adapters this caller may see; ``__base__``: no adapter)."""
    if not spec.enabled:
        return {"enabled": False, "reason": spec.reason}
    by_adapter = {}
    for stored, (drafted, accepted) in sorted(spec.by_adapter.items()):
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
        "speculate": spec.speculate,
        "max_batch": spec.max_batch,
        "verify_rows": spec.verify_rows,
        "drafted_tokens": spec.drafted_tokens,
        "accepted_tokens": spec.accepted_tokens,
        "acceptance_rate": round(spec.acceptance_rate, 4),
        "by_adapter": by_adapter,
    }


def _decode(runner: RunnerInfo) -> dict:
    """How decode steps run (``--compile``): eager, compile (CPU) or cuda_graphs, and the graphs made;
    ``weights``: the projections' layout (native runner: ``packed`` for oneDNN on the CPU, or
    ``dense``, or ``quantized``; the HF runner's are dense); ``quantization``: ``--quantization``;
    ``quant_dot`` (with a quantization): the quantized kernels' dot products, ``int (vnni)``,
    ``int (avx2)`` or ``float`` (``--quant-dot``, ``quant_cpu.py``);
    ``lora_backend``: the LoRA backend graph-run steps use (eager steps: the runner's);
    ``threads`` (native runner): the compiled kernels' threads in steps of up to 4 rows (and
    verify steps of up to 8 tokens)
    (``LORAPLEX_DECODE_THREADS``: ``setting`` auto or a number, ``threads`` the count the last
    such step ran on, ``step_ms`` auto's estimates by tokens in the step and threads;
    ``decode_threads.py``)."""
    return {
        "kind": runner.decode_kind,
        "weights": runner.weight_layout,
        "quantization": runner.quantization,
        **({"quant_dot": runner.quant_dot} if runner.quant_dot else {}),
        "lora_backend": runner.decode_lora_backend,
        "graphs": runner.graphs,
        "warm_up_seconds": round(runner.warm_up_seconds, 2),
        **({"threads": dict(runner.decode_threads)} if runner.decode_threads else {}),
    }


@router.get("/info")
async def info(
    request: Request, engine: EngineDep, base: BaseDep, registry: RegistryDep, settings: SettingsDep
) -> dict:
    principal = principal_of(request)
    snap = engine.describe()  # every engine figure below comes from this one snapshot
    out = {
        "version": __version__,
        "model": base.name,
        "model_path": str(base.path),
        "dtype": str(base.dtype).removeprefix("torch."),
        "device": str(base.device),
        "mode": snap.mode,  # a quantized base runs auto as unmerged
        "merged_adapter": _shown(principal, snap.merged_adapter),
        "swaps": snap.stats.swaps,
        "generated_tokens": snap.stats.generated_tokens,
        "lora_backend": snap.runner.lora_backend,  # --lora-backend, auto resolved
        "runner": snap.runner.name,
        "decode": _decode(snap.runner),
        "kv_cache": _kv_cache(snap),
        "prefix_cache": _prefix_cache(snap),
        "speculation": _speculation(snap.speculation, principal),
        "limits": {
            "max_batch": snap.limits.max_batch,
            "max_input_tokens": snap.limits.max_input_tokens,
            "max_total_tokens": snap.limits.max_total_tokens,
            "max_prefill_tokens": snap.limits.max_prefill_tokens,
            "max_loaded_adapters": snap.limits.max_loaded_adapters,
            "max_rank": settings.max_rank,
        },
        "adapters": registry.ids(),
        "adapters_loaded": [
            shown
            for key in snap.slots.resident_keys
            if (shown := _shown(principal, key.partition("@")[0])) is not None
        ],
        "adapter_slot_users": snap.slots.in_use,
        "running_requests": snap.queue.running,
        "waiting_requests": snap.queue.waiting,
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
