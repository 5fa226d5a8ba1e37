"""Graceful shutdown: on SIGTERM stop admitting, let running requests finish, then exit 0.

Uvicorn on its own closes the listening socket at the first SIGTERM (new clients get
"connection refused", indistinguishable from a crash), and after shutting down it re-raises
the signal, so the process ends killed by SIGTERM rather than with status 0. loraplex drains
instead:

1. the first SIGTERM (or SIGINT) starts the drain: the port stays open, and every new request
   but ``/health`` and ``/metrics`` gets ``503`` (``error_type`` ``shutting_down``) with
   ``Retry-After``; ``/health`` answers 503 ``{"status": "draining"}`` so balancers move away;
2. requests that were running when the drain began (streams too, to their last byte) go on,
   for at most ``--shutdown-timeout`` seconds;
3. then uvicorn shuts down (whatever still runs is cancelled), the engine stops, the store
   closes, and the process exits 0. A second signal skips the wait.

This module imports no model code (no torch).
"""

from __future__ import annotations

import logging
import time
from types import FrameType

import uvicorn
from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.errors import ApiError, shutting_down

log = logging.getLogger(__name__)

DRAIN_RETRY_AFTER_SECONDS = 5  # a restart, or another replica, should be there by then
ALWAYS_OPEN = frozenset({"/health", "/metrics"})  # answered during the drain too (health says so)
CANCEL_GRACE_SECONDS = 2.0  # after the timeout: how long cancelled requests get to close


class Drain:
    """Whether the server is draining, and how many requests that were admitted still run.

    Lock-free on purpose: every method runs on the event loop's thread, and :meth:`begin` runs
    in the signal handler, which Python also runs on that thread, between two bytecodes of
    whatever the loop was doing. A lock held there would deadlock; plain attribute writes
    cannot tear.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.draining = False
        self.started_at: float | None = None
        self.in_flight = 0

    def begin(self) -> None:
        """Stop admitting; the requests in flight now are the ones waited for."""
        if not self.draining:
            self.started_at = time.monotonic()
            self.draining = True

    def enter(self) -> bool:
        """Count a request that arrives; False (not counted) when the server is draining."""
        if self.draining:
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        self.in_flight -= 1

    def finished(self) -> bool:
        """True once the requests in flight have ended."""
        return self.draining and self.in_flight == 0

    def expired(self) -> bool:
        """True once ``--shutdown-timeout`` has passed since the drain began."""
        return self.started_at is not None and time.monotonic() - self.started_at >= self.timeout

    def refusal(self) -> ApiError:
        return shutting_down(DRAIN_RETRY_AFTER_SECONDS)


class DrainMiddleware:
    """Counts every HTTP request from its arrival to its last byte (streams included)."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.drain.enter():
            await self.app(scope, receive, send)  # refused by ``refuse_while_draining``
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.leave()


def refuse_while_draining(request: Request) -> None:
    """App-wide dependency: 503 + Retry-After for requests that arrive during the drain.

    A dependency (not the middleware) answers, so the error table renders the refusal: the
    OpenAI routes get it in OpenAI's body like any other error.
    """
    drain: Drain | None = getattr(request.app.state, "drain", None)
    if drain is not None and drain.draining and request.url.path.rstrip("/") not in ALWAYS_OPEN:
        raise drain.refusal()


class DrainingServer(uvicorn.Server):
    """``uvicorn.Server`` whose first SIGTERM/SIGINT drains (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain
        self._announced = self._announced_force = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not uvicorn's: that one records the signal to re-raise it after shutdown (exit by signal).
        # A signal handler: set flags only, on_tick does the rest (and the logging).
        if self.drain.draining:
            self.should_exit = self.force_exit = True  # a second signal: stop waiting
            return
        self.drain.begin()

    async def on_tick(self, counter: int) -> bool:
        if self.drain.draining and not self.should_exit:
            if not self._announced:
                self._announced = True
                log.info(
                    "shutdown signal: draining; new requests get 503, %d running request(s) get up to %g s "
                    "(--shutdown-timeout)",
                    self.drain.in_flight,
                    self.drain.timeout,
                )
            if self.drain.finished():
                log.info("drained: every running request finished; shutting down")
                self.config.timeout_graceful_shutdown = CANCEL_GRACE_SECONDS  # idle connections only
                self.should_exit = True
            elif self.drain.expired():
                log.warning(
                    "--shutdown-timeout (%g s) passed with %d request(s) still running: cancelling them",
                    self.drain.timeout,
                    self.drain.in_flight,
                )
                self.config.timeout_graceful_shutdown = CANCEL_GRACE_SECONDS
                self.should_exit = True
        elif self.force_exit and not self._announced_force:
            self._announced_force = True
            log.warning("second shutdown signal: exiting without waiting for running requests")
        return await super().on_tick(counter)
