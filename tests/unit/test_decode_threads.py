"""The small decode steps' thread chooser (server/engine/decode_threads.py), on a fake clock: no
test here times anything real."""

from __future__ import annotations

import itertools

import pytest

from server.engine import decode_threads
from server.engine.decode_threads import RETRY_EVERY, SAMPLES, WARM_UP, WINDOW, DecodeThreads


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _run(
    chooser: DecodeThreads, clock: FakeClock, cost: dict[int, float], steps: int, rows: int = 1
) -> list[int]:
    """``steps`` steps of ``rows`` rows, each taking ``cost[threads]`` seconds: the counts chosen."""
    chosen = []
    for _ in range(steps):
        with chooser.step(rows) as threads:
            clock.now += cost[threads]
        chosen.append(threads)
    return chosen


@pytest.mark.parametrize("value,expected", [(None, None), ("", None), ("auto", None), (" AUTO ", None),
                                            ("1", 1), ("2", 2), ("16", 16)])  # fmt: skip
def test_the_setting_parses(value, expected) -> None:
    assert decode_threads.parse(value) == expected


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_a_wrong_setting_is_a_clear_error(value) -> None:
    with pytest.raises(ValueError, match="LORAPLEX_DECODE_THREADS"):
        decode_threads.parse(value)


def test_a_pinned_count_is_kept_whatever_the_timings() -> None:
    clock = FakeClock()
    chooser = DecodeThreads(2, 2, clock)
    assert _run(chooser, clock, {2: 1.0}, 40) == [2] * 40
    assert chooser.describe() == {"setting": 2, "threads": 2, "step_ms": {}}


def test_one_thread_only_when_pytorch_has_one() -> None:
    clock = FakeClock()
    chooser = DecodeThreads(None, 1, clock)
    assert _run(chooser, clock, {1: 0.01}, 10) == [1] * 10


def test_auto_warms_up_each_count_then_runs_the_faster_and_retries_the_other_less_and_less() -> None:
    """While the other count stays slower, each retry doubles the interval to the next."""
    clock = FakeClock()
    chooser = DecodeThreads(None, 2, clock)
    chosen = _run(chooser, clock, {1: 0.030, 2: 0.010}, 16 * RETRY_EVERY)
    warm = WARM_UP + SAMPLES
    assert chosen[: 2 * warm] == [1] * warm + [2] * warm  # untimed steps, then timed ones, each
    retries = [i for i, n in enumerate(chosen, start=1) if n == 1][warm:]
    assert retries[0] == 2 * warm + 1 + RETRY_EVERY
    assert [b - a for a, b in itertools.pairwise(retries)] == [
        2 * RETRY_EVERY,
        4 * RETRY_EVERY,
        8 * RETRY_EVERY,
    ]
    assert chooser.describe() == {"setting": "auto", "threads": 2, "step_ms": {"1": {"1": 30.0, "2": 10.0}}}


def test_the_retry_interval_is_capped() -> None:
    clock = FakeClock()
    chooser = DecodeThreads(None, 2, clock, retry_every=4, max_retry_every=16)
    chosen = _run(chooser, clock, {1: 0.010, 2: 0.030}, 200)
    retries = [i for i, n in enumerate(chosen, start=1) if n == 2][WARM_UP + SAMPLES :]
    assert [b - a for a, b in itertools.pairwise(retries)][:4] == [8, 16, 16, 16]


def test_one_slow_step_does_not_decide_the_count() -> None:
    """A loaded machine's outlier (a step waiting a whole time slice, 20x the others) among the
    faster count's timings: the median ignores it."""
    clock = FakeClock()
    chooser = DecodeThreads(None, 2, clock)
    _run(chooser, clock, {1: 0.030, 2: 0.010}, 2 * (WARM_UP + SAMPLES) + 2)
    _run(chooser, clock, {1: 0.030, 2: 0.200}, 1)  # the outlier
    assert _run(chooser, clock, {1: 0.030, 2: 0.010}, 10) == [2] * 10


def test_auto_follows_the_load_both_ways() -> None:
    """Two threads get slow (a loaded machine): one thread within a few steps; the load goes:
    two threads again within a retry interval and a few quick retries (a faster retry is
    followed by another soon)."""
    clock = FakeClock()
    chooser = DecodeThreads(None, 2, clock)
    _run(chooser, clock, {1: 0.030, 2: 0.010}, 10)
    loaded = _run(chooser, clock, {1: 0.030, 2: 0.060}, 2 * RETRY_EVERY)
    first_one = loaded.index(1)
    assert first_one <= WINDOW // 2 + 1 and loaded[first_one:].count(2) <= 2  # then only the retries
    quiet = _run(chooser, clock, {1: 0.030, 2: 0.010}, 6 * RETRY_EVERY)
    assert quiet[-(RETRY_EVERY + 2) :].count(1) <= 1  # two threads again, one thread only retried
    assert chooser.current == 2


def test_each_row_count_has_its_own_estimates() -> None:
    """Four-row steps cost more than one-row steps on any count: their timings do not mix."""
    clock = FakeClock()
    chooser = DecodeThreads(None, 2, clock)
    warm = 2 * (WARM_UP + SAMPLES)
    _run(chooser, clock, {1: 0.020, 2: 0.010}, warm, rows=1)
    assert _run(chooser, clock, {1: 0.040, 2: 0.060}, warm + 4, rows=4)[warm:] == [1] * 4
    assert _run(chooser, clock, {1: 0.020, 2: 0.010}, 4, rows=1) == [2] * 4
    assert chooser.describe()["step_ms"] == {"1": {"1": 20.0, "2": 10.0}, "4": {"1": 40.0, "2": 60.0}}
