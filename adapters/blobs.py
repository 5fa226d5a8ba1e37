"""Where the files of each adapter version live: a blob backend, and the local-directory one.

The store names a version's files by a key (``<id>@<version>``) and never learns where or how
they are kept; a remote backend (object storage, another node) implements the same five calls.

Local layout::

    <root>/adapters/<id>@<version>/   adapter_config.json + adapter_model.safetensors
    <root>/tmp/<random>/              uploads being written
    <root>/quarantine/<time>-<key>/   what start-up repair set aside (the entry + REASON.txt)

``stage`` writes and fsyncs into ``tmp/``; ``commit`` renames into ``adapters/`` and fsyncs the
directory: a crash leaves either no version or a whole one.

A local version's files also have a **stamp** (``adapters.stamps``): what ``fstat`` says of them
(size, mtime, ctime, inode, device). ``read_stamped`` and ``open_version`` give it with what was read,
so the store can tell whether the files changed since their sha256 last matched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Protocol

from adapters.archive import AdapterFiles
from adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE
from adapters.stamps import Stamp, file_stamp

log = logging.getLogger(__name__)


class BlobBackend(Protocol):
    """The files of adapter versions, by key. Thread-safe; every write is all or nothing."""

    def stage(self, files: AdapterFiles) -> str:
        """Write files durably where readers cannot see them yet; return a staging handle."""

    def commit(self, handle: str, key: str) -> None:
        """Publish staged files under ``key`` (atomic)."""

    def discard(self, handle: str) -> None:
        """Forget staged files that were not committed."""

    def read(self, key: str) -> AdapterFiles:
        """The files stored under ``key``; FileNotFoundError when gone."""

    def size(self, key: str) -> int | None:
        """Bytes stored under ``key`` (both files), None when missing."""

    def delete(self, key: str) -> None: ...

    def stored_keys(self) -> list[str]:
        """Every committed key (start-up repair compares them with the index)."""

    def clear_staging(self) -> None:
        """Drop uploads that never committed (start-up repair)."""

    def quarantine(self, key: str, reason: str) -> str:
        """Set the files under ``key`` aside (never served, never deleted) with ``reason``; where to."""


class LocalBlobBackend:
    """Adapter files in folders under a local directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.versions_dir = root / "adapters"
        self.tmp_dir = root / "tmp"
        self.quarantine_dir = root / "quarantine"
        for directory in (self.versions_dir, self.tmp_dir):
            directory.mkdir(parents=True, exist_ok=True)

    def stage(self, files: AdapterFiles) -> str:
        handle = uuid.uuid4().hex
        staged = self.tmp_dir / handle
        staged.mkdir()
        try:
            for name, data in ((CONFIG_FILE, files.config), (WEIGHTS_FILE, files.weights)):
                with open(staged / name, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            fsync_dir(staged)
        except BaseException:
            remove(staged)
            raise
        return handle

    def commit(self, handle: str, key: str) -> None:
        os.rename(self.tmp_dir / handle, self.versions_dir / key)
        fsync_dir(self.versions_dir)

    def discard(self, handle: str) -> None:
        remove(self.tmp_dir / handle)

    def read(self, key: str) -> AdapterFiles:
        folder = self.versions_dir / key
        return AdapterFiles(
            config=(folder / CONFIG_FILE).read_bytes(), weights=(folder / WEIGHTS_FILE).read_bytes()
        )

    def read_stamped(self, key: str) -> tuple[AdapterFiles, Stamp | None]:
        """:meth:`read`, with the files' stamp while they were read: None when either changed
        during its read (``fstat`` before and after disagree, or fewer bytes than its size)."""
        folder = self.versions_dir / key
        data: list[bytes] = []
        stamps: list = []
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            with open(folder / name, "rb") as f:
                before = os.fstat(f.fileno())
                content = f.read()
                after = os.fstat(f.fileno())
            data.append(content)
            same = file_stamp(before) == file_stamp(after) and len(content) == after.st_size
            stamps.append(file_stamp(after) if same else None)
        stamp = None if None in stamps else (stamps[0], stamps[1])
        return AdapterFiles(config=data[0], weights=data[1]), stamp

    def stamp(self, key: str) -> Stamp | None:
        """The files' stamp now (``stat``), None when either is missing."""
        folder = self.versions_dir / key
        try:
            return file_stamp(os.stat(folder / CONFIG_FILE)), file_stamp(os.stat(folder / WEIGHTS_FILE))
        except OSError:
            return None

    def open_version(self, key: str) -> OpenVersion:
        """Both files of ``key`` held open (a context manager): the config read, the weights to read
        with ``pread`` (``peft_format.read_stored_safetensors``). FileNotFoundError when gone."""
        return OpenVersion(self.versions_dir / key)

    def size(self, key: str) -> int | None:
        folder = self.versions_dir / key
        try:
            return (folder / CONFIG_FILE).stat().st_size + (folder / WEIGHTS_FILE).stat().st_size
        except OSError:
            return None

    def delete(self, key: str) -> None:
        remove(self.versions_dir / key)

    def stored_keys(self) -> list[str]:
        return sorted(entry.name for entry in self.versions_dir.iterdir())

    def clear_staging(self) -> None:
        for leftover in self.tmp_dir.iterdir():
            log.info("removing unfinished upload %s", leftover)
            remove(leftover)
        fsync_dir(self.tmp_dir)
        fsync_dir(self.versions_dir)

    def quarantine(self, key: str, reason: str) -> str:
        """Move ``adapters/<key>`` (a folder, or a stray file) to ``quarantine/<time>-<key>/``."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.quarantine_dir / f"{stamp}-{key}"
        suffix = 1
        while target.exists():
            suffix += 1
            target = self.quarantine_dir / f"{stamp}-{key}-{suffix}"
        target.mkdir(parents=True)
        source = self.versions_dir / key
        if source.exists() or source.is_symlink():
            os.rename(source, target / key)
        (target / "REASON.txt").write_text(reason + "\n")
        fsync_dir(target)
        fsync_dir(self.quarantine_dir)
        fsync_dir(self.versions_dir)
        return str(target.relative_to(self.root))


class OpenVersion:
    """A local version's two files, open: ``config`` (read whole), ``weights_fd`` and
    ``weights_size`` (read by the caller), and :meth:`stamp`, the stamp of the open files now: the
    files read are the ones opened, even if another file is renamed into their place meanwhile."""

    def __init__(self, folder: Path) -> None:
        self._config_fd = os.open(folder / CONFIG_FILE, os.O_RDONLY)
        try:
            self.weights_fd = os.open(folder / WEIGHTS_FILE, os.O_RDONLY)
        except BaseException:
            os.close(self._config_fd)
            raise
        self.weights_size = os.fstat(self.weights_fd).st_size
        self.config = b""

    def stamp(self) -> Stamp:
        return file_stamp(os.fstat(self._config_fd)), file_stamp(os.fstat(self.weights_fd))

    def read_config(self) -> bytes:
        size = os.fstat(self._config_fd).st_size
        self.config = os.pread(self._config_fd, size, 0)
        return self.config

    def close(self) -> None:
        os.close(self.weights_fd)
        os.close(self._config_fd)

    def __enter__(self) -> OpenVersion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover (Windows)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
