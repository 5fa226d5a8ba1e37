"""Load control: at most ``--max-queue`` generation requests in flight, past it 429 with Retry-After."""

from __future__ import annotations

import threading

from server.api.context import RequestContext, current
from server.api.errors import ApiError

RETRY_AFTER_SECONDS = 1


class QueueGate:
    """At most ``max_queue`` generation requests in flight; past it, 429 with ``Retry-After``.

    Counted at the API layer, from admission (in ``build_request``) to the last byte of the
    response, so a burst that arrives before any request reaches the engine is still bounded;
    the engine's own running + waiting count is checked too.
    """

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self.in_flight = 0
        self._lock = threading.Lock()

    def admit(self, busy_in_engine: int, context: RequestContext) -> None:
        if context.admitted:
            return
        with self._lock:
            if max(self.in_flight, busy_in_engine) >= self.max_queue:
                raise ApiError(
                    429,
                    f"the server is busy: {self.max_queue} requests are running or waiting (--max-queue); "
                    f"retry in {RETRY_AFTER_SECONDS} s.",
                    "overloaded",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
                )
            self.in_flight += 1
        context.admitted = True
        context.on_close.append(self._leave)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1


def admit_generation(busy_in_engine: int) -> None:
    """Take a place in the queue for the current HTTP request (no-op outside one)."""
    context = current()
    if context is not None and context.gate is not None:
        context.gate.admit(busy_in_engine, context)
