"""Log-probabilities in OpenAI's two shapes, from the engine's per-token details.

Chat (``logprobs``/``top_logprobs``)::

    {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}],
     "refusal": null}

Completions (``logprobs: N``, the legacy shape; with ``echo`` the prompt's tokens come first,
the very first with a null log-probability and null top entries, as OpenAI's)::

    {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{token: logprob}, ...], "text_offset": [...]}

Values are the log-softmax of the model's raw logits (see ``server.engine.sampling``); a token's
text is the token decoded alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from server.engine.requests import TopToken

Decode = Callable[[list[int]], str]


def chat_entry(token: int, logprob: float, top: Sequence[TopToken], decode: Decode) -> dict[str, Any]:
    text = decode([token])
    return {
        "token": text,
        "logprob": logprob,
        "bytes": list(text.encode()),
        "top_logprobs": [
            {"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode())} for t in top
        ],
    }


def chat_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"content": entries, "refusal": None}


class CompletionLogprobs:
    """Accumulates the legacy completions shape; ``text_offset`` counts from ``start``."""

    def __init__(self, decode: Decode, start: int = 0) -> None:
        self.decode = decode
        self.offset = start
        self.body: dict[str, list[Any]] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }

    def add(self, token: int, logprob: float | None, top: Sequence[TopToken] | None) -> None:
        text = self.decode([token])
        self.body["tokens"].append(text)
        self.body["token_logprobs"].append(logprob)
        self.body["top_logprobs"].append(None if top is None else {t.text: t.logprob for t in top})
        self.body["text_offset"].append(self.offset)
        self.offset += len(text)

    def add_prompt(
        self,
        prompt_ids: Sequence[int],
        logprobs: Sequence[float] | None,
        tops: Sequence[Sequence[TopToken]] | None = None,
    ) -> None:
        """The prompt's tokens: the first has no log-probability (nothing predicts it), nor top
        entries; the others have both (``{}`` when no top N was asked), as OpenAI's and vLLM's."""
        values = [None, *(logprobs or [])]
        top_entries: list[Sequence[TopToken] | None] = [None, *(tops or [() for _ in prompt_ids[1:]])]
        for i, token in enumerate(prompt_ids):
            self.add(
                token,
                values[i] if i < len(values) else None,
                top_entries[i] if i < len(top_entries) else None,
            )

    def take(self) -> dict[str, list[Any]]:
        """What was added since the last take (a stream chunk's share)."""
        body = self.body
        self.body = {key: [] for key in body}
        return body
