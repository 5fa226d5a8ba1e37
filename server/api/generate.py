"""POST /generate, POST /generate_stream and TGI's POST / (the TGI/LoRAX shapes).

``POST /`` is TGI's compatibility route, the one the ``text-generation`` and ``lorax-client``
packages call: with ``"stream": true`` it streams the events of ``/generate_stream``, otherwise
it answers a JSON list holding ``/generate``'s response object.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from server.api.composition import CompositionsDep
from server.api.deps import EngineDep, RegistryDep
from server.api.generation import timing_headers
from server.api.openapi_errors import error_responses
from server.api.schemas import GenerateRequest, GenerateResponse, GenerateStreamRequest, StreamResponse
from server.api.sse import sse, sse_response
from server.api.tgi_generate import TgiGeneration

router = APIRouter(tags=["generate"])

# 400/409: parameters.adapter_source the server cannot honour (server.api.adapter_sources)
_GENERATION_ERRORS = error_responses(400, 401, 404, 409, 422, 424, 429, 503, 504)
_SSE = {
    "text/event-stream": {
        "schema": StreamResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    }
}


@router.post("/generate", response_model=GenerateResponse, responses=_GENERATION_ERRORS)
async def generate(
    body: GenerateRequest,
    engine: EngineDep,
    registry: RegistryDep,
    compositions: CompositionsDep,
    http_request: Request,
):
    """Generate text; ``details`` always has the summary, ``tokens``/``prefill`` when asked for."""
    generation = await TgiGeneration.prepare(engine, registry, compositions, body.inputs, body.params)
    payload, best = await generation.run(http_request)
    return JSONResponse(payload, headers=timing_headers(best))


@router.post(
    "/generate_stream",
    response_class=StreamingResponse,
    responses={
        200: {"description": "Server-sent events, one per token", "content": _SSE},
        **_GENERATION_ERRORS,
    },
)
async def generate_stream(
    body: GenerateStreamRequest, engine: EngineDep, registry: RegistryDep, compositions: CompositionsDep
) -> StreamingResponse:
    """Server-sent events, one per token; the last one carries ``generated_text`` and ``details``."""
    return _stream(await TgiGeneration.prepare(engine, registry, compositions, body.inputs, body.params))


@router.post(
    "/",
    responses={
        200: {
            "description": "`stream` false: a list holding one response object; `stream` true: server-sent "
            "events as /generate_stream's",
            "content": {
                "application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/GenerateResponse"},
                                                "minItems": 1, "maxItems": 1}},
                **_SSE,
            },
        },
        **_GENERATION_ERRORS,
    },
)  # fmt: skip
async def tgi_compat(
    body: Annotated[GenerateRequest, Body()],
    engine: EngineDep,
    registry: RegistryDep,
    compositions: CompositionsDep,
    http_request: Request,
) -> Any:
    """TGI's compatibility route: dispatches on ``stream``."""
    if body.stream:
        try:  # a stream carries one sequence: best_of > 1 is a 422, as in TGI
            stream_body = GenerateStreamRequest.model_validate(body.model_dump())
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from exc
        return _stream(
            await TgiGeneration.prepare(
                engine, registry, compositions, stream_body.inputs, stream_body.params
            )
        )
    generation = await TgiGeneration.prepare(engine, registry, compositions, body.inputs, body.params)
    payload, best = await generation.run(http_request)
    return JSONResponse([payload], headers=timing_headers(best))


def _stream(generation: TgiGeneration) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        async for payload in generation.events():
            yield sse(payload)

    return sse_response(events(), generation.first)
