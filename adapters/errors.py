"""Why an adapter or a store operation was refused: one exception per reason the client can fix.

Torch-free on purpose: the HTTP layer's error table imports these without loading model code.
"""

from __future__ import annotations

import errno


class AdapterError(ValueError):
    """An adapter that cannot be served; ``error_type`` classifies it for the HTTP layer."""

    def __init__(self, message: str, error_type: str = "invalid_adapter") -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type


class ArchiveError(AdapterError):
    """An upload whose container (parts, archive, folder) is unusable, before the adapter is parsed."""


class StoreError(Exception):
    """A store operation refused for a reason the client can fix; the API maps the class to a status."""

    error_type = "store_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidAdapterId(StoreError):
    error_type = "invalid_adapter_id"


class AdapterExists(StoreError):
    error_type = "adapter_exists"


class UnknownAdapter(StoreError):
    error_type = "adapter_not_found"


class StoreNotReady(StoreError):
    error_type = "not_ready"


class SourceNotConfigured(StoreError):
    """A request asked for an adapter source (``adapter_source``) this server was not started with."""

    error_type = "source_not_configured"


class SourceConflict(AdapterExists):
    """``adapter_source: s3`` names an id that is stored from an upload, not fetched from a source."""

    error_type = "source_conflict"


class SourceUnavailable(StoreError):
    """An adapter source (S3) could not be reached or refused access; the reason says which."""

    error_type = "source_unavailable"


class QuotaExceeded(StoreError):
    """A tenant's adapter count or storage quota (``max_adapters``, ``max_storage_mb``) would be passed."""

    error_type = "quota_exceeded"


class SharedAdapter(StoreError):
    """A tenant tried to change an adapter the admin shares with every tenant (only the admin may)."""

    error_type = "forbidden"


class UnknownTenant(StoreError):
    error_type = "tenant_not_found"


class TenantExists(StoreError):
    error_type = "tenant_exists"


class StoreFull(StoreError):
    """The disk (or quota) ran out while an upload was written; nothing of it was kept."""

    error_type = "insufficient_storage"


# errno values that mean "no room to write": no space, quota exceeded, file too large for the fs
# or for the process's RLIMIT_FSIZE
STORAGE_FULL_ERRNOS = frozenset(
    code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG) if code is not None
)


def is_storage_full(exc: BaseException) -> bool:
    """True for an OSError or SQLite error that says the disk or quota is full."""
    if isinstance(exc, OSError) and exc.errno in STORAGE_FULL_ERRNOS:
        return True
    # sqlite3.OperationalError (SQLITE_FULL) has no errno; its message is fixed by SQLite
    return type(exc).__name__ == "OperationalError" and "disk is full" in str(exc)
