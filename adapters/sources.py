"""Adapter sources: where the server looks for an adapter that is not stored (``--adapter-source``).

A request naming an id the local store lacks searches the sources in order, each an S3 (or
S3-compatible) location ``s3://BUCKET/PREFIX``, for ``PREFIX/<id>/adapter_config.json`` and
``PREFIX/<id>/adapter_model.safetensors``. The two objects are read with the upload path's own
reader (:func:`adapters.archive.read_parts`, same size limit) and stored with
:meth:`AdapterStore.put` (same validation against the base model), so a fetched adapter passes
exactly the checks of an upload; the store then keeps it as a local cache and serves it.

Each fetched adapter remembers its *origin* (source, the two objects' ETags, the weights'
sha256, the store version it became) in ``<data_dir>/sources.sqlite3``. With a refresh period
(``--adapter-source-refresh``) a use of the adapter after that period re-checks the ETags (two
HEAD requests); a changed object is fetched and stored as a new store version, so requests that
already resolved the old version finish on it and later ones get the new one (versions are
``id@version`` everywhere: slots, host cache, prefix cache). When the source cannot be reached at
refresh time the cached version keeps being served (logged).

What a request gets: not in any source -> :class:`UnknownAdapter` (404); invalid files ->
:class:`AdapterError` (422, the upload's messages); a source that cannot be reached (network,
credentials, bucket) -> :class:`SourceUnavailable` (503, with the reason). An id that was uploaded
(not fetched) is never overwritten by a source.

The S3 client is boto3's, configured the standard AWS way (environment, ``~/.aws`` files, instance
roles; ``AWS_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3`` for MinIO and other S3-compatible stores).
All of this blocks: callers run :meth:`AdapterSources.ensure` in a worker thread
(:meth:`AdapterSources.aensure` uses a small pool of its own, so a slow source never starves the
threads other requests read adapters with).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from adapters.archive import AdapterFiles, read_parts
from adapters.errors import (
    AdapterError,
    AdapterExists,
    ArchiveError,
    SourceConflict,
    SourceUnavailable,
    UnknownAdapter,
)
from adapters.index import AdapterRecord
from adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE
from adapters.store import AdapterStore, sha256_hex
from adapters.torch_threads import one_thread_pool

log = logging.getLogger(__name__)

SOURCES_FILE = "sources.sqlite3"
S3_URI_RE = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(?P<prefix>.*))?$")
FETCH_THREADS = 4  # concurrent fetches; other requests never wait on these threads
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
MAX_ATTEMPTS = 2  # botocore's "standard" retries: one retry of a throttled or failed call
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}


# --------------------------------------------------------------------------- locations


@dataclass(frozen=True)
class S3Location:
    """``s3://BUCKET/PREFIX``: adapters live under ``PREFIX/<id>/``."""

    bucket: str
    prefix: str  # no leading or trailing '/'; may be empty

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        match = S3_URI_RE.match(uri.strip())
        if match is None:
            raise ValueError(
                f"adapter source {uri!r} is not an S3 location: write s3://BUCKET or s3://BUCKET/PREFIX "
                "(a bucket name of 3-63 lower-case letters, digits, '.' and '-')."
            )
        return cls(match["bucket"], (match["prefix"] or "").strip("/"))

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def key(self, adapter_id: str, name: str) -> str:
        return "/".join(p for p in (self.prefix, adapter_id, name) if p)


@dataclass(frozen=True)
class Fetched:
    """An adapter's two files as read from a source, with the ETags they had."""

    files: AdapterFiles
    config_etag: str
    weights_etag: str


class SourceClient(Protocol):
    """What :class:`AdapterSources` asks of one source (an S3 location, or a fake in tests)."""

    uri: str

    def etags(self, adapter_id: str) -> tuple[str, str] | None:
        """The ETags of the adapter's config and weights; None when the source has no such adapter."""

    def fetch(self, adapter_id: str, max_bytes: int) -> Fetched | None:
        """Read the adapter's files (at most ``max_bytes`` each); None when the source has none."""


class S3Source:
    """One ``s3://BUCKET/PREFIX`` read with boto3 (the client is made on first use and shared)."""

    def __init__(self, location: S3Location, client_factory: Callable[[], Any] | None = None) -> None:
        self.location = location
        self.uri = location.uri
        self._factory = client_factory or _default_client
        self._client: Any = None
        self._client_lock = threading.Lock()

    def _s3(self) -> Any:
        with self._client_lock:
            if self._client is None:
                try:
                    self._client = self._factory()
                except Exception as exc:  # no region, bad endpoint URL, bad profile...
                    raise self._unavailable(exc) from exc
            return self._client

    def etags(self, adapter_id: str) -> tuple[str, str] | None:
        config = self._head(adapter_id, CONFIG_FILE)
        if config is None:
            return None
        weights = self._head(adapter_id, WEIGHTS_FILE)
        if weights is None:
            raise self._no_weights(adapter_id)
        return config, weights

    def fetch(self, adapter_id: str, max_bytes: int) -> Fetched | None:
        config = self._get(adapter_id, CONFIG_FILE, max_bytes)
        if config is None:
            return None
        weights = self._get(adapter_id, WEIGHTS_FILE, max_bytes)
        if weights is None:
            raise self._no_weights(adapter_id)
        (config_body, config_etag), (weights_body, weights_etag) = config, weights
        try:  # the upload path's reader: the same names, the same size limit
            files = read_parts(
                [
                    (f"{adapter_id}/{CONFIG_FILE}", config_body),
                    (f"{adapter_id}/{WEIGHTS_FILE}", weights_body),
                ],
                max_bytes,
            )
        except ArchiveError as exc:
            raise AdapterError(
                f"adapter {adapter_id!r} in {self.uri}: {exc.message}", exc.error_type
            ) from exc
        except Exception as exc:  # the connection broke while the body was read
            raise self._unavailable(exc) from exc
        finally:
            config_body.close()
            weights_body.close()
        return Fetched(files, config_etag, weights_etag)

    def _head(self, adapter_id: str, name: str) -> str | None:
        key = self.location.key(adapter_id, name)
        try:
            return str(self._s3().head_object(Bucket=self.location.bucket, Key=key)["ETag"])
        except Exception as exc:
            if _is_missing(exc):
                return None
            raise self._unavailable(exc) from exc

    def _get(self, adapter_id: str, name: str, max_bytes: int) -> tuple[Any, str] | None:
        key = self.location.key(adapter_id, name)
        try:
            answer = self._s3().get_object(Bucket=self.location.bucket, Key=key)
        except Exception as exc:
            if _is_missing(exc):
                return None
            raise self._unavailable(exc) from exc
        size = int(answer.get("ContentLength") or 0)
        if size > max_bytes:
            answer["Body"].close()
            raise AdapterError(
                f"adapter {adapter_id!r} in {self.uri}: {name} is {size} bytes, over the upload limit of "
                f"{max_bytes} bytes (--max-upload-mb).",
                "too_large",
            )
        return answer["Body"], str(answer["ETag"])

    def _no_weights(self, adapter_id: str) -> AdapterError:
        return AdapterError(
            f"adapter {adapter_id!r} in {self.uri} has {CONFIG_FILE} but no {WEIGHTS_FILE} next to it; "
            f"put both files under {self.location.key(adapter_id, '')}.",
            "missing_file",
        )

    def _unavailable(self, exc: BaseException) -> SourceUnavailable:
        return SourceUnavailable(
            f"the adapter source {self.uri} cannot be read ({type(exc).__name__}: {exc}); check the S3 "
            "endpoint (AWS_ENDPOINT_URL), the credentials and the bucket, or retry later."
        )


def _default_client() -> Any:
    import boto3  # the s3 extra; imported only when a source is configured
    from botocore.config import Config

    config = Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
    )
    return boto3.session.Session().client("s3", config=config)


def _is_missing(exc: BaseException) -> bool:
    response = getattr(exc, "response", None)
    code = str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
    return code in _MISSING_CODES


# --------------------------------------------------------------------------- origins


@dataclass(frozen=True)
class Origin:
    """Where a stored adapter was fetched from; valid while the store still holds ``version``."""

    adapter_id: str
    version: str
    source: str
    config_etag: str
    weights_etag: str
    sha256: str
    checked_at: float  # time.time() of the last fetch or ETag check

    def summary(self) -> dict[str, str]:
        return {
            "uri": self.source,
            "config_etag": self.config_etag,
            "weights_etag": self.weights_etag,
            "sha256": self.sha256,
        }


class OriginIndex:
    """``<data_dir>/sources.sqlite3``: the origin of each fetched adapter (thread-safe)."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS origins (adapter_id TEXT PRIMARY KEY, version TEXT, source TEXT, "
            "config_etag TEXT, weights_etag TEXT, sha256 TEXT, checked_at REAL)"
        )
        rows = self._db.execute("SELECT * FROM origins").fetchall()
        self._origins = {row[0]: Origin(*row) for row in rows}

    def get(self, adapter_id: str) -> Origin | None:
        return self._origins.get(adapter_id)

    def save(self, origin: Origin) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO origins VALUES (?, ?, ?, ?, ?, ?, ?)",
                (origin.adapter_id, origin.version, origin.source, origin.config_etag,
                 origin.weights_etag, origin.sha256, origin.checked_at),
            )  # fmt: skip
            self._origins[origin.adapter_id] = origin

    def forget(self, adapter_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM origins WHERE adapter_id = ?", (adapter_id,))
            self._origins.pop(adapter_id, None)

    def close(self) -> None:
        with self._lock:
            self._db.close()


# --------------------------------------------------------------------------- the sources


@dataclass
class _IdLock:
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    users: int = 0


class AdapterSources:
    """The configured sources in order, in front of the store (see the module docstring)."""

    def __init__(
        self,
        store: AdapterStore,
        sources: list[SourceClient],
        *,
        max_bytes: int,
        refresh_seconds: float = 0.0,
        on_replaced: Callable[[AdapterRecord], None] | None = None,
    ) -> None:
        self.store = store
        self.sources = sources
        self.max_bytes = max_bytes
        self.refresh_seconds = refresh_seconds
        self.on_replaced = on_replaced  # the server frees the old version's memory slot
        self.origins = OriginIndex(store.data_dir / SOURCES_FILE)
        self.fetches = 0  # adapters (or new versions) read from a source
        self._locks: dict[str, _IdLock] = {}
        self._locks_lock = threading.Lock()
        self._pool = one_thread_pool(FETCH_THREADS, "adapter-source")  # torch_threads.py

    @classmethod
    def from_uris(cls, store: AdapterStore, uris: list[str], **options: Any) -> AdapterSources:
        """Sources read with boto3; a server started with sources and without boto3 fails to start."""
        try:
            import boto3  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(
                f"--adapter-source needs boto3 ({exc}): pip install 'loraplex[s3]' (make setup does)."
            ) from exc
        return cls(store, [S3Source(S3Location.parse(uri)) for uri in uris], **options)

    @property
    def uris(self) -> list[str]:
        return [source.uri for source in self.sources]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.origins.close()

    def origin(self, adapter_id: str) -> Origin | None:
        """Where the stored version of ``adapter_id`` came from; None for an uploaded one."""
        origin = self.origins.get(adapter_id)
        record = self.store.record(adapter_id)
        if origin is None or record is None or record.version != origin.version:
            return None  # uploaded, deleted, or replaced by an upload since it was fetched
        return origin

    async def aensure(self, adapter_id: str, *, require_source: bool = False) -> AdapterRecord | None:
        """:meth:`ensure` on this object's own threads (never blocks the event loop)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool, lambda: self.ensure(adapter_id, require_source=require_source)
        )

    def ensure(self, adapter_id: str, *, require_source: bool = False) -> AdapterRecord | None:
        """The stored record of ``adapter_id``, fetched from the sources first if needed (blocking).

        None when no source has it. ``require_source`` (``adapter_source: s3``): an id stored from
        an upload is refused (:class:`SourceConflict`) rather than served as if it came from S3.
        """
        with self._locked(adapter_id):
            record = self.store.record(adapter_id)
            if record is not None:
                origin = self.origin(adapter_id)
                if origin is None:
                    if require_source:
                        raise SourceConflict(
                            f"adapter {adapter_id!r} is stored from an upload, not fetched from an adapter "
                            "source; send adapter_source 'local' (or leave it out) to use it, or delete it "
                            "first to fetch it from S3."
                        )
                    return record
                return self._refreshed(record, origin)
            return self._fetch_new(adapter_id)

    @contextlib.contextmanager
    def _locked(self, adapter_id: str) -> Iterator[None]:
        """One fetch per id at a time; the lock is dropped with its last user (ids may be anything)."""
        with self._locks_lock:
            entry = self._locks.setdefault(adapter_id, _IdLock())
            entry.users += 1
        try:
            with entry.lock:
                yield
        finally:
            with self._locks_lock:
                entry.users -= 1
                if entry.users == 0:
                    del self._locks[adapter_id]

    def _fetch_new(self, adapter_id: str) -> AdapterRecord | None:
        unavailable: list[SourceUnavailable] = []
        for source in self.sources:
            try:
                fetched = source.fetch(adapter_id, self.max_bytes)
            except SourceUnavailable as exc:
                log.warning("adapter %s: %s", adapter_id, exc.message)
                unavailable.append(exc)
                continue  # a later source may have it
            if fetched is None:
                continue
            try:
                record = self.store.put(adapter_id, fetched.files)
            except AdapterExists:  # uploaded meanwhile: the upload wins
                return self.store.record(adapter_id)
            except AdapterError as exc:
                raise AdapterError(
                    f"adapter {adapter_id!r} from {source.uri}: {exc.message}", exc.error_type
                ) from exc
            self._remember(record, source, fetched)
            log.info("adapter %s fetched from %s as %s", adapter_id, source.uri, record.version)
            return record
        if unavailable:  # it may be in a source that could not be read: not a 404
            raise unavailable[0]
        return None

    def _refreshed(self, record: AdapterRecord, origin: Origin) -> AdapterRecord:
        """``record``, or the newer version its source now holds (after the refresh period)."""
        if self.refresh_seconds <= 0 or time.time() - origin.checked_at < self.refresh_seconds:
            return record
        source = next((s for s in self.sources if s.uri == origin.source), None)
        if source is None:  # that source is no longer configured: keep the cached copy
            return record
        try:
            etags = source.etags(record.adapter_id)
            if etags == (origin.config_etag, origin.weights_etag):
                self.origins.save(dataclasses.replace(origin, checked_at=time.time()))
                return record
            fetched = source.fetch(record.adapter_id, self.max_bytes) if etags is not None else None
        except (SourceUnavailable, AdapterError) as exc:
            log.warning("adapter %s: serving the cached %s, the re-check failed: %s",
                        record.adapter_id, record.version, exc)  # fmt: skip
            return record
        if fetched is None:
            log.warning("adapter %s is gone from %s; serving the cached %s", record.adapter_id, source.uri,
                        record.version)  # fmt: skip
            self.origins.save(dataclasses.replace(origin, checked_at=time.time()))
            return record
        try:
            new = self.store.put(record.adapter_id, fetched.files, replace=True, keep_identical=True)
        except AdapterError as exc:
            log.warning("adapter %s: the changed object in %s is invalid (%s); serving the cached %s",
                        record.adapter_id, source.uri, exc.message, record.version)  # fmt: skip
            return record
        self._remember(new, source, fetched)
        if new.key != record.key:
            log.info("adapter %s changed in %s: now %s (was %s)", record.adapter_id, source.uri, new.version,
                     record.version)  # fmt: skip
            if self.on_replaced is not None:
                self.on_replaced(record)
        return new

    def _remember(self, record: AdapterRecord, source: SourceClient, fetched: Fetched) -> None:
        self.fetches += 1
        self.origins.save(
            Origin(
                adapter_id=record.adapter_id,
                version=record.version,
                source=source.uri,
                config_etag=fetched.config_etag,
                weights_etag=fetched.weights_etag,
                sha256=sha256_hex(fetched.files.weights),
                checked_at=time.time(),
            )
        )


def not_found(adapter_id: str, uris: list[str]) -> UnknownAdapter:
    return UnknownAdapter(
        f"adapter {adapter_id!r} is neither stored on this server nor in its adapter sources ("
        + ", ".join(uris)
        + "); upload it with POST /adapters or put adapter_config.json and adapter_model.safetensors "
        f"under <prefix>/{adapter_id}/ in a source."
    )
