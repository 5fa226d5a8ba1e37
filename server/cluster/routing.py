"""Where the ingress sends a request, and which adapter ids it names (pure functions, no Ray)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

from server.api.named_adapters import COMPOSITION_PREFIX, is_composition_id, json_object, merged_adapters
from server.api.named_adapters import requested_adapters as adapter_names
from server.api.routes import Target, rule_for

__all__ = ["COMPOSITION_PREFIX", "Target", "adapter_names", "affinity_key", "composition_key", "target_of"]

Version = tuple[str, str]  # (sha256 of the weights, sha256 of the config): one version of an adapter


def target_of(method: str, path: str) -> Target:
    """``store``: adapter management (one store for the cluster); ``replica``: everything that needs
    the model (generation, OpenAI routes, analysis, /info); ``unsupported``: shrink (see README).
    Read from the route table (``server.api.routes``)."""
    return rule_for(method, path).cluster


def composition_key(body: bytes, versions: Mapping[str, Version | None]) -> str | None:
    """The affinity key of a ``parameters.merged_adapters`` request: ``merged:`` and 16 hex digits
    of a sha256 of the composition as sent and the current version of each source; None for a
    request without one, or with a source the store does not hold (the replica answers 404).

    Requests for the same composition go to the replicas that already composed it (its cached
    virtual adapter, its slot); a replaced source changes the key, so the old one ages out.
    """
    merged = merged_adapters(json_object(body))
    ids = merged.get("ids") if merged is not None else None
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        return None
    sources = [versions.get(i) for i in ids]
    if any(v is None for v in sources):
        return None
    payload = json.dumps({"merged_adapters": merged, "versions": sources}, sort_keys=True, default=str)
    return COMPOSITION_PREFIX + hashlib.sha256(payload.encode()).hexdigest()[:16]


def is_composition_key(model_id: str) -> bool:
    return is_composition_id(model_id)


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
