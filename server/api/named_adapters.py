"""Which adapter ids a request names: parsed in one place, for one server and for the cluster.

A request names adapters in its JSON body (``parameters.adapter_id``, ``adapter_id``, ``model``,
the sources of ``parameters.merged_adapters``), in its path (``/adapters/{id}/...``, by the route
table) and in compare's ``?a=&b=``. :func:`requested_adapters` lists them all, most specific first;
``server.api.deps.get_adapter_scope`` resolves and holds them for a request, and the Ray ingress
(``server.cluster.routing``) syncs them to a replica. Names that are not stored adapters (an OpenAI
``model`` naming the base) are harmless: the route answers as it would for any unknown id.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from adapters.compose import MAX_SOURCES
from server.api.routes import path_adapter

COMPOSITION_PREFIX = "merged:"  # ids of composed (virtual) adapters: ':' is never in a stored id


def is_composition_id(adapter_id: str) -> bool:
    return adapter_id.startswith(COMPOSITION_PREFIX)


def json_object(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None (validation answers every other body)."""
    try:
        data: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def merged_adapters(data: dict[str, Any] | None) -> dict[str, Any] | None:
    """The body's ``parameters.merged_adapters`` object, if it has one (not validated here)."""
    params = data.get("parameters") if data is not None else None
    merged = params.get("merged_adapters") if isinstance(params, dict) else None
    return merged if isinstance(merged, dict) else None


def _merged_ids(data: dict[str, Any]) -> list[str]:
    """The composition's source ids; at most ``MAX_SOURCES`` (a longer list is a 422 anyway, and
    this runs before validation: it must not make a request pin or fetch unboundedly many)."""
    merged = merged_adapters(data)
    ids = merged.get("ids") if merged is not None else None
    if not isinstance(ids, list):
        return []
    return [i for i in ids[:MAX_SOURCES] if isinstance(i, str) and i]


def body_adapters(data: dict[str, Any] | None) -> list[str]:
    """Every adapter id a JSON body names: ``parameters.adapter_id``, ``adapter_id``, ``model``,
    then the sources of ``parameters.merged_adapters`` (a composition needs them all)."""
    if data is None:
        return []
    params = data.get("parameters")
    candidates = [
        params.get("adapter_id") if isinstance(params, dict) else None,
        data.get("adapter_id"),
        data.get("model"),
        *_merged_ids(data),
    ]
    return list(dict.fromkeys(c for c in candidates if isinstance(c, str) and c))


def requested_adapters(path: str, query: Mapping[str, str], body: bytes, method: str = "GET") -> list[str]:
    """Every adapter id ``method path?query`` with ``body`` names, most specific first (see above)."""
    names = body_adapters(json_object(body)) if body else []
    in_path = path_adapter(method, path)
    if in_path is not None:
        names.append(in_path)
    if path.rstrip("/") == "/adapters/compare":
        names += [query[k] for k in ("a", "b") if query.get(k)]
    return list(dict.fromkeys(names))
