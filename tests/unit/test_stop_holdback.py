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


@given(
    st.lists(st.text(alphabet="ab", max_size=4), max_size=12), st.text(alphabet="ab", min_size=1, max_size=6)
)
def test_held_back_text_equals_the_plain_definition(pieces: list[str], stop: str) -> None:
    """After every push, what was sent ends where the module docstring says (every prefix and
    match searched in the whole text), for texts and stops made to overlap."""
    holdback, text, sent = StopHoldback([stop]), "", 0
    for piece in pieces:
        text += piece
        holdback.push(piece)
        at = text.find(stop)
        k = next((k for k in range(min(len(stop) - 1, len(text)), 0, -1) if text.endswith(stop[:k])), 0)
        want = min(at if at != -1 else len(text), len(text) - k)
        sent = max(sent, want)
        assert holdback.sent == sent


def test_long_stop_sequences_cost_linear_time_per_token() -> None:
    """Issue 31, finding 13: sixteen 20,000-character stops that almost match the text: each token
    costs time linear in its own characters, not quadratic in the stops' length."""
    import time

    stops = [str(i % 10) + "a" * 19_999 for i in range(16)]  # no prefix is ever at the text's end
    holdback = StopHoldback(stops)
    holdback.push("a" * 20_000)
    started = time.monotonic()
    for _ in range(50):
        assert holdback.push("a") == "a"
    assert time.monotonic() - started < 0.5
