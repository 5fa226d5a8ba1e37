"""Where the ingress sends a request, and which adapter ids it names (pure functions, no Ray)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

from server.api.deps import _named_adapters

Target = Literal["health", "metrics", "store", "replica", "unsupported"]

_ADAPTER = re.compile(r"^/adapters/([^/]+)$")
_ADAPTER_SUB = re.compile(r"^/adapters/([^/]+)/([^/]+)$")


def target_of(method: str, path: str) -> Target:
    """``store``: adapter management (one store for the cluster); ``replica``: everything that needs
    the model (generation, OpenAI routes, analysis, /info); ``unsupported``: shrink (see README)."""
    if path == "/health":
        return "health"
    if path == "/metrics":
        return "metrics"
    if path == "/adapters":
        return "store"
    single = _ADAPTER.match(path)
    if single is not None:
        return "replica" if single.group(1) == "compare" else "store"
    sub = _ADAPTER_SUB.match(path)
    if sub is not None:
        if sub.group(2) == "download":
            return "store"
        if sub.group(2) == "shrink" and method == "POST":
            return "unsupported"
    return "replica"


def adapter_names(path: str, query: Mapping[str, str], body: bytes) -> list[str]:
    """Every adapter id a replica-bound request may name, most specific first: the JSON body's
    ``parameters.adapter_id``, ``adapter_id`` or ``model``; ``/adapters/{id}/...``; ``?a=&b=`` of compare.

    Names that are not stored adapters (an OpenAI ``model`` naming the base) are harmless: the
    store describes them as absent and the replica's app answers as one server would.
    """
    names = _named_adapters(body)
    sub = _ADAPTER_SUB.match(path)
    if sub is not None:
        names.append(sub.group(1))
    if path == "/adapters/compare":
        names += [query[k] for k in ("a", "b") if query.get(k)]
    return list(dict.fromkeys(names))
