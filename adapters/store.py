"""AdapterStore: stored adapters by id, composed of three pieces with one job each.

    AdapterStore ── id rules, the data-dir lock, crash repair, usage tracking, the API readers use
      ├─ AdapterIndex      (index.py)      SQLite: id -> current version, blob key, hashes, summary
      ├─ BlobBackend       (blobs.py)      the files of each version by key (local directory now)
      └─ HostCache         (host_cache.py) parsed adapters in host memory (LRU)

Layout of a local data dir (one server per data dir: ``.lock`` enforces it)::

    <data_dir>/index.sqlite3                      the index
    <data_dir>/adapters/<id>@<version>/           adapter_config.json + adapter_model.safetensors
    <data_dir>/tmp/<random>/                      uploads being written

Every write is atomic: the files are staged (written and fsynced where readers cannot see them),
committed under their key (a rename, fsynced), then the index row is written in one
transaction. Before the rename the key is marked *pending* in the index; the row's transaction
clears the mark, and the transaction that replaces or deletes a version marks the old key
pending until its files are removed. A crash at any point leaves either the old state or the
new one; start-up reconciles what a crash (or a damaged disk) can leave behind:

- staged uploads are removed (an upload that never finished);
- files without an index row whose key is pending are removed, **not re-indexed**: an upload
  whose transaction never committed (the client never got a 201) or a replaced/deleted version
  whose removal was pending; re-indexing would resurrect a deleted adapter;
- what is corrupt is **quarantined** (moved to ``<data_dir>/quarantine/`` with a REASON.txt,
  logged as a warning, listed in :attr:`AdapterStore.repairs`), and everything else is served:
  an index row whose files are missing or of the wrong size (a truncated safetensors) loses its
  row, and files no row refers to and that no write of this store left (copied in by hand, an
  index restored from a backup) are set aside rather than deleted.
- A full disk during an upload raises :class:`StoreFull` (HTTP 507) and keeps nothing of it.

Readers never reach into folders: they call :meth:`AdapterStore.get` (parsed) or
:meth:`AdapterStore.read_files` (the verified bytes).

Versions: every upload gets a new version ``v<seq>-<sha256[:8]>`` (``seq`` never repeats, it
is kept in the index), so ``LoraAdapter.key`` (``id@version``) changes on replace: the
engine's slots keep serving running requests from the old weights while new requests get
the new ones. A replaced or deleted version's folder is removed once no request tracked
with :meth:`AdapterStore.track` still uses it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import logging
import re
import sqlite3
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path

from adapters import stamps as stamp_rules
from adapters.archive import AdapterFiles
from adapters.blobs import BlobBackend, LocalBlobBackend
from adapters.errors import (
    AdapterError,
    AdapterExists,
    InvalidAdapterId,
    StoreFull,
    StoreNotReady,
    UnknownAdapter,
    is_storage_full,
)
from adapters.host_cache import HostCache
from adapters.index import INDEX_FILE, AdapterIndex, AdapterRecord
from adapters.peft_format import (
    VALUE_CHECKS,
    BaseLinearShape,
    LoraAdapter,
    build_adapter,
    load_safetensors_bytes,
    load_stored_safetensors,
    parse_adapter_config,
    read_stored_safetensors,
)
from adapters.stamps import BackgroundChecks, Stamp
from adapters.tenants import SEPARATOR, TenantTable, check_tenant_id
from adapters.torch_threads import one_thread_pool

try:  # POSIX only; elsewhere the single-server rule is not enforced
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

ADAPTER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_ID_LENGTH = 64


# --------------------------------------------------------------------------- errors


class DataDirLocked(RuntimeError):
    """Another server process already uses this data dir."""


# --------------------------------------------------------------------------- ids


def check_adapter_id(adapter_id: object) -> str:
    """Return ``adapter_id`` if it is a valid id, else raise :class:`InvalidAdapterId` saying why."""
    if not isinstance(adapter_id, str) or not adapter_id:
        raise InvalidAdapterId("adapter_id is empty; give 1-64 characters from A-Z a-z 0-9 . _ -.")
    if len(adapter_id) > MAX_ID_LENGTH:
        raise InvalidAdapterId(
            f"adapter_id is {len(adapter_id)} characters long; the limit is {MAX_ID_LENGTH}."
        )
    if not ADAPTER_ID_RE.fullmatch(adapter_id):  # match() would let 'id\n' by
        raise InvalidAdapterId(
            f"adapter_id {adapter_id!r} is not allowed: use 1-64 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit (no '/', no '..' paths)."
        )
    return adapter_id


def check_stored_id(adapter_id: object) -> str:
    """A store id: an adapter id, or a tenant's qualified one (``acme~bot``: ``adapters.tenants``)."""
    if isinstance(adapter_id, str) and SEPARATOR in adapter_id:
        tenant, _, name = adapter_id.partition(SEPARATOR)
        check_tenant_id(tenant)
        check_adapter_id(name)
        return adapter_id
    return check_adapter_id(adapter_id)


def derive_adapter_id(name: str | None, sha256: str) -> str:
    """An id for an upload that did not name one: its archive/folder name, sanitized, else a hash.

    ``"My Adapter (v2)"`` -> ``"My-Adapter-v2"``; nothing usable -> ``"adapter-<sha256[:12]>"``.
    """
    if name:
        cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name)
        cleaned = re.sub(r"^[^A-Za-z0-9]+", "", cleaned)[:MAX_ID_LENGTH].rstrip("-.")
        if cleaned and ADAPTER_ID_RE.fullmatch(cleaned):
            return cleaned
    return f"adapter-{sha256[:12]}"


def parse_adapter_files(
    files: AdapterFiles,
    adapter_id: str,
    base_shapes: Mapping[str, BaseLinearShape],
    *,
    max_rank: int,
    version: str = "1",
) -> LoraAdapter:
    """Validate an adapter held in memory against the base model (every check of peft_format)."""
    config = parse_adapter_config(files.config)
    tensors = load_safetensors_bytes(files.weights)
    return build_adapter(adapter_id, config, tensors, base_shapes, max_rank=max_rank, version=version)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@functools.cache
def _hasher() -> concurrent.futures.ThreadPoolExecutor:
    """The threads that help a cold read (``AdapterStore._parse_stored``): the sha256 beside the
    parse, or, for a stamped version, half the tensors' reads and casts."""
    return one_thread_pool(2, "adapter-read")  # PyTorch on one thread each: torch_threads.py


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------- the store


class AdapterStore:
    """Persistent adapters by id; also the registry that generation routes resolve ids with.

    Thread-safe. Writes (put, delete) are serialized; reads come from an in-memory mirror of
    the index and the :class:`HostCache`, so a lookup never waits for a write's fsync.
    Validation needs the base model's layer shapes: :meth:`bind_base` once the model is loaded.
    """

    def __init__(
        self, data_dir: str | Path, *, host_cache_bytes: int = 1 << 30, blobs: BlobBackend | None = None
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.blobs: BlobBackend = blobs or LocalBlobBackend(self.data_dir)
        self._lock_file = self._take_lock()
        self.cache = HostCache(host_cache_bytes)
        self.base_shapes: Mapping[str, BaseLinearShape] | None = None
        self.max_rank = 256
        self._write_lock = threading.Lock()  # one put/delete at a time (short: no parsing inside)
        self._state = threading.RLock()  # in-memory state; re-entrant: GC finalizers may run anywhere
        self._records: dict[str, AdapterRecord] = {}
        self._users: Counter[str] = Counter()  # adapter key -> requests still running on it
        self._retired: dict[str, str] = {}  # adapter key -> blob key to delete when its last user ends
        self._load_locks: dict[str, threading.Lock] = {}
        self.disk_loads = 0  # adapters read back from the blob backend into host memory
        self.trusted_loads = 0  # ... of which by their stamp, without hashing (adapters/stamps.py)
        self._stamps: dict[str, str | None] = {}  # folder -> stamp its files had when their sha256 matched
        self._hashed: dict[str, Stamp] = {}  # folder -> stamp of files a read just hashed (to record)
        self._checked_at: dict[str, float] = {}  # folder -> monotonic time its files were last hashed
        self._closed = False
        self.repairs: list[dict[str, str]] = []  # what start-up repair set aside, and why
        self._retire_listeners: list[Callable[[str], None]] = []  # see on_retire
        try:
            self.index = AdapterIndex(self.data_dir / INDEX_FILE)
            self.tenants = TenantTable(self.index)  # the tenants and the hashes of their keys
            self._reconcile()
        except BaseException:
            self._release_lock()
            raise
        self.checks = BackgroundChecks(self._check_stamp)  # stamps to record, re-checks (stamps.py)
        for folder, stamp in self._stamps.items():
            if stamp is None and hasattr(self.blobs, "read_stamped"):  # committed, not yet checked
                self.checks.schedule(folder)

    # ------------------------------------------------------------------ lifecycle

    def bind_base(self, base_shapes: Mapping[str, BaseLinearShape], max_rank: int) -> None:
        """Give the store the base model's linear layers, needed to validate and load adapters."""
        self.base_shapes = dict(base_shapes)
        self.max_rank = max_rank

    @property
    def ready(self) -> bool:
        return self.base_shapes is not None

    def close(self) -> None:
        self.checks.close()
        with self._write_lock:
            self._closed = True
            self.index.close()
            self._release_lock()

    def __enter__(self) -> AdapterStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take_lock(self):
        handle = open(self.data_dir / ".lock", "a+")  # noqa: SIM115 (held open for the store's life)
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                handle.close()
                raise DataDirLocked(
                    f"data dir {self.data_dir} is used by another loraplex server; give each server its own "
                    "--data-dir."
                ) from exc
        return handle

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing drops the flock
            self._lock_file = None

    def _reconcile(self) -> None:
        """Repair what a crash can leave, set aside what is corrupt: see the module docstring."""
        self.blobs.clear_staging()
        kept: dict[str, AdapterRecord] = {}
        for record in self.index.records():
            size = self.blobs.size(record.folder)
            if size == record.bytes:
                kept[record.adapter_id] = record
                continue
            problem = (
                "its files are missing"
                if size is None
                else f"its files hold {size} bytes, not {record.bytes}"
            )
            where = self.blobs.quarantine(
                record.folder, f"index row of adapter {record.adapter_id!r} dropped at start-up: {problem}.\n"
                f"the row was: {json.dumps(record.summary())}",
            )  # fmt: skip
            log.warning("adapter %s is not served: %s; its row is dropped and what is left went to %s",
                        record.adapter_id, problem, where)  # fmt: skip
            self.index.delete(record.adapter_id)
            self.repairs.append({"key": record.key, "action": "quarantined", "reason": problem, "to": where})
        keys = {r.folder for r in kept.values()}
        pending = self.index.pending()
        for key in self.blobs.stored_keys():
            if key in keys:
                continue
            if key in pending:  # an upload killed before its row, or a version whose removal was pending
                log.info("removing stored files %s: left by an interrupted write or removal", key)
                self.blobs.delete(key)
                continue
            problem = "no index row refers to it (it was not written by this store)"
            where = self.blobs.quarantine(key, f"{key}: {problem}")
            log.warning("%s in the data dir is not served: %s; moved to %s", key, problem, where)
            self.repairs.append({"key": key, "action": "quarantined", "reason": problem, "to": where})
        self.index.forget_pending()
        self._records = kept
        self.index.forget_stamps(keys)
        self._stamps = {f: s for f, s in self.index.stamps().items() if f in keys}

    # ------------------------------------------------------------------ reading

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self._records

    def ids(self) -> list[str]:
        return sorted(self._records)

    def records(self) -> list[AdapterRecord]:
        records = dict(self._records)
        return [records[i] for i in sorted(records)]

    def record(self, adapter_id: str) -> AdapterRecord | None:
        return self._records.get(adapter_id)

    def is_cached(self, adapter_id: str) -> bool:
        record = self._records.get(adapter_id)
        return record is not None and record.key in self.cache

    def _cached(self, adapter_id: str) -> tuple[AdapterRecord | None, LoraAdapter | None]:
        """The current record of ``adapter_id`` and its parsed adapter if host memory holds it."""
        record = self._records.get(adapter_id)
        return record, (self.cache.get(record.key) if record is not None else None)

    def get(self, adapter_id: str) -> LoraAdapter | None:
        """The current version of ``adapter_id``, from host memory or else read and parsed (blocking).

        From the event loop, prefer :meth:`aget`, which reads in a worker thread.
        """
        for _ in range(3):  # the record may be replaced or deleted while its files are read
            record, adapter = self._cached(adapter_id)
            if record is None or adapter is not None:
                return adapter
            try:
                return self._load(record)
            except FileNotFoundError:
                continue  # replaced or deleted meanwhile: look again
        return None

    async def aget(self, adapter_id: str) -> LoraAdapter | None:
        """:meth:`get` that never blocks the event loop on reading or parsing."""
        record, adapter = self._cached(adapter_id)
        if record is None or adapter is not None:
            return adapter
        return await asyncio.to_thread(self.get, adapter_id)

    def read_files(self, adapter_id: str) -> tuple[AdapterRecord, AdapterFiles] | None:
        """The current version's record and files, checked against the recorded sha256 (blocking).

        None when the id is unknown. A corrupt version raises :class:`AdapterError` (``store_corrupt``).
        """
        for _ in range(3):  # a replace may remove the files while they are read
            record = self._records.get(adapter_id)
            if record is None:
                return None
            try:
                return record, self._verified_files(record)
            except FileNotFoundError:
                continue
        return None

    def _verified_files(self, record: AdapterRecord) -> AdapterFiles:
        files = self.blobs.read(record.folder)
        self._check_digest(record, sha256_hex(files.weights))
        return files

    @staticmethod
    def _check_digest(record: AdapterRecord, digest: str, config_digest: str | None = None) -> None:
        if digest != record.sha256 or config_digest not in (None, record.config_sha256):
            raise AdapterError(
                f"the stored files of adapter {record.adapter_id!r} are corrupt (sha256 mismatch); "
                "upload it again with ?replace=true.",
                "store_corrupt",
            )

    def _parse_stored(self, record: AdapterRecord) -> LoraAdapter:
        """Read a stored version and parse it, serving nothing its sha256 does not vouch for.

        A version whose files still show the stamp recorded when their sha256 last matched
        (``adapters/stamps.py``) is read without hashing: straight from the files, half the
        tensors on another thread (:meth:`_parse_stamped`). Any other read hashes both files beside
        the parse, on another thread (hashlib and the parse's tensor work release the GIL): a cold
        load costs the longer of the two, not their sum. Nothing parsed is returned before both
        files' digests matched, so corrupt files are never served, and they are reported as such
        even when the parse fails on them first; files that matched are stamped in the background.

        A version stored under the current value rules (``record.checks``) is parsed the short
        way: tensors read in place and cast once (``load_stored_safetensors``), values not scanned
        again (``build_adapter(check_values=False)``): the digests prove the bytes are those that
        passed every check at upload. Older versions get the full parse of an upload."""
        trusted = self._stamps.get(record.folder)
        if trusted is not None and record.checks >= VALUE_CHECKS and hasattr(self.blobs, "open_version"):
            adapter = self._parse_stamped(record, trusted)
            if adapter is not None:
                return adapter
        stamped = hasattr(self.blobs, "read_stamped")
        files, seen = (
            self.blobs.read_stamped(record.folder) if stamped else (self.blobs.read(record.folder), None)
        )
        digest = _hasher().submit(sha256_hex, files.weights)
        try:
            adapter = self._parse_record_files(record, files)
        except Exception:
            self._check_digest(record, digest.result(), sha256_hex(files.config))
            raise
        self._check_digest(record, digest.result(), sha256_hex(files.config))
        if seen is not None:  # these files are the ones uploaded: stamp them (off this thread)
            with self._state:
                self._checked_at[record.folder] = time.monotonic()
                if stamp_rules.settled(seen):  # else a write in the same tick could hide: hash again
                    self._hashed[record.folder] = seen
            self.checks.schedule(record.folder, stamp_rules.seconds_to_settle(seen))
        return adapter

    def _parse_stamped(self, record: AdapterRecord, trusted: str) -> LoraAdapter | None:
        """``record``'s files parsed without hashing, if they show the stamp ``trusted`` before and
        after they are read; None (hash them) when they do not, or when they fail to parse (their
        digest then says whether they are corrupt)."""
        try:
            with self.blobs.open_version(record.folder) as opened:  # type: ignore[attr-defined]
                if stamp_rules.encode(opened.stamp()) != trusted:
                    return None
                config = parse_adapter_config(opened.read_config())
                tensors = read_stored_safetensors(opened.weights_fd, opened.weights_size, helper=_hasher())
                if stamp_rules.encode(opened.stamp()) != trusted:  # written while it was read
                    return None
            adapter = build_adapter(
                record.adapter_id, config, tensors, self._shapes(), max_rank=self.max_rank,
                version=record.version, check_values=False,
            )  # fmt: skip
        except (FileNotFoundError, StoreNotReady):
            raise
        except Exception:
            log.warning("adapter %s: its stamped files did not parse; checking their sha256", record.key)
            return None
        with self._state:
            self.trusted_loads += 1
            due = time.monotonic() - self._checked_at.get(record.folder, -stamp_rules.RECHECK_SECONDS)
        if due >= stamp_rules.RECHECK_SECONDS:  # now and then, re-hash in the background (bit rot)
            self.checks.schedule(record.folder, stamp_rules.RECHECK_DELAY_SECONDS)
        return adapter

    def _check_stamp(self, folder: str) -> float | None:
        """The background check of one version's files (``BackgroundChecks``, nice 19): hash them
        (unless a read just did, and they have not changed since), stamp them once they are
        settled; a mismatch drops the version from memory. Returns seconds to try again, or None."""
        record = self._record_of(folder)
        if record is None:  # replaced or deleted meanwhile
            return None
        with self._state:
            hashed = self._hashed.pop(folder, None)
        now = self.blobs.stamp(folder)  # type: ignore[attr-defined]
        if now is None:
            return None
        if not stamp_rules.settled(now):  # too young to stamp: written within the margin
            if hashed is not None and hashed == now:
                with self._state:
                    self._hashed.setdefault(folder, hashed)
            return stamp_rules.seconds_to_settle(now) + 0.05
        if hashed is None or hashed != now:
            try:
                files, seen = self.blobs.read_stamped(folder)  # type: ignore[attr-defined]
            except FileNotFoundError:
                return None
            if seen is None:  # written while read
                return stamp_rules.STAMP_MARGIN_SECONDS
            try:
                self._check_digest(record, sha256_hex(files.weights), sha256_hex(files.config))
            except AdapterError:
                self._found_corrupt(record)
                return None
            with self._state:
                self._checked_at[folder] = time.monotonic()
            if not stamp_rules.settled(seen):
                return stamp_rules.seconds_to_settle(seen) + 0.05
            now = seen
        self._set_stamp(record, stamp_rules.encode(now))
        return None

    def _record_of(self, folder: str) -> AdapterRecord | None:
        adapter_id = folder.rpartition("@")[0]
        record = self._records.get(adapter_id)
        return record if record is not None and record.folder == folder else None

    def _set_stamp(self, record: AdapterRecord, stamp: str | None) -> None:
        with self._write_lock:
            if self._closed or self._record_of(record.folder) is None:
                return
            self.index.set_stamp(record.folder, stamp)
            with self._state:
                self._stamps[record.folder] = stamp

    def _found_corrupt(self, record: AdapterRecord) -> None:
        """A background check found ``record``'s files changed under their stamp (or corrupt): no
        read trusts them again, the parsed adapter leaves host memory and the engine's slot (the
        retire listeners), and the next read hashes them and refuses them (``store_corrupt``)."""
        log.error(
            "adapter %s: its stored files no longer match their sha256 (changed on disk or corrupt); it is "
            "dropped from memory and refused until uploaded again with ?replace=true", record.key,
        )  # fmt: skip
        with self._state:
            self._stamps.pop(record.folder, None)
        self._set_stamp(record, None)
        self.cache.drop(record.key)
        for listener in self._retire_listeners:
            try:
                listener(record.key)
            except Exception:
                log.exception("retire listener failed for %s", record.key)

    def _parse_record_files(self, record: AdapterRecord, files: AdapterFiles) -> LoraAdapter:
        if record.checks < VALUE_CHECKS:  # stored before the value rules were recorded: every check
            return parse_adapter_files(
                files, record.adapter_id, self._shapes(), max_rank=self.max_rank, version=record.version
            )
        return build_adapter(
            record.adapter_id,
            parse_adapter_config(files.config),
            load_stored_safetensors(files.weights),
            self._shapes(),
            max_rank=self.max_rank,
            version=record.version,
            check_values=False,
        )

    def _load(self, record: AdapterRecord) -> LoraAdapter:
        with self._state:
            lock = self._load_locks.setdefault(record.key, threading.Lock())
        with lock:  # one reader per version; the others wait and then hit the cache
            try:
                adapter = self.cache.get(record.key, count=False)
                if adapter is not None:  # another thread read it meanwhile
                    return adapter
                adapter = self._parse_stored(record)
                self.disk_loads += 1
                if self._records.get(record.adapter_id) == record:  # not replaced or deleted meanwhile
                    self.cache.put(adapter)
                log.debug("adapter %s read from storage", record.key)
                return adapter
            finally:
                with self._state:
                    self._load_locks.pop(record.key, None)

    def _shapes(self) -> Mapping[str, BaseLinearShape]:
        if self.base_shapes is None:
            raise StoreNotReady("the base model is still loading; retry in a few seconds.")
        return self.base_shapes

    # ------------------------------------------------------------------ usage tracking

    def on_retire(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(key)`` whenever a version (``id@version``) stops being current: replaced
        (an upload, a source refresh, a replica's sync) or deleted. The engine subscribes once, to
        free that version's memory slot when its last running row ends. Listeners must not block:
        they run under the store's write lock."""
        self._retire_listeners.append(listener)

    def track(self, owner: object, adapter: LoraAdapter) -> None:
        """Keep ``adapter``'s files while ``owner`` (a generation request) is alive.

        A version replaced or deleted meanwhile loses its files when the last owner is
        garbage collected (its request finished and was dropped).
        """
        with self._state:
            self._users[adapter.key] += 1
        weakref.finalize(owner, self._untrack, adapter.key)

    def _untrack(self, key: str) -> None:
        # May run on any thread (the engine's included) when the owner is collected: never block here.
        with self._state:
            self._users[key] -= 1
            if self._users[key] > 0:
                return
            del self._users[key]
            blob_key = self._retired.pop(key, None)
        if blob_key is not None:
            threading.Thread(target=self._remove_files, args=(blob_key,), daemon=True).start()

    def _retire(self, record: AdapterRecord) -> None:
        """Forget a version (its folder is pending in the index already); delete its files now, or
        when its last running request ends. Publishes the retire event (:meth:`on_retire`)."""
        self.cache.drop(record.key)
        with self._state:
            for table in (self._stamps, self._hashed, self._checked_at):
                table.pop(record.folder, None)
        for listener in self._retire_listeners:
            try:
                listener(record.key)
            except Exception:  # a listener's failure must not undo a committed write
                log.exception("retire listener failed for %s", record.key)
        with self._state:
            if self._users.get(record.key, 0) > 0:
                self._retired[record.key] = record.folder
                return
        self._remove_files(record.folder, locked=True)

    def _remove_files(self, blob_key: str, *, locked: bool = False) -> None:
        """Delete a retired version's files, then its pending mark (a crash between: start-up removes them)."""
        self.blobs.delete(blob_key)
        try:
            if locked:  # the caller holds the write lock
                self.index.forget_pending([blob_key])
                return
            with self._write_lock:
                self.index.forget_pending([blob_key])
        except sqlite3.ProgrammingError:  # the store closed meanwhile: start-up clears the mark
            pass

    # ------------------------------------------------------------------ writing

    def validate(self, adapter_id: str, files: AdapterFiles) -> LoraAdapter:
        """Parse and check an upload against the base model (CPU-heavy: call it off the event loop)."""
        return parse_adapter_files(files, check_stored_id(adapter_id), self._shapes(), max_rank=self.max_rank)

    def check_can_put(self, adapter_id: str, *, replace: bool) -> None:
        """Fail fast (before parsing an upload) on a bad id or an existing id without ``replace``."""
        check_stored_id(adapter_id)
        if not replace and adapter_id in self._records:
            raise _exists(adapter_id)

    def put(
        self,
        adapter_id: str,
        files: AdapterFiles,
        *,
        replace: bool = False,
        keep_identical: bool = False,
    ) -> AdapterRecord:
        """Validate and store an adapter atomically; return its record.

        ``replace``: an existing id gets a new version (else :class:`AdapterExists`).
        ``keep_identical``: when the stored version has the same config and weights, keep it as is.
        """
        self.check_can_put(adapter_id, replace=replace)
        sha, config_sha = sha256_hex(files.weights), sha256_hex(files.config)
        current = self._records.get(adapter_id)
        if (
            keep_identical
            and current is not None
            and (current.sha256, current.config_sha256) == (sha, config_sha)
        ):
            return current
        adapter = self.validate(adapter_id, files)
        try:
            staged = self.blobs.stage(files)
            committed = False
            try:
                with self._write_lock:
                    record = self._commit(adapter, files, staged, sha, config_sha, replace=replace)
                    committed = True
                    return record
            finally:
                if not committed:
                    self.blobs.discard(staged)
        except Exception as exc:
            if not is_storage_full(exc):
                raise
            log.error("adapter %s (%d bytes) not stored: the disk is full (%s)", adapter_id, files.size, exc)
            raise StoreFull(
                f"the server's disk is full: adapter {adapter_id!r} ({files.size} bytes) was not stored and "
                "nothing of it was kept; the operator must free space in --data-dir (or delete adapters "
                "that are no longer needed), then upload again."
            ) from exc

    def _commit(
        self,
        adapter: LoraAdapter,
        files: AdapterFiles,
        staged: str,
        sha: str,
        config_sha: str,
        *,
        replace: bool,
    ) -> AdapterRecord:
        adapter_id = adapter.adapter_id
        previous = self._records.get(adapter_id)
        if previous is not None and not replace:  # another upload took the id meanwhile
            raise _exists(adapter_id)
        seq = self.index.next_seq()
        version = f"v{seq}-{sha[:8]}"
        record = AdapterRecord(
            adapter_id=adapter_id,
            version=version,
            folder=f"{adapter_id}@{version}",
            sha256=sha,
            config_sha256=config_sha,
            bytes=files.size,
            created_at=_utc_now(),
            rank=adapter.max_rank,
            lora_alpha=adapter.config.lora_alpha,
            use_rslora=adapter.config.use_rslora,
            target_modules=adapter.config.target_modules,
            layers=len(adapter.layers),
            parameters=adapter.num_parameters,
            checks=VALUE_CHECKS,  # validate() ran every check on these bytes
        )
        self.index.add_pending(record.folder)
        self.blobs.commit(staged, record.folder)
        try:
            self.index.save(record, seq, retired=previous.folder if previous is not None else None)
        except BaseException:
            self.blobs.delete(record.folder)
            raise
        self.cache.put(dataclasses.replace(adapter, version=version))
        with self._state:
            self._records[adapter_id] = record
            self._stamps[record.folder] = None  # hashed and stamped once settled, in the background
        if hasattr(self.blobs, "read_stamped"):
            self.checks.schedule(record.folder, stamp_rules.STAMP_MARGIN_SECONDS + 0.05)
        if previous is not None:
            self._retire(previous)
        log.info("adapter %s stored as %s (%d bytes)", adapter_id, version, record.bytes)
        return record

    def delete(self, adapter_id: str) -> AdapterRecord:
        """Remove ``adapter_id`` from the index now; its files go when its last running request ends."""
        with self._write_lock:
            record = self._records.get(adapter_id)
            if record is None:
                raise UnknownAdapter(
                    f"adapter {adapter_id!r} is not stored on this server; list adapters with GET /adapters."
                )
            self.index.delete(adapter_id, retired=record.folder)
            with self._state:
                del self._records[adapter_id]
            self._retire(record)
        log.info("adapter %s deleted", adapter_id)
        return record


def _exists(adapter_id: str) -> AdapterExists:
    return AdapterExists(
        f"adapter {adapter_id!r} already exists; upload with ?replace=true to replace it, "
        "or choose another adapter_id."
    )
