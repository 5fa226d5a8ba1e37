"""POST /adapters (upload), GET /adapters, GET /adapters/{id}, DELETE /adapters/{id}.

The 201 of an upload and ``GET /adapters/{id}`` add the adapter's screening (``coverage`` and
``warnings``, ``server.api.screening``) to its summary.

Uploads are untrusted: the body size is capped by ``UploadLimitMiddleware`` (413), archives are
read by ``adapters.archive`` (no extraction, no links, no pickles), the adapter is validated
against the base model before anything is written, and the store writes atomically. Every
refusal is ``{"error": message, "error_type": kind}``:

    400 bad adapter_id, not multipart, wrong fields     409 id exists (use ?replace=true)
    404 unknown adapter                                 413 body or unpacked archive too large
    408 body slower than --upload-timeout               422 invalid archive or adapter (AdapterError)
    503 base model still loading, or shutting down      507 disk full: nothing was stored
"""

from __future__ import annotations

import asyncio
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from starlette.datastructures import FormData, UploadFile

from adapters.archive import AdapterFiles, read_archive, read_parts
from adapters.errors import ArchiveError, InvalidAdapterId, StoreFull, StoreNotReady, is_storage_full
from adapters.index import AdapterRecord
from adapters.listing import DEFAULT_PAGE, MAX_PAGE, page
from adapters.registry import AdapterRepository
from adapters.store import check_adapter_id, check_stored_id, derive_adapter_id, sha256_hex
from server.api.deps import SettingsDep, StoreDep
from server.api.errors import ApiError, adapter_not_found
from server.api.screening import screening_of

router = APIRouter(tags=["adapters"])

_FORM_LIMITS = {"max_files": 8, "max_fields": 8}
_USAGE = (
    "send multipart/form-data with either two parts in field 'files' (adapter_config.json and "
    "adapter_model.safetensors) or one part in field 'archive' (.zip, .tar, .tar.gz, .tgz), and optionally "
    "a field 'adapter_id'."
)
_UPLOAD_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "minItems": 2,
                            "maxItems": 2,
                            "description": "adapter_config.json and adapter_model.safetensors",
                        },
                        "archive": {
                            "type": "string",
                            "format": "binary",
                            "description": ".zip/.tar/.tar.gz/.tgz, the two files at its root or in one folder",
                        },
                        "adapter_id": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"},
                    },
                    # exactly one of the two ways to send an adapter (_read_upload: else 400)
                    "oneOf": [{"required": ["files"]}, {"required": ["archive"]}],
                    "additionalProperties": False,
                }
            }
        },
    }
}
AdapterIdPath = Annotated[str, Path(description="Adapter id.")]


@router.post("/adapters", status_code=201, openapi_extra=_UPLOAD_OPENAPI)
async def upload_adapter(
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    replace: Annotated[bool, Query(description="Replace an existing adapter with this id.")] = False,
) -> JSONResponse:
    """Upload a PEFT LoRA adapter; 201 with its summary."""
    if not store.ready:
        raise StoreNotReady(
            "the base model is still loading (uploads are validated against it); retry shortly."
        )
    form = await _read_form(request)
    try:
        adapter_id = _form_adapter_id(form)
        if adapter_id is not None:
            store.check_can_put(adapter_id, replace=replace)
        files = await asyncio.to_thread(_read_upload, form, settings.max_upload_mb << 20)
        if adapter_id is None:
            adapter_id = derive_adapter_id(files.name, sha256_hex(files.weights))
        record = await asyncio.to_thread(store.put, adapter_id, files, replace=replace)
    finally:
        await form.close()
    payload = {**record.summary(), **await screening_of(request, store, record.adapter_id)}
    return JSONResponse(payload, status_code=201, headers={"Location": f"/adapters/{record.adapter_id}"})


@router.get("/adapters")
async def list_adapters(
    store: StoreDep,
    response: Response,
    prefix: Annotated[str, Query(max_length=64, description="Only ids that start with this.")] = "",
    limit: Annotated[
        int | None, Query(ge=1, le=MAX_PAGE, description="Page size; with it (or cursor) the list is paged.")
    ] = None,
    cursor: Annotated[
        str | None, Query(max_length=128, description="X-Next-Cursor of the previous page (opaque).")
    ] = None,
) -> list[dict]:
    """Summaries of the stored adapters, by id. Paged when ``limit`` or ``cursor`` is given: the
    body stays a list, and ``X-Next-Cursor`` (and a ``Link: rel="next"``) is set while more remain."""
    paged = limit is not None or cursor is not None
    chosen = page(
        store.records(), prefix=prefix, cursor=cursor, limit=(limit or DEFAULT_PAGE) if paged else None
    )
    if chosen.next_cursor is not None:
        query = urlencode(
            {
                "limit": limit or DEFAULT_PAGE,
                "cursor": chosen.next_cursor,
                **({"prefix": prefix} if prefix else {}),
            }
        )
        response.headers["X-Next-Cursor"] = chosen.next_cursor
        response.headers["Link"] = f'</adapters?{query}>; rel="next"'
    return [record.summary() for record in chosen.records]


@router.get("/adapters/{adapter_id}")
async def get_adapter(adapter_id: AdapterIdPath, store: StoreDep, request: Request) -> dict:
    summary = stored_record(store, adapter_id).summary()
    sources = getattr(request.app.state, "sources", None)
    origin = sources.origin(adapter_id) if sources is not None else None
    if origin is not None:  # fetched from an adapter source: where from, and its objects' versions
        summary["source"] = origin.summary()
    return {**summary, **await screening_of(request, store, adapter_id)}


@router.delete("/adapters/{adapter_id}", status_code=204)
async def delete_adapter(adapter_id: AdapterIdPath, store: StoreDep) -> Response:
    """Delete now for new requests; running ones finish, and the files go when the last one ends."""
    stored_record(store, adapter_id)
    await asyncio.to_thread(store.delete, adapter_id)  # the store's retire event frees its slot
    return Response(status_code=204)


def stored_record(store: AdapterRepository, adapter_id: str) -> AdapterRecord:
    """The current record of ``adapter_id``: 400 for an invalid id, 404 for an unknown one (a tenant
    naming another tenant's ``acme~bot`` gets the 404 of an id that does not exist)."""
    check_stored_id(adapter_id)
    record = store.record(adapter_id)
    if record is None:
        raise adapter_not_found(adapter_id)
    return record


async def _read_form(request: Request) -> FormData:
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(
            400, f"POST /adapters got content-type {content_type or 'none'!r}; {_USAGE}", "invalid_multipart"
        )
    try:
        return await request.form(**_FORM_LIMITS)
    except Exception as exc:  # malformed multipart, too many parts, client gone (413 overrides the answer)
        if is_storage_full(exc) or is_storage_full(exc.__cause__ or exc.__context__ or exc):
            raise StoreFull(
                "the server's disk is full: the upload could not be received and nothing of it was kept; "
                "the operator must free space (the temporary directory and --data-dir), then upload again."
            ) from exc
        detail = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
        raise ApiError(
            400, f"the body is not valid multipart/form-data ({detail}); {_USAGE}", "invalid_multipart"
        ) from exc


def _form_adapter_id(form: FormData) -> str | None:
    values = form.getlist("adapter_id")
    if not values:
        return None
    if len(values) > 1 or not isinstance(values[0], str):
        raise InvalidAdapterId("give adapter_id once, as a plain form field.")
    return check_adapter_id(values[0])


def _read_upload(form: FormData, max_bytes: int) -> AdapterFiles:
    """The adapter's two files from field 'files' or 'archive' (runs in a worker thread)."""
    unexpected = sorted(set(form.keys()) - {"files", "archive", "adapter_id"})
    if unexpected:
        raise ArchiveError(f"unexpected form field(s) {', '.join(unexpected)}; {_USAGE}", "invalid_upload")
    files, archives = form.getlist("files"), form.getlist("archive")
    parts = [*files, *archives]
    if not all(isinstance(p, UploadFile) for p in parts):
        raise ArchiveError(f"fields 'files' and 'archive' must be file parts (with a filename); {_USAGE}",
                           "invalid_upload")  # fmt: skip
    if bool(files) == bool(archives) or len(archives) > 1:
        raise ArchiveError(
            f"got {len(files)} 'files' and {len(archives)} 'archive' parts; {_USAGE}", "invalid_upload"
        )
    if archives:
        archive = archives[0]
        return read_archive(archive.file, archive.filename, max_bytes)  # type: ignore[union-attr]
    return read_parts([(p.filename, p.file) for p in files], max_bytes)  # type: ignore[union-attr]
