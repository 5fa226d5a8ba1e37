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
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.sent = 0  # characters of ``text`` already released

    def push(self, piece: str) -> str:
        """Add a token's text; return what can be sent now."""
        self.text += piece
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
        text = self.text
        end = len(text)
        for stop in self.stops:
            at = text.find(stop, max(0, self.sent - len(stop) + 1))
            if at != -1:
                end = min(end, at)
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    end = min(end, len(text) - k)
                    break
        return max(end, self.sent)
