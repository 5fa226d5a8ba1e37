"""Speculative decoding's drafts: prompt lookup (n-gram matching against the row's own tokens).

A row's last ``n`` tokens (``n`` from ``MAX_NGRAM`` down to ``MIN_NGRAM``) are looked up among its
earlier tokens (prompt, then output); the tokens that followed their latest earlier occurrence are
proposed as the next ones, up to ``--speculate`` of them. No draft model: it works under every
adapter, and it proposes exactly where adapters are used most (extraction, rewriting, code edits,
answers that quote their context). The engine verifies the proposals in one step (a verify row:
the last token + the drafts) and keeps the longest prefix the target model itself would choose
(``sampling.choose_next_tokens`` with ``drafts``); see docs/speculative-decoding.md.

How many tokens a row drafts adapts to how its drafts fared (``DraftLength``): fewer where they
miss (a rejected draft costs a row of the verify step for nothing), up to ``--speculate`` where
they hit.

The index is kept per row and grows with it: each appended token adds the n-grams that end just
before it, pointing at it, so a lookup is one dict probe per ``n`` (no scan of the context).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

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


# What one more drafted token adds to a batch-1 verify step, as a fraction of a one-token decode
# step. The embedded model on the CPU, interleaved on a loaded machine (bench/verify_step.py): 1 + k
# tokens cost 1.16x, 1.28x, 1.38x, 1.48x for k = 1..4 while verify steps ran PyTorch's ops between
# the layers (bench/results/speculative-cpu.md); through the compiled decode layer, with the linear
# kernel prefetching in multi-row passes, about 1.0-1.1x, 1.0-1.2x, 1.1-1.3x, 1.0-1.4x
# (docs/speculative-decoding.md#measured): the kernel's time still grows with the rows it multiplies.
DRAFT_TOKEN_COST = 0.1
DECAY = 0.5  # weight of the earlier verify steps against the latest in the acceptance estimate
PRIOR = (3.0, 4.0)  # (accepted, examined) before a row's first verify step: p = 0.75, full drafts


@dataclass
class DraftLength:
    """One row's draft length, adapted to its recent acceptance: fewer drafts where they miss, up
    to ``--speculate`` where they hit.

    The row's per-token acceptance ``p`` is estimated from its verify steps (accepted drafts over
    drafts examined, the first rejected one included; earlier steps decayed by ``DECAY``). With
    ``k`` drafts a step yields ``1 + p + ... + p^k`` tokens on average and costs about
    ``1 + DRAFT_TOKEN_COST * k`` decode steps; the row drafts the ``k`` (1 to ``--speculate``) with
    the most tokens per cost. A row that keeps missing drafts one token (cheap, and it lets the
    estimate recover when the row starts copying); one that copies drafts the maximum."""

    accepted: float = PRIOR[0]
    examined: float = PRIOR[1]

    def limit(self, maximum: int) -> int:
        """How many tokens to draft now, at most ``maximum`` (``--speculate``)."""
        p = self.accepted / self.examined
        best, best_rate, expected = min(1, maximum), 0.0, 1.0
        for k in range(1, maximum + 1):
            expected += p**k  # tokens a step with k drafts yields on average
            rate = expected / (1 + DRAFT_TOKEN_COST * k)
            if rate > best_rate:
                best, best_rate = k, rate
        return best

    def observe(self, drafted: int, accepted: int) -> None:
        """A verify step's result for this row: ``accepted`` of its ``drafted`` tokens kept."""
        if drafted <= 0:
            return
        self.accepted = self.accepted * DECAY + accepted
        self.examined = self.examined * DECAY + min(drafted, accepted + 1)
