"""Per-request context: the request id, the deadline, and what the metrics need to know.

``RequestContextMiddleware`` creates one :class:`RequestContext` per HTTP request and puts it in
a context variable, so code deep inside a route (``build_request``, the stream helpers, log
records) reaches it without every signature growing a parameter. Outside an HTTP request
(unit tests calling the helpers directly, benchmarks) :func:`current` returns None and the
helpers skip what needs it.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from server.metrics import Metrics


class Gate(Protocol):
    """Admission control for generation requests (``load_control.QueueGate``): takes a place for
    ``context`` or raises; declared here so that this module imports nothing of the API layer."""

    def admit(self, busy_in_engine: int, context: RequestContext) -> None: ...


BASE_LABEL = "__base__"  # the adapter label of requests for the bare base model (PEFT's reserved name)
UNRESOLVED_LABEL = "__unknown__"  # refused before the adapter was resolved (auth, validation, 404)


@dataclass
class RequestContext:
    request_id: str
    route: str
    started: float  # time.perf_counter() when the request arrived
    deadline: float | None = None  # perf_counter() past which a generation is cancelled (504)
    timeout: float | None = None  # the --request-timeout behind ``deadline``, for messages
    metrics: Metrics | None = None  # set on generation routes only
    gate: Gate | None = None  # admission control (--max-queue), generation routes only
    admitted: bool = False  # holds one of the gate's places until the response ends
    adapter_label: str = UNRESOLVED_LABEL
    tenant: str = "-"  # who called: a tenant's id, _admin or _default (server.api.tenancy); '-' before auth
    tenant_id: str | None = None  # a tenant's id when a tenant's key called (its quotas apply)
    outcome_status: int | None = None  # a stream's real outcome (499, 500, 504) under its 200
    on_close: list[Callable[[], None]] = field(default_factory=list)  # run when the response ends

    def note_adapter(self, adapter_id: str | None) -> None:
        self.adapter_label = adapter_id or BASE_LABEL


_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "loraplex_request_context", default=None
)


def current() -> RequestContext | None:
    return _current.get()


def activate(context: RequestContext) -> contextvars.Token:
    return _current.set(context)


def deactivate(token: contextvars.Token) -> None:
    _current.reset(token)


def shown_adapter_id(adapter_id: str | None) -> str | None:
    """An adapter id as the current caller names it: a tenant sees its own ``acme~bot`` as ``bot``
    (``adapters.tenants``); everyone else, and code outside a request, the stored id."""
    context = _current.get()
    if adapter_id is None or context is None or context.tenant_id is None:
        return adapter_id
    owner, sep, name = adapter_id.partition("~")
    return name if sep and owner == context.tenant_id else adapter_id


def current_request_id() -> str | None:
    context = _current.get()
    return context.request_id if context is not None else None
