"""The small decode steps' thread chooser (server/engine/decode_threads.py), on a fake clock: no
test here times anything real."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from server.engine import decode_threads
from server.engine.decode_threads import (
    CLEAR,
    MAX_RETRY_EVERY,
    MIN_RETRY_EVERY,
    RETRY_COST,
    SAMPLES,
    WARM_UP,
    WINDOW,
    DecodeThreads,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _run(
    chooser: DecodeThreads,
    clock: FakeClock,
    cost: dict[int, float] | Callable[[int, int], float],
    steps: int,
    tokens: int = 1,
) -> list[int]:
    """``steps`` steps of ``tokens`` tokens, each taking ``cost[threads]`` seconds (or
    ``cost(step, threads)``: the step's index in this run): the counts chosen."""
    chosen = []
    for i in range(steps):
        with chooser.step(tokens) as threads:
            clock.now += cost(i, threads) if callable(cost) else cost[threads]
        chosen.append(threads)
    return chosen


def _retries(chosen: list[int], count: int, after: int) -> list[int]:
    """The steps (1-based) that ran ``count`` after the first ``after`` steps."""
    return [i for i, n in enumerate(chosen, start=1) if n == count and i > after]


SAMPLING = 2 * WARM_UP + 2 * SAMPLES  # steps before the first choice when the counts differ clearly


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


def test_auto_warms_up_each_count_then_times_them_in_turn_then_runs_the_faster() -> None:
    clock = FakeClock()
    chooser = DecodeThreads(None, 2, clock)
    chosen = _run(chooser, clock, {1: 0.030, 2: 0.010}, 4 * MIN_RETRY_EVERY)
    assert chosen[:SAMPLING] == [1] * WARM_UP + [2] * WARM_UP + [1, 2] * SAMPLES  # in turn: drift hits both
    assert chosen[SAMPLING : SAMPLING + MIN_RETRY_EVERY] == [2] * MIN_RETRY_EVERY
    assert chooser.describe() == {"setting": "auto", "threads": 2, "step_ms": {"1": {"1": 30.0, "2": 10.0}}}


def test_retries_are_spaced_by_what_they_cost() -> None:
    """A retry of a count r times slower costs r - 1 steps: one every (r - 1) / RETRY_COST steps,
    within [MIN_RETRY_EVERY, MAX_RETRY_EVERY]; the same interval over and over while the
    estimates stay (no doubling: the interval follows the estimates of the moment)."""
    for ratio, expected in (
        (1.5, 25),
        (1.2, 10),
        (1.03, MIN_RETRY_EVERY),
        (2.0, 50),
        (40.0, MAX_RETRY_EVERY),
    ):
        assert expected == max(MIN_RETRY_EVERY, min(MAX_RETRY_EVERY, round((ratio - 1) / RETRY_COST)))
        clock = FakeClock()
        chooser = DecodeThreads(None, 2, clock)
        chosen = _run(chooser, clock, {1: 0.020, 2: 0.020 * ratio}, SAMPLING + 10 * WINDOW + 4 * expected)
        retries = _retries(chosen, 2, SAMPLING + (2 * WINDOW if ratio < 1.1 else 0))
        gaps = [b - a for a, b in itertools.pairwise(retries)]
        assert len(gaps) >= 2 and gaps[-2:] == [expected] * 2, (ratio, gaps)
        assert chosen[-1] == 1


def test_close_counts_get_more_samples_before_the_choice() -> None:
    """Two counts a few percent apart: WINDOW timings each (in turn), not SAMPLES, before the
    choice (the closer they are, the harder the choice and the cheaper the samples)."""
    clock = FakeClock()
    chooser = DecodeThreads(None, 2, clock)
    chosen = _run(chooser, clock, {1: 0.0200, 2: 0.0194}, 2 * WARM_UP + 2 * WINDOW + 4)
    assert chosen[2 * WARM_UP : 2 * WARM_UP + 2 * WINDOW] == [1, 2] * WINDOW
    assert chosen[2 * WARM_UP + 2 * WINDOW :] == [2] * 4


def test_a_clearly_slower_count_is_not_sampled_again_before_the_choice() -> None:
    """Loaded machine: a 2-thread step 30x a 1-thread one. One timing says so (CLEAR): 1 thread
    from then on, and the slow count retried only every MAX_RETRY_EVERY steps (~3% of the time)."""
    clock = FakeClock()
    chooser = DecodeThreads(None, 2, clock)
    assert CLEAR <= 30
    chosen = _run(chooser, clock, {1: 0.020, 2: 0.600}, 3 * MAX_RETRY_EVERY)
    assert chosen[: 2 * WARM_UP + 2] == [1] * WARM_UP + [2] * WARM_UP + [1, 2]
    slow = chosen[2 * WARM_UP + 2 :]
    assert slow.count(2) == 2 and slow.index(2) == MAX_RETRY_EVERY  # the choice's step, then 1024 on


def test_a_count_that_looked_slow_at_first_is_found_faster_within_a_few_retries() -> None:
    """The quiet run's miss (float32 batch 1: auto held 1 thread at 20.4 ms while 2 threads
    pinned ran 18.75 ms): 2 threads' first timings slow (here: the first request's, the event
    loop busy), then 2 threads 25% faster. A faster retry is followed by another soon; the choice
    moves to 2 threads after WINDOW // 2 + 1 of them, well within 100 steps (it took 3 retries
    32 steps apart at best before, and every slower retry doubled the interval)."""
    clock = FakeClock()
    chooser = DecodeThreads(None, 2, clock)

    def cost(step: int, threads: int) -> float:
        return 0.0251 if threads == 1 else (0.0300 if step < SAMPLING else 0.0188)

    chosen = _run(chooser, clock, cost, 200)
    assert chosen[SAMPLING] == 1  # the first choice, on what it saw
    switched = next(
        i for i in range(SAMPLING, len(chosen)) if chosen[i : i + MIN_RETRY_EVERY] == [2] * MIN_RETRY_EVERY
    )
    assert switched <= SAMPLING + 10 + (WINDOW // 2 + 1) * MIN_RETRY_EVERY
    assert chosen[-50:].count(1) <= 50 // MIN_RETRY_EVERY  # 1 thread only retried (its ratio: ~1.34)


def test_one_slow_step_does_not_decide_the_count() -> None:
    """A loaded machine's outlier (a step waiting a whole time slice, 20x the others) among the
    faster count's timings: the median ignores it."""
    clock = FakeClock()
    chooser = DecodeThreads(None, 2, clock)
    _run(chooser, clock, {1: 0.030, 2: 0.010}, SAMPLING + 2)
    _run(chooser, clock, {1: 0.030, 2: 0.200}, 1)  # the outlier
    assert _run(chooser, clock, {1: 0.030, 2: 0.010}, 5) == [2] * 5


def test_auto_follows_the_load_both_ways() -> None:
    """Two threads get slow (a loaded machine): one thread within a few steps, and two threads
    retried rarely; the load goes: two threads again within one retry interval and a few quick
    retries (a faster retry is followed by another soon)."""
    clock = FakeClock()
    chooser = DecodeThreads(None, 2, clock)
    _run(chooser, clock, {1: 0.030, 2: 0.010}, SAMPLING + 4)
    loaded = _run(chooser, clock, {1: 0.030, 2: 0.060}, 200)
    first_one = loaded.index(1)
    assert first_one <= WINDOW // 2 + 1 and loaded[first_one:].count(2) <= 200 // 50 + 1  # ratio 2: every 50
    quiet = _run(chooser, clock, {1: 0.030, 2: 0.010}, 50 + (WINDOW // 2 + 2) * MIN_RETRY_EVERY)
    assert quiet[-MIN_RETRY_EVERY:].count(1) <= 1 and chooser.current == 2


def test_the_running_count_getting_slower_brings_the_retries_sooner() -> None:
    """The retry interval follows the estimates of the moment: when the running count slows down
    (the ratio to the other shrinks), the other is retried sooner than the interval set before."""
    clock = FakeClock()
    chooser = DecodeThreads(None, 2, clock)
    _run(chooser, clock, {1: 0.010, 2: 0.030}, SAMPLING)  # ratio 3: a retry every 100 steps
    later = _run(chooser, clock, {1: 0.025, 2: 0.030}, 60)  # ratio 1.2: every 10
    assert 2 in later[:20]


def test_each_step_size_has_its_own_estimates() -> None:
    """A verify step of 5 tokens (1 + 4 drafts) costs more than a 1-token decode step on any
    count, and may prefer another count: its timings do not mix with the 1-token steps', and
    the warm-up is not repeated for it."""
    clock = FakeClock()
    chooser = DecodeThreads(None, 2, clock)
    _run(chooser, clock, {1: 0.020, 2: 0.010}, SAMPLING, tokens=1)
    verify = _run(chooser, clock, {1: 0.040, 2: 0.060}, 2 * SAMPLES + 4, tokens=5)
    assert verify == [1, 2] * SAMPLES + [1] * 4  # no warm-up: each count has run before
    assert _run(chooser, clock, {1: 0.020, 2: 0.010}, 4, tokens=1) == [2] * 4
    assert chooser.describe()["step_ms"] == {"1": {"1": 20.0, "2": 10.0}, "5": {"1": 40.0, "2": 60.0}}


def test_a_new_size_takes_a_clear_verdict_without_sampling_the_slow_count() -> None:
    """Loaded machine, speculation on: 1-token steps found 2 threads 30x slower; the verify steps
    of 3, 4 and 5 tokens that follow run 1 thread at once (sampling 2 threads at each new size
    cost ~2.4 s a step, measured) and retry 2 threads as rarely as the 1-token steps do."""
    clock = FakeClock()
    chooser = DecodeThreads(None, 2, clock)
    _run(chooser, clock, {1: 0.020, 2: 0.600}, 2 * WARM_UP + 3)
    for tokens in (5, 3, 4):
        assert (
            _run(chooser, clock, {1: 0.040, 2: 1.200}, MAX_RETRY_EVERY, tokens=tokens)
            == [1] * MAX_RETRY_EVERY
        )
    assert _run(chooser, clock, {1: 0.040, 2: 1.200}, 2, tokens=5) == [2, 1]  # the retry, then 1 again
    assert chooser.describe()["step_ms"]["5"] == {"1": 40.0, "2": 1200.0}


def test_a_new_size_next_to_close_counts_is_timed_itself() -> None:
    """Quiet machine: 1-token steps found the counts 10% apart; a 5-token verify step may prefer
    the other count (more rows per weight read), so it is timed, not borrowed."""
    clock = FakeClock()
    chooser = DecodeThreads(None, 2, clock)
    _run(chooser, clock, {1: 0.0200, 2: 0.0220}, SAMPLING + 2)
    assert _run(chooser, clock, {1: 0.030, 2: 0.020}, 2 * SAMPLES + 3, tokens=5) == [1, 2] * SAMPLES + [2] * 3
