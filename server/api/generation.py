"""Glue shared by every generation route: resolve the adapter, tokenize, run, time."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import Request

from adapters.registry import AdapterLookup
from server.api.errors import ApiError, adapter_not_found
from server.engine.engine import Engine
from server.engine.requests import ErrorEvent, FinishEvent, GenerationRequest, TokenEvent
from server.engine.sampling import SamplingParams

DISCONNECT_POLL_SECONDS = 0.25


def build_request(
    engine: Engine,
    registry: AdapterLookup,
    prompt_ids: list[int],
    params: SamplingParams,
    adapter_id: str | None,
    want_details: bool = False,
) -> GenerationRequest:
    """Resolve ``adapter_id`` (404 when unknown: never a silent fall-back to the base).

    The adapter is resolved once, here: a later replace or delete does not change this request,
    and the registry keeps the version's files until the request is gone (``track``). Routes that
    take ``RegistryDep`` get the adapter their JSON body names prefetched into host memory off the
    event loop (see ``server.api.deps.get_registry``), so this lookup does not read the disk.
    """
    adapter = None
    if adapter_id is not None:
        adapter = registry.get(adapter_id)
        if adapter is None:
            raise adapter_not_found(adapter_id)
    request = GenerationRequest(
        prompt_ids=prompt_ids, params=params, adapter=adapter, want_details=want_details
    )
    engine.validate(request)
    if adapter is not None:
        registry.track(request, adapter)
    return request


def tokenize(engine: Engine, text: str) -> list[int]:
    return list(engine.tokenizer(text, add_special_tokens=True)["input_ids"])


async def run_to_completion(
    engine: Engine, request: GenerationRequest, http_request: Request
) -> tuple[FinishEvent, list[TokenEvent]]:
    """Run a request, cancelling it when the HTTP client goes away before the end."""

    async def consume() -> tuple[FinishEvent, list[TokenEvent]]:
        tokens: list[TokenEvent] = []
        async for event in engine.stream(request):
            if isinstance(event, TokenEvent):
                tokens.append(event)
            elif isinstance(event, FinishEvent):
                return event, tokens
            elif isinstance(event, ErrorEvent):
                raise ApiError(500 if event.error_type == "internal" else 499, event.message, event.error_type)
        raise ApiError(500, "generation ended without a result", "internal")

    task = asyncio.create_task(consume())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await http_request.is_disconnected():
                request.cancel()
                task.cancel()
                raise ApiError(499, "client disconnected", "cancelled")
    finally:
        if not task.done():
            request.cancel()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ApiError):
                await task


def timing_headers(request: GenerationRequest) -> dict[str, str]:
    t = request.timings()
    return {
        "x-adapter-id": request.adapter_id or "",
        "x-queue-time": f"{t['queue_time']:.6f}",
        "x-inference-time": f"{t['inference_time']:.6f}",
        "x-time-to-first-token": f"{t['time_to_first_token']:.6f}",
    }
