"""Load control: at most ``--max-queue`` generation requests in flight, past it 429 with Retry-After;
and each tenant's ``max_concurrent_requests`` and ``max_tokens_per_minute`` quotas (:class:`TenantLimits`)."""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable

from server.api.context import RequestContext, current
from server.api.errors import ApiError

RETRY_AFTER_SECONDS = 1


class QueueGate:
    """At most ``max_queue`` generation requests in flight; past it, 429 with ``Retry-After``.

    Counted at the API layer, from admission (in ``build_request``) to the last byte of the
    response, so a burst that arrives before any request reaches the engine is still bounded;
    the engine's own running + waiting count is checked too.
    """

    def __init__(self, max_queue: int, tenants: TenantLimits | None = None) -> None:
        self.max_queue = max_queue
        self.in_flight = 0
        self._lock = threading.Lock()
        self.tenants = tenants or TenantLimits()

    def admit(self, busy_in_engine: int, context: RequestContext, prompt_tokens: int = 0) -> None:
        if context.admitted:
            return
        self.tenants.admit(context, prompt_tokens)  # first: a tenant over its quota takes no place here
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


def admit_generation(busy_in_engine: int, prompt_tokens: int = 0) -> None:
    """Take a place in the queue for the current HTTP request (no-op outside one)."""
    context = current()
    if context is not None and context.gate is not None:
        context.gate.admit(busy_in_engine, context, prompt_tokens)


WINDOW_SECONDS = 60.0


class TenantLimits:
    """Each tenant's running requests and its tokens of the last minute, against its quotas.

    One short lock over counters: a tenant at its limit is refused in O(1) and never takes a
    ``--max-queue`` place, so it cannot slow another tenant's admission. Tokens per minute counts a
    request's prompt tokens when it is admitted and its generated tokens when it finishes, over a
    sliding 60 s window; a request is refused while the window already holds the quota (one
    running request may overshoot it, by at most its own tokens).
    """

    def __init__(self, quotas: Callable[[str], object | None] | None = None) -> None:
        self._lock = threading.Lock()
        self._running: Counter[str] = Counter()
        self._tokens: dict[str, deque[tuple[float, int]]] = {}
        self.quotas = quotas or (lambda tenant_id: None)  # tenant id -> its Tenant (None: deleted)
        # every token counted here is also passed on (a cluster replica: to the store deployment,
        # whose TenantLimits counts the whole cluster's; server/cluster/replica.py)
        self.on_charge: Callable[[str, int], None] | None = None

    def admit(self, context: RequestContext, prompt_tokens: int) -> None:
        """Take one of the caller's tenant's running places (429 past its quotas) until the request ends."""
        tenant_id = context.tenant_id
        if tenant_id is not None and self.take(tenant_id, prompt_tokens):
            context.on_close.append(lambda: self.leave(tenant_id))

    def take(self, tenant_id: str, prompt_tokens: int = 0) -> bool:
        """One running place for ``tenant_id``: False when it has no quotas (nothing taken), True when
        taken (give it back with :meth:`leave`); an ``ApiError`` 429 naming the quota when refused."""
        tenant = self.quotas(tenant_id)
        if tenant is None:
            return False
        concurrent = getattr(tenant, "max_concurrent_requests", None)
        per_minute = getattr(tenant, "max_tokens_per_minute", None)
        now = time.monotonic()
        with self._lock:
            if concurrent is not None and self._running[tenant_id] >= concurrent:
                raise _quota_error(
                    f"tenant {tenant_id!r} has {self._running[tenant_id]} requests running, its "
                    f"max_concurrent_requests quota; retry when one ends (in {RETRY_AFTER_SECONDS} s).",
                    RETRY_AFTER_SECONDS,
                )
            if per_minute is not None:
                used = self._used(tenant_id, now)
                if used >= per_minute:
                    wait = self._wait(tenant_id, now, used - per_minute + 1)
                    raise _quota_error(
                        f"tenant {tenant_id!r} used {used} tokens in the last minute, its max_tokens_per_minute "
                        f"quota is {per_minute}; retry in {wait} s.",
                        wait,
                    )
            self._running[tenant_id] += 1
        self.charge_tenant(tenant_id, prompt_tokens)
        return True

    def charge(self, context: RequestContext, tokens: int) -> None:
        """Count ``tokens`` more (a finished request's generated tokens) for the caller's tenant."""
        if context.tenant_id is not None:
            self.charge_tenant(context.tenant_id, tokens)

    def charge_tenant(self, tenant_id: str, tokens: int) -> None:
        if tokens <= 0:
            return
        with self._lock:
            self._tokens.setdefault(tenant_id, deque()).append((time.monotonic(), tokens))
        if self.on_charge is not None:
            self.on_charge(tenant_id, tokens)

    def usage(self, tenant_id: str) -> dict[str, int]:
        """What ``/info`` shows of a tenant: running requests and tokens of the last minute."""
        with self._lock:
            return {
                "running_requests": self._running[tenant_id],
                "tokens_last_minute": self._used(tenant_id, time.monotonic()),
            }

    def leave(self, tenant_id: str) -> None:
        with self._lock:
            self._running[tenant_id] -= 1
            if self._running[tenant_id] <= 0:
                del self._running[tenant_id]

    def _used(self, tenant_id: str, now: float) -> int:
        window = self._tokens.get(tenant_id)
        if not window:
            return 0
        while window and window[0][0] <= now - WINDOW_SECONDS:
            window.popleft()
        return sum(n for _, n in window)

    def _wait(self, tenant_id: str, now: float, excess: int) -> int:
        """Seconds until ``excess`` tokens have left the window."""
        freed = 0
        for at, n in self._tokens.get(tenant_id, ()):
            freed += n
            if freed >= excess:
                return max(1, math.ceil(at + WINDOW_SECONDS - now))
        return math.ceil(WINDOW_SECONDS)


def _quota_error(message: str, retry_after: int) -> ApiError:
    return ApiError(429, message, "quota_exceeded", headers={"Retry-After": str(retry_after)})
