"""How many threads a small decode step's kernels run on, chosen by measurement.

A small step (a decode step of up to ``gemv_cpu.ONE_THREAD_ROWS`` rows, or a speculative verify
step of up to that many rows and ``VERIFY_ONE_THREAD_TOKENS`` tokens) streams the weights once;
the compiled kernels run it (``gemv_cpu.py``, ``quant_cpu.py``, ``native/fused_cpu.py``). On a
quiet 2-core machine two threads make the batch-1 engine step 1.77x faster (18.9 against 29.2 ms);
on a loaded one every 2-thread parallel region waits at its barrier for a descheduled thread, and
a step took 6x longer (measured, ``docs/performance.md``). Neither count is right everywhere, and
the load changes while a server runs, so ``auto`` (the default of ``LORAPLEX_DECODE_THREADS``)
times the steps with each count and runs the faster:

- one thread and all of PyTorch's (``torch.get_num_threads()`` when the runner starts) are the
  two candidates; the timings are kept per step size, the tokens in the step (a decode step's
  rows, a verify step's rows times their 1 + k tokens: every token is a row of the kernels'
  products, and a 5-token step costs more than a 1-token one whatever the threads);
- each count's first ``WARM_UP`` steps (of any size) run and are not counted (the first step
  builds the layer tables; a new count starts its OpenMP threads);
- then each size times the two counts in turn (1, n, 1, n, ...: a load that drifts meanwhile
  hits both alike) until each has ``SAMPLES`` timings, or ``WINDOW`` when their estimates are
  within ``CLOSE`` of each other (the closer they are, the more samples the choice needs, and
  the less they cost); a count whose estimate is ``CLEAR`` times the other's is not sampled
  further (on a loaded machine a 2-thread step took 10-90x a 1-thread one: three more of them
  would cost seconds), and a size not timed yet next to one with such a verdict takes that
  verdict without sampling the slow count (speculation's verify steps come in several sizes: at
  ~2.4 s a 2-thread sample under load, measured, each new size would cost that again). A count's
  estimate is the median of its last ``WINDOW`` timings (one step in many waits a whole time
  slice on a loaded machine, measured at 20x the others: one outlier decides nothing);
- then the faster estimate runs, and now and then a step runs the other (a retry), so that its
  estimate follows the load too. Retries are spaced by what they cost: a retry of a count
  ``r`` times slower than the running one costs ``r - 1`` steps' time, so the interval is
  ``(r - 1) / RETRY_COST`` steps (retries add about ``RETRY_COST`` of the time), at least
  ``MIN_RETRY_EVERY`` and at most ``MAX_RETRY_EVERY``, from the estimates of the moment: two
  counts a few percent apart are retried every few steps (cheap, and the choice between them is
  the hardest), one 30x slower every 1024. A retry faster than the running count's estimate is
  followed by another ``MIN_RETRY_EVERY`` steps later, so that a change of load is confirmed
  within a few retries (the window's median moves after ``WINDOW // 2 + 1`` of them); when the
  running count gets slower its ratio to the other drops and the retries come sooner.

A number pins the count (no timing): 1 is what the server ran before ``auto``.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

ENV = "LORAPLEX_DECODE_THREADS"
WARM_UP = 1  # each count's first steps (of any size) run and not timed
SAMPLES = 3  # timings per count before the faster is chosen ...
WINDOW = (
    5  # ... this many when the two are within CLOSE; a count's estimate: the median of its last this many
)
CLOSE = 0.10  # estimates this close (fraction of the faster) need WINDOW samples each before a choice
CLEAR = 4.0  # a count this many times slower than the other is not sampled further before the choice
RETRY_COST = 0.02  # retries of the slower count add about this fraction to the steps' time
MIN_RETRY_EVERY = 8  # the shortest interval between retries (steps of the same size)
MAX_RETRY_EVERY = 1024  # the longest


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
class _Size:
    """The timings of steps of one size (tokens in the step)."""

    steps: int = 0  # steps chosen for
    seconds: dict[int, deque[float]] = field(default_factory=dict)  # threads -> last WINDOW timings
    last: int = 0  # the count the last step of this size ran on
    best: int = 0  # the faster count since the choice (0: still sampling)
    borrowed: float = 0.0  # chosen on another size's clear verdict: its slower count's ratio
    last_retry: int = 0  # the step (``steps``) of the last retry, or of the choice
    eager: bool = False  # the last retry was faster than the running count: retry again soon

    def samples(self, threads: int) -> int:
        return len(self.seconds.get(threads, ()))

    def estimate(self, threads: int) -> float:
        return statistics.median(self.seconds[threads])

    def ratio(self, slower: int, faster: int) -> float:
        return self.estimate(slower) / max(self.estimate(faster), 1e-12)


class DecodeThreads:
    """The thread count of each small decode step (module docstring). Engine thread only."""

    def __init__(
        self,
        pinned: int | None,
        most: int,
        clock: Callable[[], float] = time.perf_counter,
        min_retry_every: int = MIN_RETRY_EVERY,
        max_retry_every: int = MAX_RETRY_EVERY,
    ) -> None:
        """``pinned``: a fixed count (None: ``auto``); ``most``: the count ``auto`` tries beside
        one (PyTorch's threads)."""
        self.pinned = pinned
        self.candidates = (1,) if most <= 1 else (1, most)
        self.clock = clock
        self.min_retry_every, self.max_retry_every = min_retry_every, max_retry_every
        self.current = pinned or 1  # the count the last small step ran on
        self._runs = dict.fromkeys(self.candidates, 0)  # steps run per count (warm-up included)
        self._sizes: dict[int, _Size] = {}

    @classmethod
    def from_env(cls, most: int) -> DecodeThreads:
        return cls(parse(os.environ.get(ENV)), most)

    def choose(self, tokens: int) -> int:
        """The count to run the next step of ``tokens`` tokens on."""
        if self.pinned is not None or len(self.candidates) == 1:
            return self.pinned or 1
        size = self._sizes.setdefault(tokens, _Size())
        size.steps += 1
        cold = [n for n in self.candidates if self._runs[n] < WARM_UP]
        if cold:  # warming up: run, not timed
            return cold[0]
        if not size.best:
            size.best = self._chosen(size) or self._borrow(tokens, size)
            if not size.best:  # still sampling: the count with fewer timings, in turn
                return min(self.candidates, key=lambda n: (size.samples(n), n == size.last))
            size.last_retry = size.steps
        if all(size.samples(n) for n in self.candidates):
            best = min(self.candidates, key=size.estimate)
            if best != size.best:  # the running count's estimate passed the other's
                size.best, size.last_retry, size.eager = best, size.steps, False
        best = size.best
        other = next(n for n in self.candidates if n != best)
        if size.steps - size.last_retry >= self._retry_every(size, other):
            size.last_retry = size.steps
            return other
        return best

    def _chosen(self, size: _Size) -> int:
        """The faster count once the samples allow a choice, else 0."""
        if any(size.samples(n) == 0 for n in self.candidates):
            return 0
        faster = min(self.candidates, key=size.estimate)
        ratio = max(size.ratio(n, faster) for n in self.candidates)
        fewest = min(size.samples(n) for n in self.candidates)
        if ratio >= CLEAR or (fewest >= SAMPLES and (ratio >= 1 + CLOSE or fewest >= WINDOW)):
            return faster
        return 0

    def _borrow(self, tokens: int, size: _Size) -> int:
        """A size without a choice, next to one where a count proved CLEAR times slower (a loaded
        machine): the same choice, without sampling the slow count here (at 20-30x a step, each
        new verify size would pay seconds); it is retried as at that size. Else 0."""
        if any(size.samples(n) for n in self.candidates):
            return 0
        verdicts = [
            (abs(t - tokens), other.best, other.ratio(n, other.best))
            for t, other in self._sizes.items()
            if other.best and all(other.samples(n) for n in self.candidates)
            for n in self.candidates
            if n != other.best
        ]
        if not verdicts:
            return 0
        _, best, ratio = min(verdicts)
        if ratio < CLEAR:
            return 0
        size.borrowed = ratio
        return best

    def _retry_every(self, size: _Size, other: int) -> int:
        """Steps from one retry of ``other`` (the slower estimate) to the next (module docstring)."""
        if size.eager:
            return self.min_retry_every
        ratio = (
            size.ratio(other, size.best) if size.samples(other) and size.samples(size.best) else size.borrowed
        )
        cost = ratio - 1  # a retry's cost, in steps of the running count
        steps = math.ceil(min(cost / RETRY_COST, self.max_retry_every) - 1e-9)  # (not 51 for 50.0000001)
        return max(self.min_retry_every, steps)

    def record(self, tokens: int, threads: int, seconds: float) -> None:
        """A step of ``tokens`` tokens took ``seconds`` on ``threads`` threads."""
        if self.pinned is not None or len(self.candidates) == 1:
            return
        self._runs[threads] = self._runs.get(threads, 0) + 1
        size = self._sizes.setdefault(tokens, _Size())
        size.last = threads
        if self._runs[threads] <= WARM_UP:
            return
        if size.best and threads != size.best and size.samples(size.best):  # a retry
            size.eager = seconds < size.estimate(size.best)  # soon again if it beat the running count
        size.seconds.setdefault(threads, deque(maxlen=WINDOW)).append(seconds)

    @contextlib.contextmanager
    def step(self, tokens: int) -> Iterator[int]:
        """Choose the count for a step of ``tokens`` tokens, yield it, and time the step."""
        threads = self.current = self.choose(tokens)
        start = self.clock()
        yield threads
        self.record(tokens, threads, self.clock() - start)

    def describe(self) -> dict[str, object]:
        """``/info``'s view: the setting, the count the last small step ran on, and the estimates
        (milliseconds per step, by tokens in the step and thread count)."""
        return {
            "setting": "auto" if self.pinned is None else self.pinned,
            "threads": self.current,
            "step_ms": {
                str(tokens): {str(n): round(size.estimate(n) * 1e3, 2) for n in sorted(size.seconds)}
                for tokens, size in sorted(self._sizes.items())
                if size.seconds
            },
        }
