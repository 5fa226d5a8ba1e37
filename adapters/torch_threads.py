"""One OpenMP team in the process: the engine thread's. Every other thread runs PyTorch on one.

PyTorch's CPU ops run their parallel parts on OpenMP (libgomp, in the wheels PyTorch ships for
Linux). libgomp gives each thread that opens a parallel region a team of worker threads of its
own, kept until that thread exits, and it counts them all: while the process holds more OpenMP
threads than CPUs, every worker waits at a region's end by spinning only ~100 rounds (its
"throttled" spin count, which ``OMP_WAIT_POLICY`` and ``GOMP_SPINCOUNT`` leave at 100 or 1000)
before it sleeps on a futex. Then each of the engine's parallel ops pays a wake-up. One other
team was enough on the 2-core machine: the thread that loaded the model (an executor thread that
lives on), a slot loader's thread after its first cold adapter, a worker that ran an analysis.
Measured there: a 300k-element ``mul`` from 19 µs to 66-80 µs per call on the engine thread,
and a batch-16 decode step of the embedded model from 46 ms to 66-74 ms.

So (``server/app.py``): the model loads on a thread that ends when the load is done
(:func:`in_passing_thread`, taking its team with it), the event loop's thread and the worker
threads that run the API's blocking work (uploads, analysis, composition, source fetches, slot
staging) run PyTorch on one thread (:func:`confine_this_thread`, :func:`one_thread_pool`), and
the engine thread alone uses PyTorch's thread count. Those workers' ops are small or
off the serving path; on 2 cores a second thread for them would take the engine's core anyway.

Where PyTorch does not use libgomp (another OpenMP runtime, or none) these are no-ops beside
their threads.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import functools
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ParamSpec, TypeVar

import torch

T = TypeVar("T")
P = ParamSpec("P")

MAPS = Path("/proc/self/maps")


@functools.cache
def _libgomp() -> ctypes.CDLL | None:
    """The libgomp this process has loaded (PyTorch's own copy), or None when none is loaded."""
    try:
        paths = {
            line.split()[-1] for line in MAPS.read_text().splitlines() if "libgomp" in line.rsplit("/", 1)[-1]
        }
    except OSError:
        return None
    paths = {path for path in paths if path.startswith("/")}
    if not paths:
        return None
    # PyTorch's own copy first, should the process hold another
    path = min(paths, key=lambda p: ("/torch/" not in p, p))
    try:
        return ctypes.CDLL(path)  # already loaded: dlopen returns it, and it stays loaded
    except OSError:
        return None


def confine_this_thread(threads: int = 1) -> int:
    """PyTorch's ops on the calling thread run on ``threads`` threads (1: it opens no OpenMP
    team); returns the count it had, to restore later.

    Only this thread's count changes (OpenMP's per-thread ``nthreads``), not the default that
    ``torch.set_num_threads`` sets for threads still to start, so the engine thread keeps its own.
    PyTorch sets a thread's count on its first parallel op; ``torch.get_num_threads()`` makes
    that happen first, so it cannot undo this later."""
    before = torch.get_num_threads()
    gomp = _libgomp()
    if gomp is not None:
        gomp.omp_set_num_threads(threads)
    return before


@contextlib.contextmanager
def confined_thread() -> Iterator[None]:
    """The calling thread confined (:func:`confine_this_thread`) for the block, its count restored
    after (the server's event-loop thread, which in tests is often the test's own)."""
    before = confine_this_thread()
    try:
        yield
    finally:
        confine_this_thread(before)


def confined(fn: Callable[P, T]) -> Callable[P, T]:
    """``fn`` called on a confined thread (for pools that take no initializer: anyio's)."""

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        confine_this_thread()
        return fn(*args, **kwargs)

    return call


def one_thread_pool(
    max_workers: int | None, thread_name_prefix: str
) -> concurrent.futures.ThreadPoolExecutor:
    """A thread pool whose threads run PyTorch on one thread each (see the module's docstring)."""
    return concurrent.futures.ThreadPoolExecutor(
        max_workers, thread_name_prefix=thread_name_prefix, initializer=confine_this_thread
    )


def in_passing_thread(fn: Callable[[], T], name: str) -> T:
    """``fn()`` on a new thread that ends when it returns (its OpenMP team, if it opened one, ends
    with it); its result is returned and its exception raised here."""
    results: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(fn())
        except BaseException as exc:  # re-raised on the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=run, name=name)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]
