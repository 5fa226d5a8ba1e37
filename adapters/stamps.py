"""Stamps: when a stored version's files may be read without hashing them again (issue 29).

Every read of a stored version from disk (a host-cache miss) used to hash both files and compare
the digests with the ones recorded at upload before serving what it parsed: 12-24 ms of sha256 for a
rank-64 q/k/v/o adapter on the request path (more on loaded cores), on a thread beside the parse. A
**stamp** lets the store skip it for files that cannot have changed since their digest last matched:

    stamp = (size, mtime_ns, ctime_ns, inode, device) of adapter_config.json and of the weights

* A stamp is recorded (``AdapterIndex.set_stamp``) only after both files' sha256 matched the
  recorded ones, read between two ``fstat`` calls that agree, and only once the files' mtime and
  ctime lie :data:`STAMP_MARGIN_SECONDS` in the past: a write within the same clock tick as the
  stamped state would leave the mtime as it was (git's "racily clean" files), so a file stamped
  that young could hide one; it is checked again later instead.
* A read trusts the recorded digest only when the files it read, ``fstat``-ed after the read,
  still show the stamp. Any write since (data, a truncation, another file renamed into place, even
  ``utime`` putting the old mtime back, which moves the ctime) changes it: the read then hashes, as
  before, and a mismatch is ``store_corrupt``, never served.
* What no stamp can see (a disk flipping bits under an unchanged inode) is left to the background
  check: a trusted read queues a re-hash of the files at the lowest CPU priority (at most once per
  :data:`RECHECK_SECONDS` per version); a mismatch drops the stamp and the parsed adapter and retires
  the version from memory, so the next read hashes it and refuses it.

The checks run on :class:`BackgroundChecks`, one daemon thread at nice 19: new versions (stamped
NULL at commit), versions a read hashed, re-checks.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

STAMP_MARGIN_SECONDS = 2.0  # how old a file's mtime and ctime must be before its state is stamped
RECHECK_SECONDS = 600.0  # a trusted read re-hashes its files in the background at most this often
RECHECK_DELAY_SECONDS = 10.0  # ... and not before this long after the read (off the request's path)

FileStamp = tuple[int, int, int, int, int]  # size, mtime_ns, ctime_ns, inode, device
Stamp = tuple[FileStamp, FileStamp]  # the config's, the weights'


def file_stamp(st: os.stat_result) -> FileStamp:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def encode(stamp: Stamp) -> str:
    """The index's text form: ``size:mtime:ctime:inode:device`` of each file, ``;`` between them."""
    return ";".join(":".join(str(v) for v in f) for f in stamp)


def settled(stamp: Stamp, now_ns: int | None = None) -> bool:
    """True when no file of ``stamp`` was written or changed within :data:`STAMP_MARGIN_SECONDS`
    (a write now would then move its mtime or ctime away from the stamp's)."""
    now = time.time_ns() if now_ns is None else now_ns
    newest = max(max(f[1], f[2]) for f in stamp)
    return newest <= now - int(STAMP_MARGIN_SECONDS * 1e9)


def seconds_to_settle(stamp: Stamp, now_ns: int | None = None) -> float:
    """How long until :func:`settled` holds for ``stamp`` (0 when it does)."""
    now = time.time_ns() if now_ns is None else now_ns
    newest = max(max(f[1], f[2]) for f in stamp)
    return max(0.0, (newest + int(STAMP_MARGIN_SECONDS * 1e9) - now) / 1e9)


def _lowest_priority() -> None:
    """Nice 19 for the calling thread alone (Linux: a thread's id is its own scheduling entity)."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux: the thread keeps the default
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class BackgroundChecks:
    """One daemon thread at the lowest CPU priority that runs ``check(key)`` for each key at or after
    the time it was scheduled for; ``check`` returns seconds after which to run it again, or None.
    A key is queued once (scheduling it again keeps the earlier time)."""

    def __init__(self, check: Callable[[str], float | None], name: str = "adapter-stamps") -> None:
        self._check = check
        self._name = name
        self._due: dict[str, float] = {}  # key -> monotonic time it runs at
        self._heap: list[tuple[float, int, str]] = []  # (time, tie-break, key); stale entries skipped
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._running = 0
        self._closed = False
        self._thread: threading.Thread | None = None

    def schedule(self, key: str, delay: float = 0.0) -> None:
        at = time.monotonic() + max(0.0, delay)
        with self._cond:
            if self._closed or self._due.get(key, float("inf")) <= at:
                return
            self._due[key] = at
            heapq.heappush(self._heap, (at, next(self._order), key))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return len(self._due) + self._running

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until nothing is queued or running (tests); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._running or self._due:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closed = True
            self._due.clear()
            self._heap.clear()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _next(self) -> str | None:
        """The next key due (waiting for it), or None once closed. Holds the condition's lock."""
        while not self._closed:
            while self._heap and self._due.get(self._heap[0][2]) != self._heap[0][0]:
                heapq.heappop(self._heap)  # rescheduled earlier, or already run
            if self._heap and self._heap[0][0] <= time.monotonic():
                _, _, key = heapq.heappop(self._heap)
                del self._due[key]
                self._running += 1
                return key
            self._cond.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
        return None

    def _loop(self) -> None:
        _lowest_priority()
        while True:
            with self._cond:
                key = self._next()
            if key is None:
                return
            again = None
            try:
                again = self._check(key)
            except Exception:  # a check's failure must not stop the others
                log.exception("background check of %s failed", key)
            finally:
                with self._cond:
                    self._running -= 1
                    self._cond.notify_all()
            if again is not None:
                self.schedule(key, again)
