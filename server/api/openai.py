"""OpenAI-compatible routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

``model`` names an adapter id, or the base model's name (``GET /v1/models`` lists both) for no
adapter; the base model's name wins if an adapter has the same id. Errors on these routes,
401/403/429 included, have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``
(``code`` is loraplex's ``error_type``), so the ``openai`` SDK raises its usual exceptions.

Differences from the loraplex routes: a matched stop sequence is *excluded* from the text (as
OpenAI does; streams hold back text that may begin one, see ``stop_holdback``), and
``finish_reason`` is ``"length"`` or ``"stop"`` (EOS or a stop sequence).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from adapters.registry import AdapterRepository
from server.api.deps import BaseDep, EngineDep, RegistryDep, StoreDep
from server.api.errors import HANDLED, ApiError, as_api_error
from server.api.generation import (
    ERROR_STATUS,
    build_request,
    run_to_completion,
    stream_events,
    timing_headers,
    tokenize,
)
from server.api.openai_schemas import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
)
from server.api.sse import sse, sse_response
from server.api.stop_holdback import StopHoldback
from server.engine.base_model import LoadedBase
from server.engine.engine import Engine
from server.engine.requests import ErrorEvent, FinishEvent, GenerationRequest, TokenEvent

_STARTED = int(time.time())
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
_PARAM_OF_CODE = {"model_not_found": "model", "adapter_not_found": "model"}


# --------------------------------------------------------------------------- errors


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {
        "error": {"message": message, "type": kind, "param": param or _PARAM_OF_CODE.get(code), "code": code}
    }


def openai_error(
    status: int, message: str, code: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    parts, param = [], None
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = param or (loc[0] if loc else None)
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    return openai_error(422, "invalid request: " + "; ".join(parts), "validation", param)


class OpenAIRoute(APIRoute):
    """An APIRoute whose errors (raised by its dependencies or its handler) take OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return _validation_error(exc)  # names the offending field in ``param``
            except HANDLED as exc:  # the API's one error table, in OpenAI's body
                error = as_api_error(exc)
                return openai_error(error.status_code, error.message, error.error_type, headers=error.headers)

        return route


router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)


# --------------------------------------------------------------------------- models


@router.get("/models")
async def list_models(engine: EngineDep, base: BaseDep, store: StoreDep) -> dict:
    """The base model and every stored adapter (``parent``: the base model)."""
    data = [_model_card(base.name, _STARTED, parent=None)]
    for record in store.records():
        if record.adapter_id != base.name:
            data.append(_model_card(record.adapter_id, _epoch(record.created_at), parent=base.name))
    return {"object": "list", "data": data}


def _model_card(model_id: str, created: int, parent: str | None) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "loraplex", "parent": parent}


def _epoch(iso: str) -> int:
    try:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return _STARTED


def resolve_model(model: str, base: LoadedBase, registry: AdapterRepository) -> str | None:
    """The adapter id ``model`` names (None: the base model); 404 in OpenAI's terms otherwise."""
    if model == base.name:
        return None
    if model in registry:
        return model
    raise ApiError(
        404,
        f"the model {model!r} does not exist on this server: use the base model's name {base.name!r} or an "
        "adapter id (GET /v1/models lists them; upload adapters with POST /adapters).",
        "model_not_found",
    )


# --------------------------------------------------------------------------- completions


@router.post("/completions")
async def completions(
    body: CompletionRequest, engine: EngineDep, base: BaseDep, registry: RegistryDep, http_request: Request
) -> Response:
    adapter_id = resolve_model(body.model, base, registry)
    prompt = body.single_prompt()
    prompt_ids = tokenize(engine, prompt) if isinstance(prompt, str) else _checked_ids(engine, prompt)
    max_tokens = body.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS
    request = build_request(engine, registry, prompt_ids, body.sampling(max_tokens), adapter_id)
    reply = _Reply(body.model, chat=False)
    if body.stream:
        return sse_response(reply.stream(engine, request, body.stops, body.include_usage), request)
    finish, _ = await run_to_completion(engine, request, http_request)
    return JSONResponse(reply.whole(finish), headers=timing_headers(request))


@router.post("/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest,
    engine: EngineDep,
    base: BaseDep,
    registry: RegistryDep,
    http_request: Request,
) -> Response:
    adapter_id = resolve_model(body.model, base, registry)
    prompt_ids = chat_prompt_ids(engine, [m.template_dict() for m in body.messages])
    max_tokens = body.token_limit or max(engine.config.max_total_tokens - len(prompt_ids), 1)
    request = build_request(engine, registry, prompt_ids, body.sampling(max_tokens), adapter_id)
    reply = _Reply(body.model, chat=True)
    if body.stream:
        return sse_response(reply.stream(engine, request, body.stops, body.include_usage), request)
    finish, _ = await run_to_completion(engine, request, http_request)
    return JSONResponse(reply.whole(finish), headers=timing_headers(request))


def chat_prompt_ids(engine: Engine, messages: list[dict[str, str]]) -> list[int]:
    """The tokenizer's chat template applied, with the assistant's turn opened."""
    tokenizer = engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(
            422,
            "the base model's tokenizer has no chat template; use POST /v1/completions with a prompt "
            "formatted for the model.",
            "validation",
        )
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # the template's own checks (e.g. roles must alternate)
        raise ApiError(422, f"the model's chat template refused these messages: {exc}", "validation") from exc
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _checked_ids(engine: Engine, ids: list[int]) -> list[int]:
    vocab = engine.runner.vocab_size
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise ApiError(422, f"prompt token id {bad} is outside the vocabulary [0, {vocab}).", "validation")
    return list(ids)


# --------------------------------------------------------------------------- responses


def openai_finish_reason(finish: FinishEvent) -> str:
    return "length" if finish.finish_reason == "length" else "stop"


def openai_text(finish: FinishEvent) -> str:
    """The output without the matched stop sequence (OpenAI's convention)."""
    if finish.stop_at is not None:
        return finish.generated_text[: finish.stop_at]
    return finish.generated_text


def usage(finish: FinishEvent) -> dict[str, int]:
    return {
        "prompt_tokens": finish.prompt_tokens,
        "completion_tokens": finish.generated_tokens,
        "total_tokens": finish.prompt_tokens + finish.generated_tokens,
    }


class _Reply:
    """Builds one response's bodies (whole, or as stream chunks) with a shared id and timestamp."""

    def __init__(self, model: str, *, chat: bool) -> None:
        self.model = model
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.whole_object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"

    def _envelope(self, obj: str, choices: list[dict], **extra: Any) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}  # fmt: skip

    def whole(self, finish: FinishEvent) -> dict:
        text, reason = openai_text(finish), openai_finish_reason(finish)
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return self._envelope(self.whole_object, [choice], usage=usage(finish))

    def chunk(self, text: str, finish_reason: str | None = None, *, first: bool = False) -> dict:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        if self.chat:  # the first chunk announces the role; later ones carry content only
            choice["delta"] = (
                {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            )
        else:
            choice["text"] = text
        return self._envelope(self.chunk_object, [choice])

    async def stream(
        self, engine: Engine, request: GenerationRequest, stops: list[str], include_usage: bool
    ) -> AsyncIterator[str]:
        """SSE: text chunks (stop sequences held back), a last chunk with ``finish_reason``, the
        usage chunk if asked for, ``[DONE]``. An error ends the stream as ``{"error": {...}}``."""
        holdback = StopHoldback(stops)
        if self.chat:
            yield sse(self.chunk("", first=True))
        async for event in stream_events(engine, request):
            if isinstance(event, TokenEvent):
                piece = holdback.push(event.text)
                if piece:
                    yield sse(self.chunk(piece))
            elif isinstance(event, FinishEvent):
                yield sse(self.chunk(holdback.finish(openai_text(event)), openai_finish_reason(event)))
                if include_usage:
                    yield sse(self._envelope(self.chunk_object, [], usage=usage(event)))
            elif isinstance(event, ErrorEvent):
                yield sse(
                    error_body(ERROR_STATUS.get(event.error_type, 500), event.message, event.error_type)
                )
        yield "data: [DONE]\n\n"
