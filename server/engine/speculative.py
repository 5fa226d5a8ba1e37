"""Speculative decoding's drafts: prompt lookup (n-gram matching against the row's own tokens).

A row's last ``n`` tokens (``n`` from ``MAX_NGRAM`` down to ``MIN_NGRAM``) are looked up among its
earlier tokens (prompt, then output); the tokens that followed their latest earlier occurrence are
proposed as the next ones, up to ``--speculate`` of them. No draft model: it works under every
adapter, and it proposes exactly where adapters are used most (extraction, rewriting, code edits,
answers that quote their context). The engine verifies the proposals in one step (a verify row:
the last token + the drafts) and keeps the longest prefix the target model itself would choose
(``sampling.choose_next_tokens`` with ``drafts``); see docs/speculative-decoding.md.

The index is kept per row and grows with it: each appended token adds the n-grams that end just
before it, pointing at it, so a lookup is one dict probe per ``n`` (no scan of the context).
"""

from __future__ import annotations

from collections.abc import Iterable

MIN_NGRAM = 2  # shortest suffix matched: a single token repeats too often to predict anything
MAX_NGRAM = 4  # longest suffix tried first (the most specific match wins)


class PromptLookup:
    """One row's tokens and, for every n-gram in them, where its latest continuation starts."""

    def __init__(self, tokens: Iterable[int] = ()) -> None:
        self.tokens: list[int] = []
        self._next: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token after it
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            end = len(self.tokens)  # the n-grams ending at end - 1 now have a continuation: token
            for n in range(MIN_NGRAM, MAX_NGRAM + 1):
                if end >= n:
                    self._next[tuple(self.tokens[end - n : end])] = end
            self.tokens.append(token)

    def propose(self, limit: int) -> list[int]:
        """Up to ``limit`` tokens that followed the latest earlier occurrence of the row's longest
        matching suffix; [] when no suffix of ``MIN_NGRAM`` or more tokens occurred before."""
        if limit <= 0:
            return []
        tokens = self.tokens
        for n in range(MAX_NGRAM, MIN_NGRAM - 1, -1):
            if len(tokens) <= n:
                continue
            start = self._next.get(tuple(tokens[-n:]))
            if start is not None:
                return tokens[start : start + limit]
        return []
