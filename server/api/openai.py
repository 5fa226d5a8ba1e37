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

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from adapters.registry import AdapterRepository
from server import __version__
from server.api.deps import BaseDep, EngineDep, RegistryDep, StoreDep
from server.api.errors import HANDLED, ApiError, as_api_error
from server.api.generation import (
    ERROR_STATUS,
    build_request,
    check_prompt_chars,
    run_many,
    stream_events,
    timing_headers,
    tokenize_off_loop,
)
from server.api.openai_logprobs import CompletionLogprobs, chat_entry, chat_logprobs
from server.api.openai_schemas import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    _OpenAIRequest,
)
from server.api.openai_tools import (
    ToolPlan,
    ToolStream,
    tool_grammar,
    tool_messages,
    tool_plan,
    whole_message,
)
from server.api.openapi_errors import OpenAIErrorResponse, error_responses
from server.api.sse import sse, sse_response
from server.api.stop_holdback import StopHoldback
from server.api.structured import response_grammar
from server.engine.base_model import LoadedBase
from server.engine.engine import Engine
from server.engine.grammar import Grammar
from server.engine.requests import ErrorEvent, FinishEvent, GenerationRequest, PromptScores, TokenEvent

_STARTED = int(time.time())
TGI_PLACEHOLDER_MODEL = "tgi"  # the model TGI's clients name; the base model unless an adapter has that id
SYSTEM_FINGERPRINT = f"loraplex-{__version__}"
_OPENAI_ERRORS = (400, 401, 404, 422, 424, 429, 503, 504)
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
_PARAM_OF_CODE = {
    "model_not_found": "model",
    "adapter_not_found": "model",
    "invalid_schema": "response_format",
}


# --------------------------------------------------------------------------- errors


class OpenAIError(ApiError):
    """An error only the OpenAI routes raise, naming the request field at fault (``param``)."""

    def __init__(self, status_code: int, message: str, code: str, param: str) -> None:
        super().__init__(status_code, message, code)
        self.param = param


def check_context(engine: Engine, prompt_tokens: int, max_tokens: int, param: str) -> None:
    """OpenAI's 400 ``context_length_exceeded`` (``param``: ``prompt``/``messages``) before the engine's own checks."""
    cfg = engine.config
    if prompt_tokens > cfg.max_input_tokens:
        raise OpenAIError(
            400,
            f"This model's maximum input length is {cfg.max_input_tokens} tokens (--max-input-tokens); however "
            f"your {param} has {prompt_tokens} tokens. Please shorten the {param}.",
            "context_length_exceeded",
            param,
        )
    if prompt_tokens + max_tokens > cfg.max_total_tokens:
        raise OpenAIError(
            400,
            f"This model's maximum context length is {cfg.max_total_tokens} tokens (--max-total-tokens); however "
            f"you requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {param}, {max_tokens} in "
            f"the completion). Please reduce the length of the {param}, or max_tokens to at most "
            f"{max(cfg.max_total_tokens - prompt_tokens, 0)}.",
            "context_length_exceeded",
            param,
        )


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
                return openai_error(error.status_code, error.message, error.error_type,
                                    getattr(error, "param", None), headers=error.headers)  # fmt: skip

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
    if model == TGI_PLACEHOLDER_MODEL:  # TGI's chat client always sends it
        return None
    raise ApiError(
        404,
        f"the model {model!r} does not exist on this server: use the base model's name {base.name!r} or an "
        "adapter id (GET /v1/models lists them; upload adapters with POST /adapters).",
        "model_not_found",
    )


# --------------------------------------------------------------------------- completions


@router.post("/completions", responses=error_responses(*_OPENAI_ERRORS, model=OpenAIErrorResponse))
async def completions(
    body: CompletionRequest, engine: EngineDep, base: BaseDep, registry: RegistryDep, http_request: Request
) -> Response:
    adapter_id = resolve_model(body.model, base, registry)
    prompts = [await _completion_prompt(engine, prompt) for prompt in body.prompts()]
    score_only = body.max_tokens == 0  # echo the prompt's log-probabilities, generate nothing
    # one token is generated and dropped when scoring (the engine's rows always decode one)
    max_tokens = 1 if score_only else body.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS
    for prompt in prompts:  # (scoring counts the one token decoded: the engine needs room for it)
        check_context(engine, len(prompt.ids), max_tokens, "prompt")
    wants = _Wants(logprobs=body.logprobs is not None, top=body.logprobs or 0, echo=bool(body.echo),
                   generate=not score_only)  # fmt: skip
    grammar = await response_grammar(engine, body.response_format)
    requests = [  # index = prompt x n + choice, OpenAI's order: all rows decode in one batch
        request
        for prompt in prompts
        for request in _requests(engine, registry, body, prompt.ids, max_tokens, adapter_id, wants, grammar)
    ]
    reply = _Reply(body.model, False, engine, wants, prompts, body.choices)
    return await _answer(reply, body, engine, requests, http_request)


@dataclass(frozen=True)
class _Prompt:
    ids: list[int]
    text: str  # what ``echo`` prepends to the completion


async def _completion_prompt(engine: Engine, prompt: str | list[int]) -> _Prompt:
    if isinstance(prompt, str):  # capped in characters, tokenized off the event loop
        return _Prompt(await tokenize_off_loop(engine, prompt), prompt)
    ids = _checked_ids(engine, prompt)
    return _Prompt(ids, engine.tokenizer.decode(ids))


@router.post("/chat/completions", responses=error_responses(*_OPENAI_ERRORS, model=OpenAIErrorResponse))
async def chat_completions(
    body: ChatCompletionRequest,
    engine: EngineDep,
    base: BaseDep,
    registry: RegistryDep,
    http_request: Request,
) -> Response:
    chat = await prepare_chat(body, engine, base, registry)
    # TGI's chat client (which names the model "tgi") requires the role in every delta
    reply = _Reply(body.model, True, engine, chat.wants, [_Prompt(chat.prompt_ids, "")], body.choices,
                   role_in_every_delta=body.model == TGI_PLACEHOLDER_MODEL, tools=chat.plan is not None)  # fmt: skip
    return await _answer(reply, body, engine, chat.requests, http_request)


@dataclass(frozen=True)
class PreparedChat:
    """A chat request ready to run: its engine requests (one per choice) and what shapes the reply."""

    requests: list[GenerationRequest]
    prompt_ids: list[int]
    plan: ToolPlan | None  # the reply may hold tool calls
    wants: _Wants


async def prepare_chat(
    body: ChatCompletionRequest, engine: Engine, base: LoadedBase, registry: AdapterRepository
) -> PreparedChat:
    """The prompt (chat template, tools), the grammar (tools or response_format) and the engine
    requests; shared by /v1/chat/completions and /v1/responses (``server.api.responses``)."""
    adapter_id = resolve_model(body.model, base, registry)
    plan = tool_plan(body.tools, body.tool_choice, body.parallel_tool_calls)
    if plan is not None and body.response_format is not None and body.response_format.type != "text":
        raise OpenAIError(422, "response_format and tools cannot constrain the same reply: send tool_choice "
                          '"none" with response_format, or leave response_format out.', "validation", "tools")  # fmt: skip
    tokenizer = engine.tokenizer
    template = getattr(tokenizer, "chat_template", None)
    messages, template_args = tool_messages([m.template_dict() for m in body.messages], plan, template)
    check_prompt_chars(engine, sum(len(str(v)) for m in messages for v in m.values()), "the messages")
    # the template and the tokenizer run in a worker thread: a long chat never stalls the event loop
    prompt_ids = await asyncio.to_thread(chat_prompt_ids, engine, messages, **template_args)
    max_tokens = body.token_limit or max(engine.config.max_total_tokens - len(prompt_ids), 1)
    check_context(engine, len(prompt_ids), max_tokens, "messages")
    wants = _Wants(logprobs=body.wants_logprobs, top=body.top_logprobs or 0)
    if plan is not None:
        grammar = await tool_grammar(engine, plan)
    else:
        grammar = await response_grammar(engine, body.response_format)
    requests = _requests(engine, registry, body, prompt_ids, max_tokens, adapter_id, wants, grammar)
    return PreparedChat(requests, prompt_ids, plan, wants)


@dataclass(frozen=True)
class _Wants:
    """What a reply carries besides the text: log-probabilities (top N), the prompt (echo); with
    ``generate`` False (``max_tokens: 0``) the prompt's log-probabilities only."""

    logprobs: bool = False
    top: int = 0
    echo: bool = False
    generate: bool = True


def _requests(
    engine: Engine,
    registry: RegistryDep,
    body: _OpenAIRequest,
    prompt_ids: list[int],
    max_tokens: int,
    adapter_id: str | None,
    wants: _Wants,
    grammar: Grammar | None,
) -> list[GenerationRequest]:
    """One engine request per choice (``n``); choice i samples with seed + i (each has its own grammar state)."""
    requests = []
    for choice in range(body.choices):
        request = build_request(
            engine,
            registry,
            prompt_ids,
            body.sampling(max_tokens, choice),
            adapter_id,
            want_details=wants.logprobs,
            adapter_scale=body.adapter_scale,
            grammar=grammar,
        )
        request.top_n_tokens = wants.top
        request.want_prompt_logprobs = wants.echo and wants.logprobs
        request.prompt_top_n = wants.top if request.want_prompt_logprobs else 0
        requests.append(request)
    return requests


async def _answer(
    reply: _Reply,
    body: _OpenAIRequest,
    engine: Engine,
    requests: list[GenerationRequest],
    http_request: Request,
) -> Response:
    if body.stream:
        return sse_response(reply.stream(engine, requests, body.stops, body.include_usage), requests[0])
    finishes = await run_many(engine, requests, http_request)
    return JSONResponse(reply.whole(finishes), headers=timing_headers(requests[0]))


def chat_prompt_ids(engine: Engine, messages: list[dict[str, Any]], **template_args: Any) -> list[int]:
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
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, **template_args
        )
    except Exception as exc:  # the template's own checks (e.g. roles must alternate)
        raise ApiError(422, f"the model's chat template refused these messages: {exc}", "validation") from exc
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _checked_ids(engine: Engine, ids: list[int]) -> list[int]:
    vocab = engine.describe().runner.vocab_size
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


def usage(finishes: list[FinishEvent], n: int = 1, generate: bool = True) -> dict[str, Any]:
    """Each prompt counts once (``finishes`` in index order, ``n`` per prompt); every choice's tokens count.
    ``prompt_tokens_details.cached_tokens``: the prompt tokens whose K and V came from the prefix
    cache (``--prefix-cache``), as OpenAI reports its prompt caching."""
    prompt = sum(f.prompt_tokens for f in finishes[::n])
    cached = sum(f.cached_tokens for f in finishes[::n])
    completion = sum(f.generated_tokens for f in finishes) if generate else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


class _Reply:
    """Builds one response's bodies (whole, or as stream chunks) with a shared id and timestamp."""

    def __init__(self, model: str, chat: bool, engine: Engine, wants: _Wants, prompts: list[_Prompt], n: int,
                 *, role_in_every_delta: bool = False, tools: bool = False) -> None:  # fmt: skip
        self.model = model
        self.chat = chat
        self.wants = wants
        self.prompts = prompts
        self.n = n  # choices per prompt: choice ``index`` answers prompts[index // n]
        self.role_in_every_delta = role_in_every_delta
        self.tools = tools  # chat: the reply may hold tool calls (server.api.openai_tools)
        self.decode = engine.tokenizer.decode
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.whole_object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"

    def _envelope(self, obj: str, choices: list[dict], **extra: Any) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices, **extra}  # fmt: skip

    def _text(self, finish: FinishEvent) -> str:
        return openai_text(finish) if self.wants.generate else ""

    def _finish_reason(self, finish: FinishEvent) -> str:
        return openai_finish_reason(finish) if self.wants.generate else "length"

    def _usage(self, finishes: list[FinishEvent]) -> dict[str, Any]:
        return usage(finishes, self.n, self.wants.generate)

    def whole(self, finishes: list[FinishEvent]) -> dict:
        choices = []
        for index, finish in enumerate(finishes):
            text, prompt = self._text(finish), self.prompts[index // self.n]
            choice: dict[str, Any] = {"index": index, "logprobs": self._logprobs(finish, prompt),
                                      "finish_reason": self._finish_reason(finish)}  # fmt: skip
            if self.chat and self.tools:
                choice["message"], choice["finish_reason"] = whole_message(text, choice["finish_reason"])
            elif self.chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = prompt.text + text if self.wants.echo else text
            choices.append(choice)
        return self._envelope(self.whole_object, choices, usage=self._usage(finishes))

    def _logprobs(self, finish: FinishEvent, prompt: _Prompt) -> dict | None:
        if not self.wants.logprobs:
            return None
        if self.chat:
            return chat_logprobs(
                [chat_entry(t["id"], t["logprob"], t["top_tokens"], self.decode) for t in finish.tokens]
            )
        logprobs = CompletionLogprobs(self.decode)
        if self.wants.echo:
            logprobs.add_prompt(prompt.ids, finish.prompt_logprobs, finish.prompt_top_tokens)
        for t in finish.tokens if self.wants.generate else ():
            logprobs.add(t["id"], t["logprob"], t["top_tokens"])
        return logprobs.take()

    def chunk(self, index: int, text: str, finish_reason: str | None = None, logprobs: dict | None = None,
              *, first: bool = False, delta: dict | None = None) -> dict:  # fmt: skip
        """One chunk; ``delta`` (chat) replaces the text's delta (tool-call deltas)."""
        choice: dict[str, Any] = {"index": index, "logprobs": logprobs, "finish_reason": finish_reason}
        if self.chat and delta is not None:
            choice["delta"] = delta
        elif self.chat and self.role_in_every_delta:  # TGI's shape: its client requires the role in each
            choice["delta"] = {
                "role": "assistant",
                "content": text if (text or first) else None,
                "tool_calls": None,
            }
        elif self.chat:  # OpenAI's: the role in the first delta only (clients join the deltas' fields)
            choice["delta"] = (
                {"role": "assistant", "content": ""} if first else {"content": text} if text else {}
            )
        else:
            choice["text"] = text
        return self._envelope(self.chunk_object, [choice])

    async def stream(
        self, engine: Engine, requests: list[GenerationRequest], stops: list[str], include_usage: bool
    ) -> AsyncIterator[str]:
        """SSE: each choice's chunks (interleaved when n > 1), the usage chunk if asked for, ``[DONE]``."""
        finishes: dict[int, FinishEvent] = {}  # by choice index
        choices = [self._stream_choice(i, engine, r, stops, finishes) for i, r in enumerate(requests)]
        async for chunk in _merge(choices):
            yield chunk
        if include_usage and len(finishes) == len(requests):
            in_order = [finishes[i] for i in range(len(requests))]
            yield sse(self._envelope(self.chunk_object, [], usage=self._usage(in_order)))
        yield "data: [DONE]\n\n"

    async def _stream_choice(
        self,
        index: int,
        engine: Engine,
        request: GenerationRequest,
        stops: list[str],
        finishes: dict[int, FinishEvent],
    ) -> AsyncIterator[str]:
        """One choice: text chunks (stop sequences held back), a last chunk with ``finish_reason``.

        With logprobs, every token gives a chunk (its text may be empty while held back) carrying
        that token's log-probabilities. An error ends the stream as ``{"error": {...}}``.
        """
        holdback = StopHoldback(stops)
        tools = ToolStream() if self.tools else None  # the reply may hold tool calls
        prompt = self.prompts[index // self.n]
        completion = CompletionLogprobs(self.decode, len(prompt.text) if self.wants.echo else 0)
        if self.chat:
            yield sse(self.chunk(index, "", first=True))
        echo = self.wants.echo and not self.chat
        async for event in stream_events(engine, request):
            if echo:  # the prompt first; its log-probabilities come with the first token
                echo = False
                scores = event.prompt if isinstance(event, TokenEvent) else None
                yield sse(self.chunk(index, prompt.text, logprobs=self._prompt_logprobs(scores, prompt)))
            if isinstance(event, TokenEvent) and not self.wants.generate:
                continue  # scoring only (max_tokens 0): the one token decoded is not part of the reply
            if isinstance(event, TokenEvent) and tools is not None:
                logprobs = self._chat_token_logprobs(event)
                deltas = tools.push(holdback.push(event.text)) or ([{}] if logprobs else [])
                for k, delta in enumerate(deltas):  # the token's log-probabilities ride on its first delta
                    yield sse(self.chunk(index, "", logprobs=logprobs if k == 0 else None, delta=delta))
            elif isinstance(event, TokenEvent):
                piece = holdback.push(event.text)
                if self.wants.logprobs:
                    if self.chat:
                        logprobs = chat_logprobs(
                            [chat_entry(event.id, event.logprob, event.top_tokens, self.decode)]
                        )
                    else:
                        completion.add(event.id, event.logprob, event.top_tokens)
                        logprobs = completion.take()
                    yield sse(self.chunk(index, piece, logprobs=logprobs))
                elif piece:
                    yield sse(self.chunk(index, piece))
            elif isinstance(event, FinishEvent) and tools is not None:
                finishes[index] = event
                for delta in tools.push(holdback.finish(self._text(event)), final=True):
                    yield sse(self.chunk(index, "", delta=delta))
                reason = self._finish_reason(event)
                yield sse(self.chunk(index, "", "tool_calls" if tools.called and reason != "length" else reason,
                                     delta={}))  # fmt: skip
            elif isinstance(event, FinishEvent):
                finishes[index] = event
                yield sse(self.chunk(index, holdback.finish(self._text(event)), self._finish_reason(event)))
            elif isinstance(event, ErrorEvent):
                yield sse(
                    error_body(ERROR_STATUS.get(event.error_type, 500), event.message, event.error_type)
                )

    def _chat_token_logprobs(self, event: TokenEvent) -> dict | None:
        if not self.wants.logprobs:
            return None
        return chat_logprobs([chat_entry(event.id, event.logprob, event.top_tokens, self.decode)])

    def _prompt_logprobs(self, scores: PromptScores | None, prompt: _Prompt) -> dict | None:
        if not self.wants.logprobs:
            return None
        logprobs = CompletionLogprobs(self.decode)
        logprobs.add_prompt(
            prompt.ids, scores.logprobs if scores else None, scores.top_tokens if scores else None
        )
        return logprobs.take()


async def _merge(streams: list[AsyncIterator[str]]) -> AsyncIterator[str]:
    """Items of several async iterators as they come (n > 1 choices stream together)."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield item
        return
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    async def pump(stream: AsyncIterator[str]) -> None:
        try:
            async for item in stream:
                await queue.put(item)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
