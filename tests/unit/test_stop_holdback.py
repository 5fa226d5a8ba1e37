"""StopHoldback: a stream never sends a stop sequence, even one split across tokens."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from server.api.stop_holdback import StopHoldback


def _stream(pieces: list[str], stops: list[str]) -> tuple[list[str], str]:
    """Feed pieces until the text holds a stop (as the engine would finish); return (sent, final)."""
    holdback = StopHoldback(stops)
    sent, text = [], ""
    for piece in pieces:
        text += piece
        sent.append(holdback.push(piece))
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            final = text[: min(hits)]
            sent.append(holdback.finish(final))
            return sent, final
    sent.append(holdback.finish(text))
    return sent, text


def test_stop_split_across_tokens_is_never_sent() -> None:
    sent, final = _stream(["Hello", " wor", "ld", "\n", "\nmore"], ["\n\n"])
    assert final == "Hello world" and "".join(sent) == final
    assert sent[:4] == ["Hello", " wor", "ld", ""]  # the lone "\n" is held back


def test_false_alarm_is_released() -> None:
    sent, final = _stream(["ab", "c", "d"], ["cx"])
    assert sent == ["ab", "", "cd", ""] and final == "abcd"


def test_no_stops_sends_everything_at_once() -> None:
    holdback = StopHoldback([])
    assert [holdback.push(p) for p in ("a", "b")] == ["a", "b"] and holdback.finish("ab") == ""


@given(
    st.lists(st.text(alphabet="ab\n", max_size=4), max_size=12),
    st.lists(st.text(alphabet="ab\n", min_size=1, max_size=3), min_size=1, max_size=3),
)
def test_sent_text_is_always_the_final_text(pieces: list[str], stops: list[str]) -> None:
    sent, final = _stream(pieces, stops)
    assert "".join(sent) == final
    assert not any(stop in final for stop in stops)
