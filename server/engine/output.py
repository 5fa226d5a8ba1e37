"""The engine's output stage: from a step's logits to tokens, events and finished rows.

For every row of a step it chooses the next token (``sampling.py``, with the row's grammar mask),
builds one :class:`TokenRecord` per emitted token, streams it, and checks the stop conditions (EOS,
stop sequences, ``max_new_tokens``). A verify row (speculative decoding) has logits for its last
token and each draft: the positions are taken in order, each choosing exactly as a plain decode
step would (penalties over the tokens chosen so far, the grammar state advanced by them), and the
row goes on to the next position only while the chosen token equals the draft there. So the
tokens, their log-probabilities, top-n alternatives and events are those of plain decoding, and a
row that finishes mid-way stops there (the later positions are never emitted).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from server.engine.detokenize import find_stop
from server.engine.grammar import GrammarCompiler
from server.engine.requests import ErrorEvent, FinishEvent, TokenEvent, TopToken
from server.engine.row import Row
from server.engine.sampling import choose_next_tokens


@dataclass(frozen=True)
class TokenRecord:
    """One emitted token: what is streamed (``TokenEvent``) and kept for ``details``."""

    id: int
    text: str
    logprob: float
    special: bool
    top_tokens: tuple[TopToken, ...]


class OutputStage:
    """Sampling, stop checks and events for the engine's rows. Engine thread only."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: frozenset[int],
        special_ids: frozenset[int],
        grammars: GrammarCompiler,
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.special_ids = special_ids
        self.grammars = grammars

    def advance(
        self,
        rows: Sequence[Row],
        logits: torch.Tensor,
        first: Sequence[int] | None = None,
        drafts: Sequence[Sequence[int]] | None = None,
    ) -> list[int]:
        """Emit each row's next tokens; returns how many of its drafts each row accepted.

        logits: [M, V]; row i's positions start at ``first[i]`` (default: row i's one position is
        logits[i]); ``drafts[i]``: the tokens row i's verify row proposed after its last token
        (logits at first[i] .. first[i] + len(drafts[i])).
        """
        starts = list(first) if first is not None else list(range(len(rows)))
        proposed = drafts if drafts is not None else [()] * len(rows)
        accepted = [0] * len(rows)
        live = list(range(len(rows)))
        position = 0
        while live:
            batch = _rows(logits, [starts[i] + position for i in live])  # [b, V]
            step_drafts = [proposed[i][position] if position < len(proposed[i]) else None for i in live]
            subset = [rows[i] for i in live]
            tokens, logprobs, top = choose_next_tokens(
                batch,
                [r.sampler for r in subset],
                [r.seen for r in subset],
                generated=[r.generated_ids for r in subset],
                top_n=[r.request.top_n_tokens for r in subset],
                mask=self.grammars.mask([r.grammar for r in subset], batch.shape[-1]),
                drafts=step_drafts if any(d is not None for d in step_drafts) else None,
            )
            still: list[int] = []
            for k, (token, logprob, best) in enumerate(
                zip(tokens.tolist(), logprobs.tolist(), top, strict=True)
            ):
                i = live[k]
                if not self.emit(rows[i], token, logprob, best):
                    continue  # finished (or failed): nothing after this token is emitted
                if step_drafts[k] is not None and token == step_drafts[k]:
                    accepted[i] += 1
                    still.append(i)
            live = still
            position += 1
        return accepted

    def emit(self, row: Row, token: int, logprob: float, best: Sequence[tuple[int, float]]) -> bool:
        """Stream one chosen token of a row; False when the row is done (finished or failed)."""
        request = row.request
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        row.generated_ids.append(token)
        row.next_input = token
        if row.lookup is not None:
            row.lookup.extend((token,))
        if row.sampler.params.repetition_penalty not in (None, 1.0):
            row.seen = torch.cat([row.seen, row.seen.new_tensor([token])])
        special = token in self.special_ids
        record = TokenRecord(
            id=token,
            text="" if special else row.detokenizer.add(token),
            logprob=logprob,
            special=special,
            top_tokens=tuple(self.top_token(i, lp) for i, lp in best),
        )
        if request.want_details:
            row.tokens.append({"id": record.id, "text": record.text, "logprob": record.logprob,
                               "special": record.special, "top_tokens": record.top_tokens})  # fmt: skip
        prompt = row.prompt if row.generated == 1 else None  # with the first token, when asked
        request.emit(TokenEvent(id=token, text=record.text, logprob=logprob, special=special,
                                top_tokens=record.top_tokens, prompt=prompt))  # fmt: skip
        if row.grammar is not None and (refused := row.grammar.consume(token)) is not None:
            # unreachable while the mask holds; a grammar bug fails this row, not the engine
            row.finish()
            request.emit(ErrorEvent(f"structured output failed: {refused}", "generation"))
            return False
        return not self.maybe_finish(row, token, len(record.text))

    def top_token(self, token: int, logprob: float) -> TopToken:
        """A most-likely alternative, its text decoded alone (as TGI reports them)."""
        special = token in self.special_ids
        return TopToken(token, self.tokenizer.decode([token]), logprob, special)

    def maybe_finish(self, row: Row, token: int, new_chars: int) -> bool:
        """Finish the row if ``token`` ends it (EOS, a stop sequence, the length); True if it did."""
        params = row.sampler.params
        text = row.detokenizer.text
        stop_at: int | None = None
        if token in self.eos_ids and not params.ignore_eos:
            reason = "eos_token"
        elif params.stop and (match := find_stop(text, params.stop, new_chars)) is not None:
            reason, stop_at = "stop_sequence", match[0]
            text = text[: match[1]]
        elif row.generated >= params.max_new_tokens:
            reason = "length"
            text += row.detokenizer.flush()
        else:
            return False
        request, prompt = row.request, row.prompt
        row.finish()
        request.emit(
            FinishEvent(
                generated_text=text,
                finish_reason=reason,  # type: ignore[arg-type]
                prompt_tokens=len(request.prompt_ids),
                generated_tokens=row.generated,
                seed=row.sampler.seed,
                tokens=row.tokens,
                stop_at=stop_at,
                prompt_logprobs=prompt.logprobs if prompt is not None else None,
                prompt_top_tokens=prompt.top_tokens if prompt is not None else None,
                prompt_distributions=prompt.distributions if prompt is not None else None,
                cached_tokens=row.cached_tokens,
            )
        )
        return True


def _rows(logits: torch.Tensor, index: list[int]) -> torch.Tensor:
    """logits[index]: [len(index), V]; a view where the rows are consecutive (a batch-1 verify
    row's positions, a decode step's rows), else one ``index_select``. Not ``logits[index]``:
    advanced indexing of a few rows of a [M, 49152] tensor took 2-12 ms on 2 OpenMP threads at
    load ~8 (its parallel region waits for a descheduled thread) against 0.1 ms on one, in every
    verify step's output stage (measured: 20-26 ms a step outside the runner with drafts, 0.7 ms
    without)."""
    first = index[0]
    if index == list(range(first, first + len(index))):
        return logits[first : first + len(index)]
    return logits.index_select(0, torch.tensor(index, device=logits.device))
