"""How many threads a small decode step's kernels run on, chosen by measurement.

A decode step of up to ``gemv_cpu.ONE_THREAD_ROWS`` rows streams the weights once; the compiled
kernels run it (``gemv_cpu.py``, ``quant_cpu.py``, ``native/fused_cpu.py``). On a quiet 2-core
machine two threads make the batch-1 engine step 1.77x faster (18.9 against 29.2 ms); on a loaded
one every 2-thread parallel region waits at its barrier for a descheduled thread, and a step
took 6x longer (measured, ``docs/performance.md``). Neither count is right everywhere, and the
load changes while a server runs, so ``auto`` (the default of ``LORAPLEX_DECODE_THREADS``) times
the steps with each count and runs the faster:

- one thread and all of PyTorch's (``torch.get_num_threads()`` when the runner starts) are the
  two candidates; the timings are kept per row count (1 to ``ONE_THREAD_ROWS``: a 4-row step
  costs more than a 1-row one whatever the threads);
- each candidate's first ``WARM_UP`` steps are run and not counted (the first step builds the
  layer tables; a new thread count starts its OpenMP threads), then it runs until it has
  ``SAMPLES`` timings; a count's estimate is the median of its last ``WINDOW`` timings (a median:
  on a loaded machine one step in many waits a whole time slice, measured at 20x the others, and
  one such outlier must not decide the count for the next hundred steps);
- then the faster estimate runs, and now and then a step runs the other, so that its estimate
  follows the load too: ``RETRY_EVERY`` steps after the choice changed, then at twice the
  previous interval each time a retry is slower than the running count's estimate (up to
  ``MAX_RETRY_EVERY``), and again ``RETRY_EVERY`` steps later when one is faster. On a loaded
  machine a 2-thread step took 30-90x a 1-thread one (measured): a retry every 32 steps would
  cost more than the choice saves, backed off it costs at most a few percent. After a change of
  load the running count's estimate moves within ``WINDOW // 2 + 1`` steps; the other one's
  within one retry interval and ``WINDOW // 2`` quick retries.

A number pins the count (no timing): 1 is what the server ran before ``auto``.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

ENV = "LORAPLEX_DECODE_THREADS"
WARM_UP = 1  # steps per candidate run and not timed
SAMPLES = 3  # timings per candidate before the faster is chosen
WINDOW = 5  # a count's estimate: the median of its last this many timings
RETRY_EVERY = 32  # the first retry of the count that is not the faster, this many steps on
MAX_RETRY_EVERY = 1024  # the longest interval between retries (each slow retry doubles it)


def parse(value: str | None) -> int | None:
    """``LORAPLEX_DECODE_THREADS``: unset, empty or ``auto`` -> None (measure); a positive
    integer -> that count."""
    if value is None or value.strip().lower() in ("", "auto"):
        return None
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f"{ENV}={value!r}: use auto or a positive number of threads")
    return threads


@dataclass
class _Rows:
    """The timings of steps of one row count."""

    steps: int = 0  # steps chosen for
    runs: dict[int, int] = field(default_factory=dict)  # threads -> steps run (warm-up included)
    seconds: dict[int, deque[float]] = field(default_factory=dict)  # threads -> last WINDOW timings
    best: int = 0  # the faster count when last chosen (0: none yet)
    interval: int = RETRY_EVERY  # steps between retries of the other count
    next_retry: int = 0  # the step (``steps``) of the next retry

    def estimate(self, threads: int) -> float:
        return statistics.median(self.seconds[threads])

    def measured(self, threads: int) -> bool:
        return len(self.seconds.get(threads, ())) >= SAMPLES


class DecodeThreads:
    """The thread count of each small decode step (module docstring). Engine thread only."""

    def __init__(
        self,
        pinned: int | None,
        most: int,
        clock: Callable[[], float] = time.perf_counter,
        retry_every: int = RETRY_EVERY,
        max_retry_every: int = MAX_RETRY_EVERY,
    ) -> None:
        """``pinned``: a fixed count (None: ``auto``); ``most``: the count ``auto`` tries beside
        one (PyTorch's threads)."""
        self.pinned = pinned
        self.candidates = (1,) if most <= 1 else (1, most)
        self.clock = clock
        self.retry_every, self.max_retry_every = retry_every, max_retry_every
        self.current = pinned or 1  # the count the last small step ran on
        self._rows: dict[int, _Rows] = {}

    @classmethod
    def from_env(cls, most: int) -> DecodeThreads:
        return cls(parse(os.environ.get(ENV)), most)

    def choose(self, rows: int) -> int:
        """The count to run the next step of ``rows`` rows on."""
        if self.pinned is not None or len(self.candidates) == 1:
            return self.pinned or 1
        state = self._rows.setdefault(rows, _Rows())
        state.steps += 1
        unmeasured = [n for n in self.candidates if not state.measured(n)]
        if unmeasured:  # warming up, or not timed enough yet: run it
            return unmeasured[0]
        best = min(self.candidates, key=state.estimate)
        if best != state.best:  # a new choice: try the other again soon
            state.best, state.interval = best, self.retry_every
            state.next_retry = state.steps + self.retry_every
        if state.steps >= state.next_retry:
            state.next_retry = state.steps + state.interval  # (``record`` sets the next interval)
            return next(n for n in self.candidates if n != best)
        return best

    def record(self, rows: int, threads: int, seconds: float) -> None:
        """A step of ``rows`` rows took ``seconds`` on ``threads`` threads."""
        if self.pinned is not None or len(self.candidates) == 1:
            return
        state = self._rows.setdefault(rows, _Rows())
        state.runs[threads] = runs = state.runs.get(threads, 0) + 1
        if runs <= WARM_UP:
            return
        if state.best and threads != state.best:  # a retry: back off unless it was faster
            faster = seconds < state.estimate(state.best)
            state.interval = self.retry_every if faster else min(2 * state.interval, self.max_retry_every)
            state.next_retry = state.steps + state.interval
        state.seconds.setdefault(threads, deque(maxlen=WINDOW)).append(seconds)

    @contextlib.contextmanager
    def step(self, rows: int) -> Iterator[int]:
        """Choose the count for a step of ``rows`` rows, yield it, and time the step."""
        threads = self.current = self.choose(rows)
        start = self.clock()
        yield threads
        self.record(rows, threads, self.clock() - start)

    def describe(self) -> dict[str, object]:
        """``/info``'s view: the setting, the count the last small step ran on, and the estimates
        (milliseconds per step, by row count and thread count)."""
        return {
            "setting": "auto" if self.pinned is None else self.pinned,
            "threads": self.current,
            "step_ms": {
                str(rows): {str(n): round(state.estimate(n) * 1e3, 2) for n in sorted(state.seconds)}
                for rows, state in sorted(self._rows.items())
            },
        }
