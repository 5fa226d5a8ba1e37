"""Hand events from the engine thread to asyncio consumers, once per step.

A decode step produces one event per running row. Handing each one over with its own
``loop.call_soon_threadsafe`` wakes the event loop once per token per row (a syscall and a GIL
hand-over each, on a machine where the engine and the event loop share two cores); the outbox
collects a step's events and hands them over in one call per event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from server.engine.requests import Event

Delivery = tuple[asyncio.Queue, Event]


class Outbox:
    """Engine thread only: :meth:`sink` is called while a step runs, :meth:`flush` at its end."""

    def __init__(self) -> None:
        self._pending: dict[asyncio.AbstractEventLoop, list[Delivery]] = {}

    def sink(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Callable[[Event], None]:
        """A request sink that puts its events into ``queue`` (owned by ``loop``) at the next flush."""
        return lambda event: self._pending.setdefault(loop, []).append((queue, event))

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for loop, deliveries in pending.items():
            # a closed loop raises RuntimeError: nobody waits for these events any more
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver, deliveries)


def _deliver(deliveries: list[Delivery]) -> None:
    for queue, event in deliveries:
        queue.put_nowait(event)
