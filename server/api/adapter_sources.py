"""A generation request's adapters, fetched from the adapter sources first when they are not stored.

``server.api.deps.get_registry`` calls :func:`fetch_named` with the ids a JSON body names, before
it pins them in host memory. LoRAX's per-request ``parameters.adapter_source`` decides where they
may come from:

    adapter_source   what happens
    (absent)         the local store, then the configured sources in order (--adapter-source)
    "local"          the local store only (no source is asked)
    "s3"             the configured S3 sources (a copy fetched earlier is the local cache);
                     400 when none is configured; 409 for an id stored from an upload
    "hub"            400: this server has no hub source (it reaches no model hub)

A missing adapter is left to the route (its 404, in its own API's terms); an invalid one is 422
and an unreachable source 503 (``adapters.sources``). The fetch runs on the sources' own threads.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from adapters.errors import SourceNotConfigured
from adapters.sources import AdapterSources, not_found
from adapters.store import ADAPTER_ID_RE

ADAPTER_SOURCES = ("local", "s3", "hub")
_BASE_ALIASES = ("tgi",)  # names that mean the base model (server.api.openai.TGI_PLACEHOLDER_MODEL)


def requested_source(data: dict[str, Any] | None) -> str | None:
    """The body's ``parameters.adapter_source`` when it is one of ours (the schema refuses others)."""
    params = data.get("parameters") if data is not None else None
    value = params.get("adapter_source") if isinstance(params, dict) else None
    return value if value in ADAPTER_SOURCES else None


async def fetch_named(request: Request, names: list[str], wanted: str | None) -> None:
    """Fetch the adapters ``names`` lists that are not stored, as ``wanted`` allows (see above)."""
    base = getattr(request.app.state, "base", None)
    await fetch_from_sources(
        getattr(request.app.state, "sources", None), names, wanted, getattr(base, "name", None)
    )


async def fetch_from_sources(
    sources: AdapterSources | None, names: list[str], wanted: str | None, base_name: str | None
) -> None:
    """:func:`fetch_named` for any holder of the sources (one server's app, the cluster's store)."""
    names = [name for name in names if _may_be_adapter(name, base_name)]
    if not names or wanted == "local":
        return
    if wanted == "hub":
        raise SourceNotConfigured(
            "adapter_source 'hub' needs a model hub, and this server has no hub source; store the "
            "adapter with POST /adapters and send adapter_source 'local', or use adapter_source 's3' "
            "with a server started with --adapter-source s3://BUCKET/PREFIX."
        )
    if sources is None:
        if wanted == "s3":
            raise SourceNotConfigured(
                "adapter_source 's3' needs an S3 source, and this server has none: start it with "
                "--adapter-source s3://BUCKET/PREFIX (or LORAPLEX_ADAPTER_SOURCE), or upload the adapter "
                "with POST /adapters and send adapter_source 'local'."
            )
        return
    for name in names:
        record = await sources.aensure(name, require_source=wanted == "s3")
        if record is None and wanted == "s3":
            raise not_found(name, sources.uris)


def _may_be_adapter(name: str, base_name: str | None) -> bool:
    """Whether a source could hold ``name``: a valid adapter id that does not name the base model."""
    return bool(ADAPTER_ID_RE.match(name)) and name not in _BASE_ALIASES and name != base_name
