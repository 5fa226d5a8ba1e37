"""How many threads a small decode step's kernels run on, chosen by measurement.

A decode step of up to ``gemv_cpu.ONE_THREAD_ROWS`` rows streams the weights once; the compiled
kernels run it (``gemv_cpu.py``, ``quant_cpu.py``, ``native/fused_cpu.py``). On a quiet 2-core
machine two threads make the batch-1 engine step 1.77x faster (18.9 against 29.2 ms); on a loaded
one every 2-thread parallel region waits at its barrier for a descheduled thread, and a step
took 6x longer (measured, ``docs/performance.md``). Neither count is right everywhere, and the
load changes while a server runs, so ``auto`` (the default of ``LORAPLEX_DECODE_THREADS``) times
the steps with each count and runs the faster:

- one thread and all of PyTorch's (``torch.get_num_threads()`` when the runner starts) are the
  two candidates; the estimates are kept per row count (1 to ``ONE_THREAD_ROWS``: a 4-row step
  costs more than a 1-row one whatever the threads);
- each candidate's first ``WARM_UP`` steps are run and not counted (the first step builds the
  layer tables), then its next one starts its estimate; later steps move it by
  ``ALPHA`` of the difference (an exponential moving average);
- then the faster estimate runs, and one step in ``RETRY_EVERY`` runs the other, moving its
  estimate by ``RETRY_ALPHA`` (larger: those samples are rare), so the choice follows the load.

A number pins the count (no timing): 1 is what the server ran before ``auto``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

ENV = "LORAPLEX_DECODE_THREADS"
WARM_UP = 1  # steps per candidate run before any is timed
ALPHA = 0.2  # how far one timed step moves its count's estimate
RETRY_EVERY = 32  # one step in this many runs the count that is not the faster
RETRY_ALPHA = 0.5  # ... and moves its estimate this far


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
    """The estimates for steps of one row count."""

    steps: int = 0  # steps chosen for
    runs: dict[int, int] = field(default_factory=dict)  # threads -> steps run (warm-up included)
    seconds: dict[int, float] = field(default_factory=dict)  # threads -> moving estimate


class DecodeThreads:
    """The thread count of each small decode step (module docstring). Engine thread only."""

    def __init__(
        self,
        pinned: int | None,
        most: int,
        clock: Callable[[], float] = time.perf_counter,
        retry_every: int = RETRY_EVERY,
    ) -> None:
        """``pinned``: a fixed count (None: ``auto``); ``most``: the count ``auto`` tries beside
        one (PyTorch's threads)."""
        self.pinned = pinned
        self.candidates = (1,) if most <= 1 else (1, most)
        self.clock = clock
        self.retry_every = retry_every
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
        untimed = [n for n in self.candidates if n not in state.seconds]
        if untimed:  # warming up, or not timed yet: run it
            return untimed[0]
        best = self._faster(state)
        if state.steps % self.retry_every == 0:
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
        estimate = state.seconds.get(threads)
        if estimate is None:
            state.seconds[threads] = seconds
            return
        retried = len(state.seconds) == len(self.candidates) and threads != self._faster(state)
        state.seconds[threads] = estimate + (RETRY_ALPHA if retried else ALPHA) * (seconds - estimate)

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
                str(rows): {str(n): round(s * 1e3, 2) for n, s in sorted(state.seconds.items())}
                for rows, state in sorted(self._rows.items())
            },
        }

    def _faster(self, state: _Rows) -> int:
        return min(state.seconds, key=state.seconds.__getitem__)
