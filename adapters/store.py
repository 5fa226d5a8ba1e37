"""AdapterStore: uploaded adapters on disk (one folder each) plus a SQLite index, and the host-memory tier.

Layout of the data dir (one server per data dir: ``.lock`` enforces it)::

    <data_dir>/index.sqlite3                      id -> version, folder, hashes, summary
    <data_dir>/adapters/<id>@<version>/           adapter_config.json + adapter_model.safetensors
    <data_dir>/tmp/<random>/                      uploads being written

Every write is atomic: the files go into ``tmp/<random>``, are fsynced, the folder is renamed
into ``adapters/`` (and the directory fsynced), then the index row is written in one
transaction. A crash at any point leaves either the old state or the new one; start-up
reconciles what a crash can leave behind:

- ``tmp/*`` is removed (an upload that never finished);
- an index row whose folder or files are missing (or of the wrong size) is dropped;
- a folder without an index row is **removed, not re-indexed**: it is either an upload whose
  transaction never committed (the client never got a 201) or a replaced/deleted version
  whose removal was pending, and re-indexing would resurrect a deleted adapter.

Versions: every upload gets a new version ``v<seq>-<sha256[:8]>`` (``seq`` never repeats, it
is kept in the index), so ``LoraAdapter.key`` (``id@version``) changes on replace: the
engine's slots keep serving running requests from the old weights while new requests get
the new ones. A replaced or deleted version's folder is removed once no request tracked
with :meth:`AdapterStore.track` still uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import threading
import uuid
import weakref
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from adapters.archive import AdapterFiles
from adapters.host_cache import HostCache
from adapters.peft_format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterError,
    BaseLinearShape,
    LoraAdapter,
    build_adapter,
    load_safetensors_bytes,
    parse_adapter_config,
)

try:  # POSIX only; elsewhere the single-server rule is not enforced
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

ADAPTER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_ID_LENGTH = 64
INDEX_FILE = "index.sqlite3"
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    id             TEXT PRIMARY KEY,
    version        TEXT NOT NULL,
    folder         TEXT NOT NULL UNIQUE,
    sha256         TEXT NOT NULL,   -- of adapter_model.safetensors
    config_sha256  TEXT NOT NULL,   -- of adapter_config.json
    bytes          INTEGER NOT NULL,
    created_at     TEXT NOT NULL,   -- ISO 8601, UTC
    rank           INTEGER NOT NULL,
    lora_alpha     REAL NOT NULL,
    use_rslora     INTEGER NOT NULL,
    target_modules TEXT NOT NULL,   -- JSON: a list of names, or a regex / 'all-linear' string
    layers         INTEGER NOT NULL,
    parameters     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
_COLUMNS = (
    "id, version, folder, sha256, config_sha256, bytes, created_at, rank, lora_alpha, use_rslora, "
    "target_modules, layers, parameters"
)


# --------------------------------------------------------------------------- errors


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
    if not ADAPTER_ID_RE.match(adapter_id):
        raise InvalidAdapterId(
            f"adapter_id {adapter_id!r} is not allowed: use 1-64 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit (no '/', no '..' paths)."
        )
    return adapter_id


def derive_adapter_id(name: str | None, sha256: str) -> str:
    """An id for an upload that did not name one: its archive/folder name, sanitized, else a hash.

    ``"My Adapter (v2)"`` -> ``"My-Adapter-v2"``; nothing usable -> ``"adapter-<sha256[:12]>"``.
    """
    if name:
        cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name)
        cleaned = re.sub(r"^[^A-Za-z0-9]+", "", cleaned)[:MAX_ID_LENGTH].rstrip("-.")
        if cleaned and ADAPTER_ID_RE.match(cleaned):
            return cleaned
    return f"adapter-{sha256[:12]}"


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class AdapterRecord:
    """One stored adapter version, as the index holds it."""

    adapter_id: str
    version: str
    folder: str  # name under <data_dir>/adapters
    sha256: str
    config_sha256: str
    bytes: int
    created_at: str
    rank: int  # the largest rank over its modules (config r unless rank_pattern raises it)
    lora_alpha: float
    use_rslora: bool
    target_modules: list[str] | str
    layers: int  # adapted modules
    parameters: int  # LoRA parameters, A and B of every module

    @property
    def key(self) -> str:
        return f"{self.adapter_id}@{self.version}"

    def summary(self) -> dict[str, Any]:
        """The API's adapter summary (exactly these fields)."""
        return {
            "id": self.adapter_id,
            "rank": self.rank,
            "lora_alpha": self.lora_alpha,
            "use_rslora": self.use_rslora,
            "target_modules": self.target_modules,
            "layers": self.layers,
            "parameters": self.parameters,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "created_at": self.created_at,
        }

    def _row(self) -> tuple:
        return (
            self.adapter_id, self.version, self.folder, self.sha256, self.config_sha256, self.bytes,
            self.created_at, self.rank, self.lora_alpha, int(self.use_rslora),
            json.dumps(self.target_modules), self.layers, self.parameters,
        )  # fmt: skip

    @classmethod
    def _from_row(cls, row: tuple) -> AdapterRecord:
        (
            aid,
            version,
            folder,
            sha,
            config_sha,
            size,
            created,
            rank,
            alpha,
            rslora,
            targets,
            layers,
            params,
        ) = row
        return cls(
            aid, version, folder, sha, config_sha, size, created, rank, alpha, bool(rslora),
            json.loads(targets), layers, params,
        )  # fmt: skip


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


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------- the store


class AdapterStore:
    """Persistent adapters by id; also the registry that generation routes resolve ids with.

    Thread-safe. Writes (put, delete) are serialized; reads come from an in-memory mirror of
    the index and the :class:`HostCache`, so a lookup never waits for a write's fsync.
    Validation needs the base model's layer shapes: :meth:`bind_base` once the model is loaded.
    """

    def __init__(self, data_dir: str | Path, *, host_cache_bytes: int = 1 << 30) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.adapters_dir = self.data_dir / "adapters"
        self.tmp_dir = self.data_dir / "tmp"
        for directory in (self.data_dir, self.adapters_dir, self.tmp_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self._lock_file = self._take_lock()
        self.cache = HostCache(host_cache_bytes)
        self.base_shapes: Mapping[str, BaseLinearShape] | None = None
        self.max_rank = 256
        self._write_lock = threading.Lock()  # one put/delete at a time (short: no parsing inside)
        self._state = threading.RLock()  # in-memory state; re-entrant: GC finalizers may run anywhere
        self._records: dict[str, AdapterRecord] = {}
        self._users: Counter[str] = Counter()  # adapter key -> requests still running on it
        self._retired: dict[str, str] = {}  # adapter key -> folder to remove when its last user ends
        self._load_locks: dict[str, threading.Lock] = {}
        self.disk_loads = 0  # adapters read back from disk into host memory
        try:
            self._db = sqlite3.connect(
                self.data_dir / INDEX_FILE, check_same_thread=False, isolation_level=None
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._reconcile()
        except BaseException:
            self._release_lock()
            raise

    # ------------------------------------------------------------------ lifecycle

    def bind_base(self, base_shapes: Mapping[str, BaseLinearShape], max_rank: int) -> None:
        """Give the store the base model's linear layers, needed to validate and load adapters."""
        self.base_shapes = dict(base_shapes)
        self.max_rank = max_rank

    @property
    def ready(self) -> bool:
        return self.base_shapes is not None

    def close(self) -> None:
        with self._write_lock:
            self._db.close()
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
        """Repair what a crash can leave: see the module docstring for the policy."""
        for leftover in self.tmp_dir.iterdir():
            log.info("removing unfinished upload %s", leftover)
            _remove(leftover)
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM adapters").fetchall()
        kept: dict[str, AdapterRecord] = {}
        for row in rows:
            record = AdapterRecord._from_row(row)
            problem = self._check_folder(record)
            if problem:
                log.warning("dropping adapter %s from the index: %s", record.adapter_id, problem)
                self._db.execute("DELETE FROM adapters WHERE id = ?", (record.adapter_id,))
            else:
                kept[record.adapter_id] = record
        folders = {r.folder for r in kept.values()}
        for entry in self.adapters_dir.iterdir():
            if entry.name not in folders:
                log.info("removing %s: no index row refers to it", entry)
                _remove(entry)
        _fsync_dir(self.adapters_dir)
        _fsync_dir(self.tmp_dir)
        self._records = kept

    def _check_folder(self, record: AdapterRecord) -> str | None:
        folder = self.adapters_dir / record.folder
        try:
            size = (folder / CONFIG_FILE).stat().st_size + (folder / WEIGHTS_FILE).stat().st_size
        except OSError as exc:
            return f"its files are missing ({exc.strerror}: {exc.filename})"
        if size != record.bytes:
            return f"its files hold {size} bytes, the index says {record.bytes}"
        return None

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

    def folder_of(self, record: AdapterRecord) -> Path:
        return self.adapters_dir / record.folder

    def get(self, adapter_id: str) -> LoraAdapter | None:
        """The current version of ``adapter_id``, from host memory or else read from disk (blocking).

        From the event loop, prefer :meth:`aget`, which reads the disk in a worker thread.
        """
        for _ in range(3):  # the record may be replaced or deleted while its files are read
            record = self._records.get(adapter_id)
            if record is None:
                return None
            adapter = self.cache.get(record.key)
            if adapter is not None:
                return adapter
            try:
                return self._load(record)
            except FileNotFoundError as exc:
                if self._records.get(adapter_id) == record:
                    raise AdapterError(
                        f"the stored files of adapter {adapter_id!r} are missing ({exc.filename}); "
                        "upload it again with ?replace=true.",
                        "store_corrupt",
                    ) from exc
        return None

    async def aget(self, adapter_id: str) -> LoraAdapter | None:
        """:meth:`get` that never blocks the event loop on disk or parsing."""
        record = self._records.get(adapter_id)
        if record is None:
            return None
        adapter = self.cache.get(record.key)
        if adapter is not None:
            return adapter
        return await asyncio.to_thread(self.get, adapter_id)

    def _load(self, record: AdapterRecord) -> LoraAdapter:
        with self._state:
            lock = self._load_locks.setdefault(record.key, threading.Lock())
        with lock:  # one reader per version; the others wait and then hit the cache
            try:
                adapter = self.cache.get(record.key, count=False)
                if adapter is not None:  # another thread read it meanwhile
                    return adapter
                folder = self.folder_of(record)
                files = AdapterFiles(
                    config=(folder / CONFIG_FILE).read_bytes(), weights=(folder / WEIGHTS_FILE).read_bytes()
                )
                if sha256_hex(files.weights) != record.sha256:
                    raise AdapterError(
                        f"the stored files of adapter {record.adapter_id!r} are corrupt (sha256 mismatch); "
                        "upload it again with ?replace=true.",
                        "store_corrupt",
                    )
                adapter = parse_adapter_files(
                    files, record.adapter_id, self._shapes(), max_rank=self.max_rank, version=record.version
                )
                self.disk_loads += 1
                if self._records.get(record.adapter_id) == record:  # not replaced or deleted meanwhile
                    self.cache.put(adapter)
                log.debug("adapter %s read from disk", record.key)
                return adapter
            finally:
                with self._state:
                    self._load_locks.pop(record.key, None)

    def _shapes(self) -> Mapping[str, BaseLinearShape]:
        if self.base_shapes is None:
            raise StoreNotReady("the base model is still loading; retry in a few seconds.")
        return self.base_shapes

    # ------------------------------------------------------------------ usage tracking

    def track(self, owner: object, adapter: LoraAdapter) -> None:
        """Keep ``adapter``'s files while ``owner`` (a generation request) is alive.

        A version replaced or deleted meanwhile loses its folder when the last owner is
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
            folder = self._retired.pop(key, None)
        if folder is not None:
            threading.Thread(target=_remove, args=(self.adapters_dir / folder,), daemon=True).start()

    def in_use(self, adapter_id: str) -> int:
        """Requests tracked on any version of ``adapter_id`` that are still alive."""
        with self._state:
            return sum(n for key, n in self._users.items() if key.partition("@")[0] == adapter_id)

    def _retire(self, record: AdapterRecord) -> None:
        """Forget a version; remove its folder now, or when its last running request ends."""
        self.cache.drop(record.key)
        with self._state:
            if self._users.get(record.key, 0) > 0:
                self._retired[record.key] = record.folder
                return
        _remove(self.folder_of(record))

    # ------------------------------------------------------------------ writing

    def validate(self, adapter_id: str, files: AdapterFiles) -> LoraAdapter:
        """Parse and check an upload against the base model (CPU-heavy: call it off the event loop)."""
        return parse_adapter_files(
            files, check_adapter_id(adapter_id), self._shapes(), max_rank=self.max_rank
        )

    def check_can_put(self, adapter_id: str, *, replace: bool) -> None:
        """Fail fast (before parsing an upload) on a bad id or an existing id without ``replace``."""
        check_adapter_id(adapter_id)
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
        staged = self._stage(files)
        try:
            with self._write_lock:
                return self._commit(adapter, files, staged, sha, config_sha, replace=replace)
        finally:
            if staged.exists():
                _remove(staged)

    def _stage(self, files: AdapterFiles) -> Path:
        """Write the files into a fresh folder under tmp/, fsynced."""
        staged = self.tmp_dir / uuid.uuid4().hex
        staged.mkdir()
        try:
            for name, data in ((CONFIG_FILE, files.config), (WEIGHTS_FILE, files.weights)):
                with open(staged / name, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
            _fsync_dir(staged)
        except BaseException:
            _remove(staged)
            raise
        return staged

    def _commit(
        self,
        adapter: LoraAdapter,
        files: AdapterFiles,
        staged: Path,
        sha: str,
        config_sha: str,
        *,
        replace: bool,
    ) -> AdapterRecord:
        adapter_id = adapter.adapter_id
        previous = self._records.get(adapter_id)
        if previous is not None and not replace:  # another upload took the id meanwhile
            raise _exists(adapter_id)
        seq = self._next_seq()
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
        )
        final = self.folder_of(record)
        os.rename(staged, final)
        _fsync_dir(self.adapters_dir)
        try:
            with self._transaction() as db:
                db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('seq', ?)", (seq,))
                db.execute(
                    f"INSERT OR REPLACE INTO adapters ({_COLUMNS}) VALUES ({', '.join('?' * 13)})",
                    record._row(),
                )
        except BaseException:
            _remove(final)
            raise
        self.cache.put(dataclasses.replace(adapter, version=version))
        with self._state:
            self._records[adapter_id] = record
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
            with self._transaction() as db:
                db.execute("DELETE FROM adapters WHERE id = ?", (adapter_id,))
            with self._state:
                del self._records[adapter_id]
            self._retire(record)
        log.info("adapter %s deleted", adapter_id)
        return record

    def _next_seq(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()
        return (row[0] if row else 0) + 1

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")


def _exists(adapter_id: str) -> AdapterExists:
    return AdapterExists(
        f"adapter {adapter_id!r} already exists; upload with ?replace=true to replace it, "
        "or choose another adapter_id."
    )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover (Windows)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
