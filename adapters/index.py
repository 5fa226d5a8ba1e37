"""The adapter index: one SQLite row per stored adapter (its current version), and the record type.

The index is the source of truth for what exists: a version's files count only once its row
is committed (see ``store.py`` for the write order and the start-up repair).

It also lists the blob keys whose files may lie on disk without a row *on purpose*
(``pending``): a version being committed (between the rename and its row) and a replaced or
deleted version waiting for its last request. Start-up repair removes those; files without a
row that are not listed there did not come from this store's writes and are quarantined.

And each version's **stamp** (``stamps``; ``adapters.stamps``): the size, mtime, ctime, inode and
device of both files as they were when their sha256 last matched the recorded one, NULL while
that check is still to be made (a version just committed). A read whose files still show the
stamp skips the sha256 (see ``AdapterStore._parse_stored``).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INDEX_FILE = "index.sqlite3"
SCHEMA_VERSION = 3  # 2: the ``checks`` column; 3: the ``stamps`` table
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
    parameters     INTEGER NOT NULL,
    checks         INTEGER NOT NULL DEFAULT 0  -- peft_format.VALUE_CHECKS the weights passed when stored
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS pending (folder TEXT PRIMARY KEY);  -- files that may lack a row on purpose
-- the files' stat when their sha256 last matched (adapters.stamps); NULL: to be checked
CREATE TABLE IF NOT EXISTS stamps (folder TEXT PRIMARY KEY, stamp TEXT);
"""
_COLUMNS = (
    "id, version, folder, sha256, config_sha256, bytes, created_at, rank, lora_alpha, use_rslora, "
    "target_modules, layers, parameters, checks"
)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class AdapterRecord:
    """One stored adapter version, as the index holds it."""

    adapter_id: str
    version: str
    folder: str  # the blob key of its files: <id>@<version>
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
    # The value checks (``adapters.peft_format.VALUE_CHECKS``: every entry finite, the update bounded)
    # the stored weights passed when they were written; 0: unknown (an index written before this
    # column), so reads check them again. Reads of a version at the current checks skip them: the
    # sha256 of both files is compared with the recorded one before the parse is served.
    checks: int = 0

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
            json.dumps(self.target_modules), self.layers, self.parameters, self.checks,
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
            checks,
        ) = row
        return cls(
            aid, version, folder, sha, config_sha, size, created, rank, alpha, bool(rslora),
            json.loads(targets), layers, params, checks,
        )  # fmt: skip


class AdapterIndex:
    """The SQLite index (WAL, synchronous=FULL). Writers serialise through the store's write lock."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(adapters)")}
        if "checks" not in columns:  # an index of schema 1: its versions are checked on every read
            self._db.execute("ALTER TABLE adapters ADD COLUMN checks INTEGER NOT NULL DEFAULT 0")
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def records(self) -> list[AdapterRecord]:
        return [AdapterRecord._from_row(row) for row in self._db.execute(f"SELECT {_COLUMNS} FROM adapters")]

    def next_seq(self) -> int:
        """The next version number: never repeats, even after deletes."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()
        return (row[0] if row else 0) + 1

    def save(self, record: AdapterRecord, seq: int, retired: str | None = None) -> None:
        """Insert or replace ``record`` and remember ``seq``, in one transaction.

        ``record.folder`` stops being pending (it has its row now) and gets a stamp to check (NULL);
        ``retired``, the folder of the version it replaces, becomes pending until its files are
        removed, and loses its stamp.
        """
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('seq', ?)", (seq,))
            db.execute(
                f"INSERT OR REPLACE INTO adapters ({_COLUMNS}) VALUES ({', '.join('?' * 14)})", record._row()
            )
            db.execute("DELETE FROM pending WHERE folder = ?", (record.folder,))
            db.execute("INSERT OR REPLACE INTO stamps (folder, stamp) VALUES (?, NULL)", (record.folder,))
            if retired is not None:
                db.execute("INSERT OR IGNORE INTO pending (folder) VALUES (?)", (retired,))
                db.execute("DELETE FROM stamps WHERE folder = ?", (retired,))

    def delete(self, adapter_id: str, retired: str | None = None) -> None:
        """Drop ``adapter_id``'s row; its folder ``retired`` becomes pending in the same transaction."""
        with self._transaction() as db:
            db.execute("DELETE FROM adapters WHERE id = ?", (adapter_id,))
            if retired is not None:
                db.execute("INSERT OR IGNORE INTO pending (folder) VALUES (?)", (retired,))
                db.execute("DELETE FROM stamps WHERE folder = ?", (retired,))

    def stamps(self) -> dict[str, str | None]:
        """Every version's stamp by folder (None: its files are still to be checked)."""
        return dict(self._db.execute("SELECT folder, stamp FROM stamps"))

    def set_stamp(self, folder: str, stamp: str | None) -> None:
        """Record ``folder``'s stamp (None: check its files again); only for a folder that has a row."""
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO stamps (folder, stamp) SELECT ?, ? WHERE EXISTS "
                "(SELECT 1 FROM adapters WHERE folder = ?)",
                (folder, stamp, folder),
            )

    def forget_stamps(self, keep: set[str]) -> None:
        """Drop the stamps of every folder not in ``keep`` (start-up repair)."""
        with self._transaction() as db:
            stale = [(f,) for (f,) in db.execute("SELECT folder FROM stamps") if f not in keep]
            db.executemany("DELETE FROM stamps WHERE folder = ?", stale)

    def add_pending(self, folder: str) -> None:
        """``folder``'s files are about to appear before their row (a commit's rename)."""
        with self._transaction() as db:
            db.execute("INSERT OR IGNORE INTO pending (folder) VALUES (?)", (folder,))

    def forget_pending(self, folders: list[str] | None = None) -> None:
        """The files of ``folders`` (None: every pending one) are gone."""
        with self._transaction() as db:
            if folders is None:
                db.execute("DELETE FROM pending")
            else:
                db.executemany("DELETE FROM pending WHERE folder = ?", [(f,) for f in folders])

    def pending(self) -> set[str]:
        return {row[0] for row in self._db.execute("SELECT folder FROM pending")}

    def close(self) -> None:
        self._db.close()

    def execute_script(self, script: str) -> None:
        """Create another component's tables (``adapters.tenants``) in this database."""
        self._db.executescript(script)

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        return list(self._db.execute(sql, params))

    def transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction, for other components' tables."""
        return self._transaction()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
