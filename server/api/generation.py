"""Glue shared by every generation route: resolve the adapter, tokenize, run, time.

Every route goes through :func:`build_request` and :func:`stream_events` (directly, or through
:func:`run_to_completion`), so admission control (``--max-queue``), the request timeout and the
request metrics live here once (see ``server.api.context``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from fastapi import Request

from adapters.registry import AdapterLookup
from server.api.composition import MERGED_LABEL, Composition
from server.api.context import RequestContext, current, shown_adapter_id
from server.api.errors import ApiError, adapter_not_found
from server.api.load_control import admit_generation
from server.engine.engine import Engine
from server.engine.grammar import Grammar
from server.engine.requests import ErrorEvent, Event, FinishEvent, GenerationRequest, TokenEvent
from server.engine.sampling import SamplingParams

DISCONNECT_POLL_SECONDS = 0.25
# HTTP status of a request whose stream ended with an ErrorEvent of this type (else 500); 424 is
# what TGI answers for a failed generation (its clients raise GenerationError)
ERROR_STATUS = {"cancelled": 499, "timeout": 504, "generation": 424}


def build_request(
    engine: Engine,
    registry: AdapterLookup,
    prompt_ids: list[int],
    params: SamplingParams,
    adapter_id: str | None,
    want_details: bool = False,
    *,
    composition: Composition | None = None,
    adapter_scale: float = 1.0,
    grammar: Grammar | None = None,
) -> GenerationRequest:
    """Resolve ``adapter_id`` (404 when unknown: never a silent fall-back to the base), or take the
    adapter of ``composition`` (LoRAX's merged_adapters, resolved by ``server.api.composition``).
    ``adapter_scale`` multiplies the adapter's update for this request.

    ``grammar``: structured output (``server.api.structured``); the request gets its own state of it.

    The adapter is resolved once, here: a later replace or delete does not change this request,
    and the registry keeps the version's files until the request is gone (``track``). Routes that
    take ``RegistryDep`` get the adapter their JSON body names prefetched into host memory off the
    event loop (see ``server.api.deps.get_registry``), so this lookup does not read the disk.
    """
    admit_generation(engine.num_running + engine.num_waiting, len(prompt_ids))  # 429: --max-queue, quotas
    adapter = None
    if composition is not None:
        adapter = composition.adapter
    elif adapter_id is not None:
        adapter = registry.get(adapter_id)
        if adapter is None:
            raise adapter_not_found(adapter_id)
    request = GenerationRequest(
        prompt_ids=prompt_ids,
        params=params,
        adapter=adapter,
        adapter_scale=adapter_scale,
        want_details=want_details,
        grammar=grammar,
    )
    engine.validate(request)
    for used in composition.sources if composition is not None else [adapter] if adapter is not None else []:
        registry.track(request, used)
    if (context := current()) is not None:
        context.note_adapter(MERGED_LABEL if composition is not None else request.adapter_id)
    return request


def tokenize(engine: Engine, text: str) -> list[int]:
    check_prompt_chars(engine, len(text))
    return list(engine.tokenizer(text, add_special_tokens=True)["input_ids"])


def check_prompt_chars(engine: Engine, chars: int, what: str = "the prompt") -> None:
    """422 for a prompt longer than ``--max-prompt-chars``, before any tokenizer sees it."""
    limit = engine.config.max_prompt_chars
    if chars > limit:
        raise ApiError(
            422,
            f"{what} has {chars} characters, more than the server's limit of {limit} (--max-prompt-chars; "
            f"the model reads at most {engine.config.max_input_tokens} tokens); shorten it.",
            "validation",
        )


async def tokenize_off_loop(engine: Engine, text: str) -> list[int]:
    """:func:`tokenize` in a worker thread: a long prompt never stalls the event loop (other streams)."""
    check_prompt_chars(engine, len(text))
    return await asyncio.to_thread(tokenize, engine, text)


async def run_to_completion(
    engine: Engine, request: GenerationRequest, http_request: Request
) -> tuple[FinishEvent, list[TokenEvent]]:
    """Run a request, cancelling it when the HTTP client goes away before the end."""

    async def consume() -> tuple[FinishEvent, list[TokenEvent]]:
        tokens: list[TokenEvent] = []
        async for event in stream_events(engine, request):
            if isinstance(event, TokenEvent):
                tokens.append(event)
            elif isinstance(event, FinishEvent):
                return event, tokens
            elif isinstance(event, ErrorEvent):
                raise ApiError(ERROR_STATUS.get(event.error_type, 500), event.message, event.error_type)
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


async def run_many(
    engine: Engine, requests: list[GenerationRequest], http_request: Request
) -> list[FinishEvent]:
    """Run several requests together (best_of, n: they batch); one failing stops the others."""
    tasks = [asyncio.create_task(run_to_completion(engine, r, http_request)) for r in requests]
    try:
        results = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()  # no-op for finished ones
    return [finish for finish, _ in results]


async def stream_events(engine: Engine, request: GenerationRequest) -> AsyncIterator[Event]:
    """``engine.stream(request)`` with the request timeout and the request metrics around it.

    Past the deadline (``--request-timeout``) the request is cancelled and the stream ends with
    ``ErrorEvent(..., "timeout")``: a JSON route answers 504, a streaming one sends it as its last
    event. A stream that ends with an error, or that the client leaves, is counted with its real
    outcome (``ERROR_STATUS``; 499 when the client left) instead of the 200 it started with.
    """
    context = current()
    deadline = context.deadline if context is not None else None
    observer = None
    if context is not None and context.metrics is not None:
        observer = context.metrics.observer(request, context.adapter_label, context.tenant)
    events = engine.stream(request)
    ended = False
    try:
        while True:
            try:
                event = await _next_event(events, deadline)
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                request.cancel()
                event = _timeout_event(context)
            if observer is not None:
                observer.see(event)
            ended = isinstance(event, (FinishEvent, ErrorEvent))
            if isinstance(event, ErrorEvent) and context is not None:
                context.outcome_status = ERROR_STATUS.get(event.error_type, 500)
            if isinstance(event, FinishEvent) and context is not None and context.gate is not None:
                context.gate.tenants.charge(context, event.generated_tokens)  # tokens per minute
            yield event
            if ended:
                return
    finally:
        if not ended and context is not None:
            context.outcome_status = ERROR_STATUS["cancelled"]  # the client left mid-stream
        await events.aclose()  # type: ignore[attr-defined]  # engine.stream: an async generator


async def _next_event(events: AsyncIterator[Event], deadline: float | None) -> Event:
    if deadline is None:
        return await anext(events)
    return await asyncio.wait_for(anext(events), timeout=max(deadline - time.perf_counter(), 0.0))


def _timeout_event(context: RequestContext | None) -> ErrorEvent:
    limit = f"{context.timeout:g} s " if context is not None and context.timeout is not None else ""
    return ErrorEvent(
        f"the request took longer than the server's request timeout {limit}(--request-timeout) and was "
        "cancelled; ask for fewer tokens (max_new_tokens / max_tokens) or retry when the server is less busy.",
        "timeout",
    )


def timing_headers(request: GenerationRequest) -> dict[str, str]:
    t = request.timings()
    return {
        "x-adapter-id": shown_adapter_id(request.adapter_id) or "",
        "x-queue-time": f"{t['queue_time']:.6f}",
        "x-inference-time": f"{t['inference_time']:.6f}",
        "x-time-to-first-token": f"{t['time_to_first_token']:.6f}",
    }
