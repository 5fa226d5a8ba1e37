"""Incremental detokenization and stop-sequence detection for one generated row."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase


@dataclass
class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas in amortised O(1) per token.

    Decodes a short window (``prefix_offset:``) instead of the whole output, and holds back a
    delta that ends in an incomplete UTF-8 sequence (U+FFFD) until the next token completes it.
    Special tokens (EOS, ...) produce no text. It keeps only that window of ids: the row's tokens
    are kept once, in ``Row.generated_ids``.
    """

    tokenizer: PreTrainedTokenizerBase
    ids: list[int] = field(default_factory=list)  # the window: ids from the last text boundary on
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append a token; return the new text it completes (possibly empty)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            del self.ids[: self.read_offset]  # never read again: the window starts at read_offset
            self.prefix_offset, self.read_offset = 0, len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end of generation, the text still held back (an incomplete character)."""
        if self.read_offset == len(self.ids):
            return ""
        full = self._decode(self.ids[self.prefix_offset :])
        delta = full[len(self._decode(self.ids[self.prefix_offset : self.read_offset])) :]
        self.read_offset = len(self.ids)
        self.text += delta
        return delta


def find_stop(text: str, stops: tuple[str, ...], new_chars: int) -> tuple[int, int] | None:
    """Earliest stop sequence that ends within the last ``new_chars`` characters of ``text``.

    Returns (start, end) of the match, or None. Only the tail is searched, so a long output
    costs no more than a short one.
    """
    best: tuple[int, int] | None = None
    for stop in stops:
        window_start = max(0, len(text) - new_chars - len(stop) + 1)
        at = text.find(stop, window_start)
        if at != -1 and (best is None or at < best[0]):
            best = (at, at + len(stop))
    return best
