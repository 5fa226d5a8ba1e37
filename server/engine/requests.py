"""A generation request as the engine sees it, and the events it streams back."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Literal

import torch

from adapters.peft_format import LoraAdapter
from server.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from server.engine.grammar import Grammar

FinishReason = Literal["length", "eos_token", "stop_sequence"]
_ids = itertools.count(1)


@dataclass(frozen=True)
class TopToken:
    """One of the most likely tokens at a position (``top_n_tokens``, ``top_logprobs``)."""

    id: int
    text: str
    logprob: float
    special: bool


@dataclass(frozen=True)
class PromptScores:
    """What the prefill tells of a prompt, for a request that asked (``want_prompt_logprobs``)."""

    logprobs: list[float]  # log p(prompt[j] | prompt[:j]) for j >= 1
    top_tokens: list[tuple[TopToken, ...]] | None = None  # the prompt_top_n most likely, when asked
    # [n - 1, V] full next-token log-probabilities, with want_prompt_distributions (the adapter probe)
    distributions: torch.Tensor | None = None


@dataclass(frozen=True)
class TokenEvent:
    id: int
    text: str
    logprob: float
    special: bool
    top_tokens: tuple[TopToken, ...] = ()  # the request's top_n_tokens most likely, when asked
    # on a request's first token, when it asked for its prompt's log-probabilities (a stream that
    # echoes the prompt sends them before the tokens)
    prompt: PromptScores | None = None


@dataclass(frozen=True)
class FinishEvent:
    generated_text: str  # includes a matched stop sequence, as TGI does
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    seed: int | None
    tokens: list[dict] = field(default_factory=list)
    stop_at: int | None = None  # where the matched stop sequence starts in generated_text
    # log p(prompt[j] | prompt[:j]) for j >= 1, when the request asked (want_prompt_logprobs)
    prompt_logprobs: list[float] | None = None
    # the prompt_top_n most likely tokens at each of those positions, when asked
    prompt_top_tokens: list[tuple[TopToken, ...]] | None = None
    # [n - 1, V] the full next-token log-probabilities at each prompt position, when asked
    prompt_distributions: torch.Tensor | None = None
    cached_tokens: int = 0  # prompt tokens whose K and V came from the prefix cache (not prefilled)


@dataclass(frozen=True)
class ErrorEvent:
    message: str
    error_type: str = "internal"


Event = TokenEvent | FinishEvent | ErrorEvent


@dataclass
class GenerationRequest:
    """What a client asked for, created by the HTTP layer. Once submitted, the engine reads it and
    writes only its timings; its progress (tokens, prompt scores, whether it is finished) is the
    engine's (``row.Row``) and reaches the client through events."""

    prompt_ids: list[int]
    params: SamplingParams
    adapter: LoraAdapter | None  # resolved at submission: a later replace does not affect it
    # factor on the adapter's update for this request (0: the base, 1: the adapter); rows apply it
    # to their adapter's slot (no slot of its own), the merged mode folds adapter.scaled(it)
    adapter_scale: float = 1.0
    want_details: bool = False
    want_prompt_logprobs: bool = False  # log-probabilities of the prompt's tokens (TGI's prefill details)
    top_n_tokens: int = 0  # report this many most likely tokens at each step (0: none)
    prompt_top_n: int = 0  # with want_prompt_logprobs: also this many most likely at each prompt position
    # with want_prompt_logprobs: keep the full next-token log-probabilities of every prompt position
    # as one tensor (prompt_distributions) instead of decoding top tokens (the adapter probe)
    want_prompt_distributions: bool = False
    grammar: Grammar | None = None  # structured output: the output must match it (one matcher per row)
    request_id: int = field(default_factory=lambda: next(_ids))
    # events flow from the engine thread to whoever waits (an asyncio queue, or a list in tests)
    sink: Callable[[Event], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    # timings (time.perf_counter seconds), set by the engine; a timing, never the engine's state
    submitted_at: float = field(default_factory=time.perf_counter)
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def adapter_id(self) -> str | None:
        return self.adapter.adapter_id if self.adapter else None

    @cached_property
    def served_adapter(self) -> LoraAdapter | None:
        """The update this request wants: the adapter scaled by ``adapter_scale`` (its own key when
        the scale is not 1, so a row at another scale is never served by the adapter's merged weights)."""
        if self.adapter is None or self.adapter_scale == 1.0:
            return self.adapter
        return self.adapter.scaled(self.adapter_scale)

    def cancel(self) -> None:
        """Called from any thread: the engine drops the row at the next step."""
        self.cancelled.set()

    def emit(self, event: Event) -> None:
        """Called from the engine thread: hand an event to whoever waits for this request."""
        if self.sink is not None:
            self.sink(event)

    def timings(self) -> dict[str, float]:
        start = self.admitted_at or self.submitted_at
        end = self.finished_at or time.perf_counter()
        return {
            "queue_time": start - self.submitted_at,
            "inference_time": end - start,
            "time_to_first_token": (self.first_token_at or end) - self.submitted_at,
        }
