"""Incremental detokenization: the streamed deltas add up to the whole decode, with a bounded window."""

from __future__ import annotations

import pytest

from server.engine.detokenize import IncrementalDetokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog, twice: the quick brown fox.",
    "Emoji 🍞🥖 and accents: crème brûlée, naïve façade; CJK 面包 と パン.",
    "  leading spaces,\nnew lines\n\n\tand tabs   trailing  ",
]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_add_up_to_the_whole_decode_and_the_window_stays_short(tokenizer, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] * 3
    detokenizer = IncrementalDetokenizer(tokenizer)
    streamed, longest = "", 0
    for token in ids:
        streamed += detokenizer.add(token)
        longest = max(longest, len(detokenizer.ids))
    streamed += detokenizer.flush()
    whole = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert streamed == whole == detokenizer.text
    assert "\ufffd" not in streamed
    # only the ids since the last complete character are kept, never the whole output
    assert longest <= 8 < len(ids)
