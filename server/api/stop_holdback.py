"""Stream text without ever sending a stop sequence, even one split across tokens.

OpenAI excludes the matched stop sequence from the text. The engine finishes a request on the
token that completes a stop sequence, but by then the tokens carrying the sequence's beginning
may already have been streamed. So a stream holds back the longest tail of its text that could
still grow into a stop sequence (a prefix of one), plus anything from a complete match on, and
releases it once the next token shows it is not a stop (or when the request finishes).

Semantics: ``sent = text[:safe_end]`` where ``safe_end`` is the earliest of
``text.find(stop)`` and ``len(text) - k`` for the longest ``k`` with
``text.endswith(stop[:k])``, over every stop sequence.
"""

from __future__ import annotations


class StopHoldback:
    def __init__(self, stops: list[str] | tuple[str, ...]) -> None:
        self.stops = tuple(_StopMatcher(s) for s in stops if s)
        self.text = ""
        self.sent = 0  # characters of ``text`` already released

    def push(self, piece: str) -> str:
        """Add a token's text; return what can be sent now."""
        offset = len(self.text)
        self.text += piece
        for stop in self.stops:
            stop.feed(piece, offset)
        end = self._safe_end()
        out = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return out

    def finish(self, final_text: str) -> str:
        """The rest of the output, given the whole final text (already cut before any stop)."""
        rest = final_text[self.sent :]
        self.sent = max(self.sent, len(final_text))
        return rest

    def _safe_end(self) -> int:
        end = len(self.text)
        for stop in self.stops:
            if stop.match_at is not None:
                end = min(end, stop.match_at)
            end = min(end, len(self.text) - stop.partial)
        return max(end, self.sent)


class _StopMatcher:
    """Knuth-Morris-Pratt over the streamed text, one character at a time: ``partial`` is the
    longest prefix of the stop that the text ends with, ``match_at`` where the first whole match
    starts. Each token costs time linear in its own characters, whatever the stop's length (a
    search of the text's tail for every prefix was quadratic in it, on every token)."""

    def __init__(self, stop: str) -> None:
        self.stop = stop
        self.fail = [0] * len(stop)  # fail[i]: longest proper border of stop[: i + 1]
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fail[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self.fail[i] = k
        self.partial = 0
        self.match_at: int | None = None

    def feed(self, piece: str, offset: int) -> None:
        """``piece`` was appended to the text at ``offset``."""
        stop, fail, k = self.stop, self.fail, self.partial
        for i, char in enumerate(piece):
            if k == len(stop):
                k = fail[k - 1]
            while k and char != stop[k]:
                k = fail[k - 1]
            if char == stop[k]:
                k += 1
            if k == len(stop) and self.match_at is None:
                self.match_at = offset + i + 1 - len(stop)
        self.partial = k if k < len(stop) else fail[k - 1]
