"""Where the ingress sends a request, and which adapter ids it names (pure functions, no Ray)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Literal

from server.api.deps import _json_object, _merged_adapters, _named_adapters

Target = Literal["health", "metrics", "store", "replica", "unsupported"]
Version = tuple[str, str]  # (sha256 of the weights, sha256 of the config): one version of an adapter

COMPOSITION_PREFIX = "merged:"  # affinity keys of compositions (':' is never in a stored id)

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
    ``parameters.adapter_id``, ``adapter_id`` or ``model``, the ids of ``parameters.merged_adapters``;
    ``/adapters/{id}/...``; ``?a=&b=`` of compare. The replica syncs each of them before the request.

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


def composition_key(body: bytes, versions: Mapping[str, Version | None]) -> str | None:
    """The affinity key of a ``parameters.merged_adapters`` request: ``merged:`` and 16 hex digits
    of a sha256 of the composition as sent and the current version of each source; None for a
    request without one, or with a source the store does not hold (the replica answers 404).

    Requests for the same composition go to the replicas that already composed it (its cached
    virtual adapter, its slot); a replaced source changes the key, so the old one ages out.
    """
    data = _json_object(body)
    merged = _merged_adapters(data) if data is not None else None
    ids = merged.get("ids") if merged is not None else None
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        return None
    sources = [versions.get(i) for i in ids]
    if any(v is None for v in sources):
        return None
    payload = json.dumps({"merged_adapters": merged, "versions": sources}, sort_keys=True, default=str)
    return COMPOSITION_PREFIX + hashlib.sha256(payload.encode()).hexdigest()[:16]


def is_composition_key(model_id: str) -> bool:
    return model_id.startswith(COMPOSITION_PREFIX)


def affinity_key(
    names: list[str], versions: Mapping[str, Version | None], body: bytes, chosen: str | None = None
) -> str:
    """Ray's multiplexed model id for a replica-bound request: the client's
    ``serve_multiplexed_model_id`` header if it names a stored adapter; else the composition's key
    (:func:`composition_key`); else the first stored adapter of ``names``; else ``""`` (the base
    model, or only unknown ids: any replica)."""
    stored = next((n for n in names if versions.get(n) is not None), "")
    if chosen and stored == chosen:
        return chosen
    return composition_key(body, versions) or stored
