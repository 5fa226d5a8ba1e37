"""Pages of stored adapters by id: ``GET /adapters?prefix=&limit=&cursor=``.

Records are listed in id order, so a page is a binary search in the sorted ids plus a slice: only
the page's summaries are built and sent, whatever the number of adapters. A cursor is the last id of the previous page: pages stay consistent while adapters are added or
deleted (an adapter added behind the cursor is simply not seen by that walk). The cursor is opaque
to clients (url-safe base64 of that id), so its form may change later.
"""

from __future__ import annotations

import base64
import binascii
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

from adapters.errors import StoreError
from adapters.index import AdapterRecord
from adapters.store import ADAPTER_ID_RE

MAX_PAGE = 1000
DEFAULT_PAGE = 100


class InvalidCursor(StoreError):
    error_type = "invalid_cursor"


@dataclass(frozen=True)
class Page:
    records: list[AdapterRecord]
    next_cursor: str | None  # None: this is the last page


def encode_cursor(adapter_id: str) -> str:
    return base64.urlsafe_b64encode(adapter_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The id a cursor continues after; :class:`InvalidCursor` (400) for anything we did not hand out."""
    try:
        adapter_id = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        adapter_id = ""
    if not ADAPTER_ID_RE.match(adapter_id):
        raise InvalidCursor(
            f"cursor {cursor[:80]!r} is not one this server handed out; pass the X-Next-Cursor header of "
            "the previous page unchanged, or leave cursor out to start from the first page."
        )
    return adapter_id


def page(records: Sequence[AdapterRecord], *, prefix: str = "", cursor: str | None = None,
         limit: int | None = None) -> Page:  # fmt: skip
    """The records (sorted by id) whose id starts with ``prefix``, after ``cursor``, at most ``limit``."""
    ids = [r.adapter_id for r in records]
    start = bisect_left(ids, prefix)
    if cursor is not None:
        start = max(start, bisect_right(ids, decode_cursor(cursor)))
    end = bisect_left(ids, prefix + "\U0010ffff", lo=start) if prefix else len(ids)  # past every match
    stop = end if limit is None else min(end, start + limit)
    chosen = list(records[start:stop])
    more = stop < end and bool(chosen)
    return Page(chosen, encode_cursor(chosen[-1].adapter_id) if more else None)
