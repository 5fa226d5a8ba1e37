"""A request while it is in the running batch: its sampler, detokenizer and progress."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from server.engine.detokenize import IncrementalDetokenizer
from server.engine.sampling import RowSampler
from server.engine.speculative import DraftLength, PromptLookup

if TYPE_CHECKING:
    from server.engine.grammar import RowGrammar
    from server.engine.requests import GenerationRequest, PromptScores


@dataclass
class Row:
    request: GenerationRequest
    slot: int  # adapter slot, BASE_SLOT for the bare base (or the merged adapter)
    sampler: RowSampler
    detokenizer: IncrementalDetokenizer
    seen: torch.Tensor  # [n] prompt + generated ids (for the repetition penalty)
    next_input: int = -1  # the token to feed at the next decode step
    generated_ids: list[int] = field(default_factory=list)  # what was streamed (recompute after preemption)
    tokens: list[dict[str, Any]] = field(default_factory=list)  # details, when asked for
    prefill_ids: list[int] = field(default_factory=list)  # what to put in the KV cache before decoding
    prefilled: int = 0  # how many of prefill_ids are in the KV cache (chunked prefill, a cached prefix)
    cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission (usage.cached_tokens)
    grammar: RowGrammar | None = None  # structured output: where the row is in its grammar
    lookup: PromptLookup | None = None  # speculative decoding: the row's tokens, n-gram indexed
    draft_length: DraftLength = field(default_factory=DraftLength)  # how many tokens it drafts next
    # the prompt's log-probabilities, from its first prefill (want_prompt_logprobs; a recomputed
    # row keeps them and is not scored again)
    prompt: PromptScores | None = None
    done: bool = False  # finished, failed or cancelled: the row leaves the batch in this step

    def finish(self) -> None:
        """Mark the row done (its last event is sent by the caller) and time the request's end."""
        self.done = True
        self.request.finished_at = time.perf_counter()

    @property
    def wants_prompt_scores(self) -> bool:
        """Prompt log-probabilities are computed at the first prefill only (not when recomputing)."""
        return self.request.want_prompt_logprobs and self.prompt is None

    @property
    def generated(self) -> int:
        return len(self.generated_ids)

    @property
    def seq_id(self) -> int:
        """The runner's name for this row's sequence."""
        return self.request.request_id
