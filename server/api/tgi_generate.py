"""One TGI/LoRAX-shaped generation: its engine requests, and the response bodies their clients parse.

Shared by ``POST /generate``, ``POST /generate_stream`` and TGI's ``POST /`` (see ``generate.py``).

    parameters ─► prompt ids (truncate: keep the last N) ─► best_of engine requests (seed + i)
               ─► run together (they batch) ─► best mean token log-probability wins
               ─► {"generated_text", "details": {..., prefill, tokens, top_tokens, best_of_sequences}}

Shapes follow the clients' models (``text_generation.types``, ``lorax.types``): ``prefill`` is
``[{id, text, logprob}]`` with a null first log-probability, ``tokens`` are
``[{id, text, logprob, special}]`` (plus ``alternative_tokens`` with LoRAX's
``return_k_alternatives``), ``top_tokens`` is one list per generated token (TGI's ``top_n_tokens``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from adapters.registry import AdapterLookup
from server.api.composition import Composition, ScopedCompositions, resolve_merged
from server.api.context import shown_adapter_id
from server.api.generation import build_request, run_many, stream_events, tokenize, tokenize_off_loop
from server.api.schemas import GenerateParameters
from server.api.structured import response_grammar
from server.engine.engine import Engine
from server.engine.grammar import Grammar
from server.engine.requests import ErrorEvent, FinishEvent, GenerationRequest, TokenEvent, TopToken


@dataclass
class TgiGeneration:
    """The engine requests of one TGI request (one per best_of candidate) and how to render them."""

    inputs: str
    params: GenerateParameters
    requests: list[GenerationRequest]
    prompt_ids: list[int]
    engine: Engine

    @classmethod
    async def prepare(
        cls,
        engine: Engine,
        registry: AdapterLookup,
        compositions: ScopedCompositions,
        inputs: str,
        params: GenerateParameters,
    ) -> TgiGeneration:
        """:meth:`build`, after the asynchronous work a request may need: composing its
        ``merged_adapters`` (cached) and compiling its ``response_format``, both off the event loop."""
        prompt_ids = await tokenize_off_loop(engine, inputs)
        composition = await resolve_merged(compositions, params.merged_adapters)
        grammar = await response_grammar(engine, params.response_format)
        return cls.build(engine, registry, inputs, params, composition, grammar, prompt_ids)

    @classmethod
    def build(
        cls,
        engine: Engine,
        registry: AdapterLookup,
        inputs: str,
        params: GenerateParameters,
        composition: Composition | None = None,
        grammar: Grammar | None = None,
        prompt_ids: list[int] | None = None,
    ) -> TgiGeneration:
        """``composition``: the resolved ``params.merged_adapters`` (``server.api.composition``);
        ``prompt_ids``: ``inputs`` already tokenized (:meth:`prepare` does it off the event loop)."""
        prompt_ids = tokenize(engine, inputs) if prompt_ids is None else prompt_ids
        if params.truncate is not None:
            prompt_ids = prompt_ids[-params.truncate :]
        max_new = params.max_new_tokens or max(engine.config.max_total_tokens - len(prompt_ids), 1)
        requests = []
        for candidate in range(params.candidates):
            request = build_request(
                engine,
                registry,
                prompt_ids,
                params.sampling(max_new, candidate),
                params.adapter_id,
                want_details=params.details or params.candidates > 1,  # best_of ranks by token logprobs
                composition=composition,
                adapter_scale=params.adapter_scale,
                grammar=grammar,
            )
            request.want_prompt_logprobs = bool(params.decoder_input_details) and candidate == 0
            request.top_n_tokens = params.top_n
            requests.append(request)
        return cls(inputs, params, requests, prompt_ids, engine)

    @property
    def first(self) -> GenerationRequest:
        return self.requests[0]

    # ------------------------------------------------------------------ whole responses

    async def run(self, http_request: Request) -> tuple[dict[str, Any], GenerationRequest]:
        """Run every candidate; the response body and the winning request (for its timings)."""
        finishes = await run_many(self.engine, self.requests, http_request)
        prefill = self.prefill(finishes[0])
        best = max(range(len(finishes)), key=lambda i: _mean_logprob(finishes[i]))
        details = self.details(self.requests[best], finishes[best], prefill)
        if len(finishes) > 1 and self.params.details:
            details["best_of_sequences"] = [
                self._best_of_sequence(finishes[i], prefill) for i in range(len(finishes)) if i != best
            ]
        body = {"generated_text": self.text(finishes[best].generated_text), "details": details}
        return body, self.requests[best]

    def text(self, generated: str) -> str:
        return self.inputs + generated if self.params.return_full_text else generated

    def details(self, request: GenerationRequest, finish: FinishEvent, prefill: list[dict]) -> dict[str, Any]:
        details: dict[str, Any] = {
            "finish_reason": finish.finish_reason,
            "prompt_tokens": finish.prompt_tokens,
            "cached_tokens": finish.cached_tokens,  # loraplex's: the prompt's cached prefix (--prefix-cache)
            "generated_tokens": finish.generated_tokens,
            "seed": finish.seed,
            "adapter_id": shown_adapter_id(request.adapter_id),  # a tenant's own 'bot', not 'acme~bot'
            "prefill": prefill,
            "tokens": self.tokens(finish) if self.params.details else [],
        }
        if self.params.details and self.params.top_n_tokens:
            details["top_tokens"] = [self.top_tokens(t["top_tokens"]) for t in finish.tokens]
        return details

    def _best_of_sequence(self, finish: FinishEvent, prefill: list[dict]) -> dict[str, Any]:
        sequence: dict[str, Any] = {
            "generated_text": self.text(finish.generated_text),
            "finish_reason": finish.finish_reason,
            "generated_tokens": finish.generated_tokens,
            "seed": finish.seed,
            "prefill": prefill,
            "tokens": self.tokens(finish),
        }
        if self.params.top_n_tokens:
            sequence["top_tokens"] = [self.top_tokens(t["top_tokens"]) for t in finish.tokens]
        return sequence

    def prefill(self, finish: FinishEvent) -> list[dict[str, Any]]:
        """The prompt's tokens with log p(token | before); the first has none (null), as in TGI."""
        if not self.params.decoder_input_details:
            return []
        logprobs = [None, *(finish.prompt_logprobs or [])]
        decode = self.engine.tokenizer.decode
        return [
            {"id": token, "text": decode([token]), "logprob": logprobs[i] if i < len(logprobs) else None}
            for i, token in enumerate(self.prompt_ids)
        ]

    def tokens(self, finish: FinishEvent) -> list[dict[str, Any]]:
        return [
            self.token(t["id"], t["text"], t["logprob"], t["special"], t["top_tokens"]) for t in finish.tokens
        ]

    def token(
        self, id: int, text: str, logprob: float, special: bool, top: tuple[TopToken, ...]
    ) -> dict[str, Any]:
        token: dict[str, Any] = {"id": id, "text": text, "logprob": logprob, "special": special}
        if self.params.return_k_alternatives:
            token["alternative_tokens"] = [
                {"id": t.id, "text": t.text, "logprob": t.logprob}
                for t in top[: self.params.return_k_alternatives]
            ]
        return token

    def top_tokens(self, top: tuple[TopToken, ...]) -> list[dict[str, Any]]:
        n = self.params.top_n_tokens or 0
        return [{"id": t.id, "text": t.text, "logprob": t.logprob, "special": t.special} for t in top[:n]]

    # ------------------------------------------------------------------ streams

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Stream payloads, one per token; the last carries ``generated_text`` and ``details``.

        One event is held back so the last token's event can carry the details. An error ends
        the stream with ``{"error", "error_type"}`` (what TGI sends).
        """
        request = self.first
        pending: TokenEvent | None = None
        async for event in stream_events(self.engine, request):
            if isinstance(event, TokenEvent):
                if pending is not None:
                    yield self._stream_payload(pending)
                pending = event
            elif isinstance(event, FinishEvent):
                last = pending or TokenEvent(id=-1, text="", logprob=0.0, special=True)
                yield self._stream_payload(
                    last,
                    generated_text=self.text(event.generated_text),
                    details=self.details(request, event, self.prefill(event)),
                )
            elif isinstance(event, ErrorEvent):
                yield {"error": event.message, "error_type": event.error_type}

    def _stream_payload(
        self, event: TokenEvent, generated_text: str | None = None, details: dict | None = None
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "token": self.token(event.id, event.text, event.logprob, event.special, event.top_tokens),
            "generated_text": generated_text,
            "details": details,
        }
        if self.params.top_n_tokens:
            payload["top_tokens"] = self.top_tokens(event.top_tokens)
        return payload


def _mean_logprob(finish: FinishEvent) -> float:
    """TGI's best_of criterion: the mean log-probability of the generated tokens."""
    values = [t["logprob"] for t in finish.tokens]
    return sum(values) / len(values) if values else float("-inf")
