"""Structured output at the HTTP edge: a request's ``response_format`` compiled into a grammar.

    LoRAX   parameters.response_format {"type": "json_object", "schema": S}   -> JSON valid against S
    OpenAI  response_format {"type": "json_schema", "json_schema": {"schema": S}} -> JSON valid against S
            response_format {"type": "json_object"}                        -> any JSON object
            response_format {"type": "text"} or null                       -> free text (no grammar)

A schema missing or null means any JSON object. The grammar is compiled once per request, off
the event loop (the first one also builds the tokenizer's byte table, about a second), then each
engine request (best_of candidate, choice) gets its own grammar state. A schema the grammar
engine refuses is a 422 ``validation`` (what the TGI and LoRAX clients raise as ValidationError)
carrying the engine's message.
"""

from __future__ import annotations

from typing import Any, Protocol

from starlette.concurrency import run_in_threadpool

from adapters.torch_threads import confined
from server.api.errors import ApiError
from server.engine.engine import Engine
from server.engine.grammar import Grammar, GrammarError


class ResponseFormatLike(Protocol):
    type: str

    def output_schema(self) -> dict[str, Any] | None: ...


async def response_grammar(engine: Engine, response_format: ResponseFormatLike | None) -> Grammar | None:
    """The grammar the output must follow; None for free text."""
    if response_format is None or response_format.type == "text":
        return None
    schema = response_format.output_schema()
    try:
        return await run_in_threadpool(confined(engine.grammars.compile_json_schema), schema)
    except GrammarError as exc:
        raise ApiError(422, f"response_format: {exc}", "validation") from exc
