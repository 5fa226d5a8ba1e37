"""Structured output: JSON-schema grammars (llguidance) and each row's next-token mask.

    JSON schema ──compile (once per request)──► Grammar (llguidance's grammar text)
                                                   │ one matcher per row (best_of / n: one each)
    every step, rows that have one:                ▼
      RowGrammar.matcher ──fill──► bitmask [b, ⌈V/32⌉] int32 ──unpack──► TokenMask.allowed [b, V] bool
      that row's logits[~allowed] = -inf before penalties, warpers and sampling (choose_next_tokens)
      the chosen token ──consume──► the matcher's next state

The end-of-sequence tokens are allowed only where the grammar accepts (the JSON value is
complete); once nothing else can follow, they are the only tokens allowed. Rows without a
grammar are not masked at all: their tokens are the ones they would get in any other batch.

Why llguidance (measured by ``bench/grammar_engines.py``, see the README): its per-token mask
costs about what xgrammar's does on this CPU (~0.05 ms per row over the 49k vocabulary), but a
new schema compiles in about a millisecond instead of seconds, and it has no dependencies.

The llguidance tokenizer (the model's vocabulary as byte strings, ~1 s to build) is built on
the first structured request, not at start-up: servers that never see one never pay for it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from server.engine.errors import RequestRejected

# The JSON the grammar lets a model write: no free whitespace (a model cannot pad forever), and
# the separators ``json.dumps`` uses, which models trained on JSON write naturally.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}


class GrammarError(RequestRejected):
    """A schema the grammar engine refuses (the HTTP layer makes it a 422 with this message)."""


@dataclass(frozen=True)
class Grammar:
    """A compiled grammar, ready for per-row matchers; ``schema`` is what the request asked for."""

    text: str  # llguidance's grammar (JSON text); matchers are built from it
    schema: dict[str, Any]


@dataclass
class GrammarStats:
    """Where structured output spends its time (``bench/structured.py`` reports it)."""

    mask_seconds: float = 0.0  # computing and unpacking masks, all steps (applying them is sampling)
    masked_rows: int = 0  # row-steps that had a mask (one per constrained token)
    compiles: int = 0


class GrammarCompiler:
    """The engine's one llguidance tokenizer, and schema compilation against it (thread-safe)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_ids: Iterable[int]) -> None:
        """``vocab_size``: the width of the model's logits (may exceed the tokenizer's vocabulary)."""
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = sorted(eos_ids)
        self.stats = GrammarStats()
        self._lltokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        self._executor: llguidance.LLExecutor | None = None

    @property
    def lltokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._lltokenizer is None:
                if not isinstance(self.tokenizer, PreTrainedTokenizerFast):
                    raise GrammarError(
                        "structured output (response_format) needs a fast Hugging Face tokenizer "
                        f"(tokenizer.json); this model's tokenizer is {type(self.tokenizer).__name__}."
                    )
                self._lltokenizer = llguidance.hf.from_tokenizer(
                    self.tokenizer, self.vocab_size, eos_token=self.eos_ids or None
                )
            return self._lltokenizer

    def compile_json_schema(self, schema: dict[str, Any] | None) -> Grammar:
        """The grammar of JSON values valid against ``schema`` (None: any JSON object).

        Raises :class:`GrammarError` with llguidance's own message for a schema it cannot use
        (invalid, unsatisfiable, a bad ``$ref`` or ``pattern``).
        """
        schema = ANY_JSON_OBJECT if schema is None else schema
        try:
            text = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)
        except ValueError as exc:
            raise GrammarError(_invalid(str(exc))) from exc
        error = llguidance.LLMatcher.validate_grammar(text, self.lltokenizer)
        if error:
            raise GrammarError(_invalid(error))
        self.stats.compiles += 1
        return Grammar(text, schema)

    def compile_lark(self, text: str, schema: dict[str, Any]) -> Grammar:
        """A grammar written in llguidance's Lark dialect (``%json`` embeds a schema), e.g. tool calls;
        ``schema`` records what its JSON parts follow."""
        try:
            grammar = llguidance.LLMatcher.grammar_from_lark(text)
        except ValueError as exc:
            raise GrammarError(_invalid(str(exc))) from exc
        error = llguidance.LLMatcher.validate_grammar(grammar, self.lltokenizer)
        if error:
            raise GrammarError(_invalid(error))
        self.stats.compiles += 1
        return Grammar(grammar, schema)

    def matcher(self, grammar: Grammar) -> RowGrammar:
        """A fresh grammar state for one row."""
        matcher = llguidance.LLMatcher(self.lltokenizer, grammar.text, log_level=0)
        if matcher.is_error():
            raise GrammarError(_invalid(matcher.get_error()))
        return RowGrammar(matcher, frozenset(self.eos_ids))

    @property
    def executor(self) -> llguidance.LLExecutor:
        if self._executor is None:
            self._executor = llguidance.LLExecutor(num_threads=1)  # the engine thread; masks are ~0.05 ms
        return self._executor

    def mask(self, grammars: Sequence[RowGrammar | None], vocab: int) -> TokenMask | None:
        """The tokens each constrained row may emit next; None when no row has a grammar."""
        rows = [i for i, g in enumerate(grammars) if g is not None]
        if not rows:
            return None
        start = time.perf_counter()
        words = (vocab + 31) // 32
        bitmask = np.empty((len(rows), words), dtype=np.int32)  # [b, W], bit j of word w: token 32·w + j
        pairs = [(grammars[i].matcher, k) for k, i in enumerate(rows)]  # type: ignore[union-attr]
        self.executor.unsafe_compute_mask_ptr(pairs, bitmask.ctypes.data, words * 4, len(rows))
        mask = TokenMask(rows, unpack_bitmask(bitmask, vocab))
        self.stats.mask_seconds += time.perf_counter() - start
        self.stats.masked_rows += len(rows)
        return mask


@dataclass(frozen=True)
class TokenMask:
    """The next-token masks of a batch's constrained rows (rows without a grammar are not in it)."""

    rows: list[int]  # batch rows that have a grammar
    allowed: torch.Tensor  # [len(rows), V] bool: True where the row's grammar allows the token


def _invalid(engine_message: str) -> str:
    return (
        f"invalid JSON schema: {engine_message.strip()} (llguidance); fix the schema, or send none for any "
        "JSON object."
    )


def unpack_bitmask(bitmask: np.ndarray, vocab: int) -> torch.Tensor:
    """bitmask: [b, W] int32, bit j of word w = token 32·w + j -> [b, vocab] bool."""
    bits = np.unpackbits(bitmask.view(np.uint8), axis=-1, bitorder="little")  # [b, 32·W] of 0/1
    return torch.from_numpy(bits[:, :vocab].view(np.bool_))


@dataclass
class RowGrammar:
    """One row's position in its grammar. Lives in the row: preemption and recompute keep it."""

    matcher: llguidance.LLMatcher = field(repr=False)
    eos_ids: frozenset[int]

    def consume(self, token: int) -> str | None:
        """Advance by the token the row emitted; an error message if the grammar refuses it.

        End-of-sequence tokens end the row (or, with ``ignore_eos``, leave the grammar where it is).
        """
        if token in self.eos_ids:
            return None
        if not self.matcher.consume_token(token):
            return self.matcher.get_error() or f"the grammar refused token {token}"
        return None

    @property
    def accepting(self) -> bool:
        """The output so far is a complete JSON value valid against the schema."""
        return self.matcher.is_accepting()
