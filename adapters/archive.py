"""Read an uploaded adapter's two files safely: from multipart file parts, an archive, or a directory.

Uploads are untrusted. Nothing here extracts anything to disk or unpickles anything: the two
files an adapter needs (``adapter_config.json``, ``adapter_model.safetensors``) are read into
memory, and everything else in an archive is only looked at, never read. Refused, each with an
:class:`ArchiveError` whose message says how to fix the upload:

- entries with absolute paths, ``..`` components or drive letters (zip-slip), symlinks,
  hardlinks, devices, encrypted zip entries, the same path twice;
- more than one adapter, or one buried deeper than a single top folder;
- pickle weights (``adapter_model.bin``, ``.pt``) instead of safetensors;
- more than :data:`MAX_MEMBERS` entries, or members that together decompress to more than the
  upload limit (zip bombs): ``error_type`` ``too_large``, which the API answers with 413;
- oversized or malformed archive structures (``adapters.archive_bounds``, checked before the
  standard library parses them: zip central directories, pax and GNU long-name headers).
"""

from __future__ import annotations

import posixpath
import re
import stat
import tarfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from adapters.archive_bounds import NOT_AN_ARCHIVE, check_tar_headers, check_zip_directory
from adapters.errors import AdapterError, ArchiveError
from adapters.peft_format import CONFIG_FILE, PICKLE_WEIGHT_FILES, WEIGHTS_FILE

MAX_MEMBERS = 256  # a PEFT adapter folder holds 2-4 files; anything near this is not an adapter
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
_CHUNK = 1 << 20
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")
_DRIVE_RE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class AdapterFiles:
    """The raw bytes of one uploaded adapter, and a name an id can be derived from."""

    config: bytes  # adapter_config.json
    weights: bytes  # adapter_model.safetensors
    name: str | None = None  # the archive's top folder or file stem, untrusted: sanitize before use

    @property
    def size(self) -> int:
        return len(self.config) + len(self.weights)


@dataclass(frozen=True)
class _Entry:
    path: str  # normalized, relative, '/'-separated
    size: int  # declared uncompressed size
    handle: object  # zipfile.ZipInfo or tarfile.TarInfo


# --------------------------------------------------------------------------- multipart parts


def read_parts(parts: Iterable[tuple[str | None, BinaryIO]], max_bytes: int) -> AdapterFiles:
    """Pick ``adapter_config.json`` and ``adapter_model.safetensors`` from named file parts.

    Only the base name of each part's filename counts (browsers may send ``folder/name``).
    """
    found: dict[str, BinaryIO] = {}
    folder: str | None = None  # 'my-adapter/adapter_config.json' names the adapter 'my-adapter'
    for filename, fileobj in parts:
        path = (filename or "").replace("\\", "/")
        name = posixpath.basename(path)
        folder = folder or posixpath.basename(posixpath.dirname(path)) or None
        if name in PICKLE_WEIGHT_FILES or name.endswith((".bin", ".pt", ".pth", ".pkl")):
            raise _pickle_error(name)
        if name not in (CONFIG_FILE, WEIGHTS_FILE):
            raise ArchiveError(
                f"unexpected file part {filename!r}: field 'files' takes exactly two parts named "
                f"{CONFIG_FILE!r} and {WEIGHTS_FILE!r}.",
                "invalid_upload",
            )
        if name in found:
            raise ArchiveError(f"field 'files' holds {name!r} twice; send each file once.", "invalid_upload")
        found[name] = fileobj
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if required not in found:
            raise ArchiveError(
                f"field 'files' has no part named {required!r}; send both {CONFIG_FILE!r} and "
                f"{WEIGHTS_FILE!r} (or one 'archive' part).",
                "missing_file",
            )
    return AdapterFiles(
        config=_read_limited(found[CONFIG_FILE], max_bytes, CONFIG_FILE),
        weights=_read_limited(found[WEIGHTS_FILE], max_bytes, WEIGHTS_FILE),
        name=folder,
    )


# --------------------------------------------------------------------------- archives


def read_archive(fileobj: BinaryIO, filename: str | None, max_bytes: int) -> AdapterFiles:
    """Read the adapter inside a .zip, .tar, .tar.gz or .tgz (detected from its bytes, not its name)."""
    fileobj.seek(0)
    magic = fileobj.read(4)
    fileobj.seek(0)
    stem = archive_stem(filename)
    if not magic:
        raise ArchiveError(
            "the 'archive' part is empty; upload a .zip, .tar or .tar.gz file.", "invalid_archive"
        )
    try:
        if magic in _ZIP_MAGIC:
            return _read_zip(fileobj, stem, max_bytes)
        return _read_tar(fileobj, stem, max_bytes)
    except AdapterError:
        raise
    except Exception as exc:  # any parser failure on untrusted bytes is the upload's fault, never a 500
        raise ArchiveError(
            f"the 'archive' part {filename or ''!r} is not a readable .zip, .tar or .tar.gz file "
            f"({type(exc).__name__}: {exc}); re-create the archive and upload it again.",
            "invalid_archive",
        ) from exc


def archive_stem(filename: str | None) -> str | None:
    """``my-adapter.tar.gz`` -> ``my-adapter`` (the last path component only)."""
    if not filename:
        return None
    name = posixpath.basename(filename.replace("\\", "/"))
    lowered = name.lower()
    for suffix in ARCHIVE_SUFFIXES:
        if lowered.endswith(suffix):
            return name[: -len(suffix)] or None
    return name.rsplit(".", 1)[0] or None


def _read_zip(fileobj: BinaryIO, stem: str | None, max_bytes: int) -> AdapterFiles:
    check_zip_directory(fileobj, MAX_MEMBERS)  # before zipfile builds an object per entry
    with zipfile.ZipFile(fileobj) as zf:
        infos = zf.infolist()
        _check_count(len(infos))
        entries = []
        for info in infos:
            path = _safe_path(info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise _link_error(info.filename)
            if info.is_dir():
                continue
            if info.flag_bits & 0x1:
                raise ArchiveError(
                    f"archive entry {info.filename!r} is encrypted; upload an archive without a password.",
                    "invalid_archive",
                )
            entries.append(_Entry(path, info.file_size, info))
        _check_total(entries, max_bytes)
        config, weights, name = _select(entries, stem)

        def read(entry: _Entry) -> bytes:
            with zf.open(entry.handle) as member:  # type: ignore[arg-type]
                return _read_limited(member, min(entry.size, max_bytes), entry.path)

        return AdapterFiles(config=read(config), weights=read(weights), name=name)


def _read_tar(fileobj: BinaryIO, stem: str | None, max_bytes: int) -> AdapterFiles:
    # before tarfile parses a header: bounded pax/long-name headers (CVE-2024-6232), sizes, count
    check_tar_headers(fileobj, MAX_MEMBERS, max_bytes)
    try:
        tf = tarfile.open(fileobj=fileobj, mode="r:*")  # noqa: SIM115 (closed by the `with tf` below)
    except tarfile.ReadError as exc:
        raise ArchiveError(NOT_AN_ARCHIVE, "invalid_archive") from exc
    with tf:
        entries: list[_Entry] = []
        total = 0
        count = 0
        # Iterate lazily: a member's declared size is checked before tarfile skips over its data.
        for member in tf:
            count += 1
            _check_count(count)
            path = _safe_path(member.name)
            if member.issym() or member.islnk():
                raise _link_error(member.name)
            if member.isdir():
                continue
            if not member.isfile():
                raise ArchiveError(
                    f"archive entry {member.name!r} is a device, fifo or other special file; "
                    "an adapter archive holds regular files only.",
                    "unsafe_archive",
                )
            total += member.size
            if total > max_bytes:
                raise _too_large(max_bytes)
            entries.append(_Entry(path, member.size, member))
        config, weights, name = _select(entries, stem)

        def read(entry: _Entry) -> bytes:
            member = tf.extractfile(entry.handle)  # type: ignore[arg-type]
            if member is None:
                raise ArchiveError(f"archive entry {entry.path!r} cannot be read.", "invalid_archive")
            with member:
                return _read_limited(member, min(entry.size, max_bytes), entry.path)

        return AdapterFiles(config=read(config), weights=read(weights), name=name)


def _safe_path(raw: str) -> str:
    """Normalize an entry name; refuse the ones that would escape a target folder."""
    name = raw.replace("\\", "/")
    parts = name.split("/")
    if name.startswith("/") or _DRIVE_RE.match(name) or ".." in parts or "\x00" in name:
        raise ArchiveError(
            f"archive entry {raw!r} has an absolute path or a '..' component (zip-slip); "
            "create the archive from inside the adapter folder (e.g. `zip -r adapter.zip my-adapter/`).",
            "unsafe_archive",
        )
    clean = "/".join(p for p in parts if p not in ("", "."))
    return clean


def _select(entries: list[_Entry], stem: str | None) -> tuple[_Entry, _Entry, str | None]:
    """Find the one adapter folder (root or a single top folder) and its two files."""
    by_path: dict[str, _Entry] = {}
    for entry in entries:
        if entry.path in by_path:
            raise ArchiveError(
                f"archive holds {entry.path!r} twice; re-create it with each file once.", "unsafe_archive"
            )
        by_path[entry.path] = entry
    adapter_names = {CONFIG_FILE, WEIGHTS_FILE, *PICKLE_WEIGHT_FILES}
    folders = sorted({posixpath.dirname(p) for p in by_path if posixpath.basename(p) in adapter_names})
    if not folders:
        raise ArchiveError(
            f"the archive holds no {CONFIG_FILE} / {WEIGHTS_FILE}; archive the folder PEFT's save_pretrained "
            "wrote.",
            "missing_file",
        )
    if len(folders) > 1:
        shown = ", ".join(repr(f or ".") for f in folders[:4])
        raise ArchiveError(
            f"the archive holds more than one adapter (adapter files in {shown}); "
            "upload one adapter per request.",
            "multiple_adapters",
        )
    folder = folders[0]
    if folder.count("/") > 0:
        raise ArchiveError(
            f"the adapter files are in {folder!r}, nested too deep; put them at the archive root or in a "
            "single top folder.",
            "invalid_archive",
        )

    def member(name: str) -> _Entry | None:
        return by_path.get(posixpath.join(folder, name) if folder else name)

    weights, config = member(WEIGHTS_FILE), member(CONFIG_FILE)
    if weights is None:
        pickled = [n for n in PICKLE_WEIGHT_FILES if member(n) is not None]
        if pickled:
            raise _pickle_error(pickled[0])
        raise ArchiveError(f"the archive has no {WEIGHTS_FILE} next to {CONFIG_FILE}.", "missing_file")
    if config is None:
        raise ArchiveError(f"the archive has no {CONFIG_FILE} next to {WEIGHTS_FILE}.", "missing_file")
    return config, weights, folder or stem


def _check_count(count: int) -> None:
    if count > MAX_MEMBERS:
        raise ArchiveError(
            f"the archive has more than {MAX_MEMBERS} entries; an adapter archive holds "
            f"{CONFIG_FILE} and {WEIGHTS_FILE}.",
            "invalid_archive",
        )


def _check_total(entries: list[_Entry], max_bytes: int) -> None:
    if sum(e.size for e in entries) > max_bytes:
        raise _too_large(max_bytes)


def _too_large(max_bytes: int) -> ArchiveError:
    return ArchiveError(
        f"the archive decompresses to more than the upload limit of {max_bytes // (1 << 20)} MiB "
        "(--max-upload-mb); upload a smaller adapter or raise the limit.",
        "too_large",
    )


def _link_error(name: str) -> ArchiveError:
    return ArchiveError(
        f"archive entry {name!r} is a symbolic or hard link, which is never followed; "
        "archive the adapter's files themselves (e.g. `tar --dereference`).",
        "unsafe_archive",
    )


def _pickle_error(name: str) -> ArchiveError:
    return ArchiveError(
        f"{name} is a pickle file, which loraplex never loads (unpickling can run code); convert it on a "
        "trusted machine with `safetensors.torch.save_file(torch.load(path), 'adapter_model.safetensors')` "
        "and upload the .safetensors file.",
        "pickle_refused",
    )


def _read_limited(stream: BinaryIO, limit: int, what: str) -> bytes:
    """Read at most ``limit`` bytes; more (a lying size field, a bomb) is an error."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = stream.read(min(_CHUNK, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise ArchiveError(
                f"{what} is larger than it declares or than the upload limit of {limit} bytes; "
                "re-create the upload.",
                "too_large",
            )
    return b"".join(chunks)


# --------------------------------------------------------------------------- directories (--adapter ID=PATH)


def read_adapter_dir(path: str | Path, max_bytes: int | None = None) -> AdapterFiles:
    """Read a local PEFT adapter folder (trusted location, untrusted contents: pickles are refused)."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ArchiveError(f"adapter path {str(directory)!r} is not a directory.", "not_found")
    weights, config = directory / WEIGHTS_FILE, directory / CONFIG_FILE
    if not weights.is_file():
        pickled = [n for n in PICKLE_WEIGHT_FILES if (directory / n).exists()]
        if pickled:
            raise _pickle_error(pickled[0])
        raise ArchiveError(f"{directory} has no {WEIGHTS_FILE}.", "missing_file")
    if not config.is_file():
        raise ArchiveError(f"{directory} has no {CONFIG_FILE}.", "missing_file")
    limit = max_bytes if max_bytes is not None else weights.stat().st_size + config.stat().st_size
    with config.open("rb") as c, weights.open("rb") as w:
        return AdapterFiles(
            config=_read_limited(c, limit, CONFIG_FILE),
            weights=_read_limited(w, limit, WEIGHTS_FILE),
            name=directory.name,
        )
