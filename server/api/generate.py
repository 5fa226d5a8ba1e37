"""POST /generate and POST /generate_stream (the TGI/LoRAX shapes)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.api.deps import EngineDep, RegistryDep
from server.api.generation import build_request, run_to_completion, stream_events, timing_headers, tokenize
from server.api.schemas import Details, GenerateRequest, GenerateResponse, StreamResponse, Token
from server.api.sse import sse, sse_response
from server.engine.requests import ErrorEvent, FinishEvent, GenerationRequest, TokenEvent

router = APIRouter(tags=["generate"])


def _details(request: GenerationRequest, finish: FinishEvent) -> Details:
    return Details(
        finish_reason=finish.finish_reason,
        prompt_tokens=finish.prompt_tokens,
        generated_tokens=finish.generated_tokens,
        seed=finish.seed,
        adapter_id=request.adapter_id,
        tokens=[Token(**t) for t in finish.tokens] if request.want_details else None,
    )


@router.post("/generate", response_model=GenerateResponse)
async def generate(body: GenerateRequest, engine: EngineDep, registry: RegistryDep, http_request: Request):
    p = body.parameters
    request = build_request(
        engine, registry, tokenize(engine, body.inputs), p.sampling(), p.adapter_id, p.details
    )
    finish, _ = await run_to_completion(engine, request, http_request)
    response = GenerateResponse(generated_text=finish.generated_text, details=_details(request, finish))
    payload = response.model_dump()
    if payload["details"]["tokens"] is None:
        del payload["details"]["tokens"]  # present only when asked for; seed stays, null or not
    return JSONResponse(payload, headers=timing_headers(request))


@router.post("/generate_stream")
async def generate_stream(
    body: GenerateRequest, engine: EngineDep, registry: RegistryDep
) -> StreamingResponse:
    """Server-sent events, one per token; the last one carries ``generated_text`` and ``details``."""
    p = body.parameters
    request = build_request(
        engine, registry, tokenize(engine, body.inputs), p.sampling(), p.adapter_id, p.details
    )

    async def events() -> AsyncIterator[str]:
        pending: TokenEvent | None = None  # held back one event so the last token carries the details
        async for event in stream_events(engine, request):
            if isinstance(event, TokenEvent):
                if pending is not None:
                    yield sse(StreamResponse(token=_token(pending)).model_dump())
                pending = event
            elif isinstance(event, FinishEvent):
                last = pending or TokenEvent(id=-1, text="", logprob=0.0, special=True)
                final = StreamResponse(
                    token=_token(last), generated_text=event.generated_text, details=_details(request, event)
                )
                yield sse(final.model_dump(exclude_none=False))
            elif isinstance(event, ErrorEvent):
                yield sse({"error": event.message, "error_type": event.error_type})

    return sse_response(events(), request)


def _token(event: TokenEvent) -> Token:
    return Token(id=event.id, text=event.text, logprob=event.logprob, special=event.special)
