"""Bounds checked on an archive's raw structure before ``zipfile``/``tarfile`` build anything from it.

The standard library trusts what an archive declares: ``zipfile`` builds a ``ZipInfo`` for every
entry of the central directory (a 1M-entry directory costs ~450 MiB and seconds of CPU before our
entry count could be checked); ``tarfile`` reads a GNU long name of any declared size into memory,
and Python < 3.11.10 parses pax headers with regexes that take quadratic time (CVE-2024-6232: a
190-byte .tar.gz held the server for 14 s). So, in linear time and bounded memory:

- zip: the end-of-central-directory record (zip64 too) must declare at most ``max_members``
  entries and a central directory of at most :data:`MAX_ZIP_DIRECTORY_BYTES`;
- tar: every header block is walked (decompressing once, as tarfile would); each pax header is at
  most :data:`MAX_PAX_BYTES`, made of well-formed ``"<len> <key>=<value>\\n"`` records with no
  digit run longer than :data:`MAX_DIGIT_RUN` (what keeps the vulnerable regexes linear); a GNU
  long name at most :data:`MAX_LONG_NAME_BYTES`; no sparse files; at most ``max_members`` headers;
  declared sizes summing to at most the upload limit.

Each failure is an :class:`ArchiveError` saying what to fix.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import tarfile
from typing import BinaryIO

from adapters.errors import ArchiveError

MAX_ZIP_DIRECTORY_BYTES = 1 << 20  # 256 entries with long names fit easily
MAX_PAX_BYTES = 8192
MAX_LONG_NAME_BYTES = 4096  # PATH_MAX
MAX_DIGIT_RUN = 64
_BLOCK = 512
NOT_AN_ARCHIVE = (
    "the 'archive' part is neither a zip nor a tar archive (plain, gzip, bz2 or xz); "
    "upload a .zip, .tar or .tar.gz file."
)
_EOCD = b"PK\x05\x06"
_EOCD64_LOCATOR = b"PK\x06\x07"
_EOCD64 = b"PK\x06\x06"


def check_zip_directory(fileobj: BinaryIO, max_members: int) -> None:
    """Refuse a zip whose central directory declares too many entries or bytes (reads <= 64 KiB)."""
    fileobj.seek(0, 2)
    size = fileobj.tell()
    tail_size = min(size, 22 + 0xFFFF + 20)  # EOCD, its comment, the zip64 locator before it
    fileobj.seek(size - tail_size)
    tail = fileobj.read(tail_size)
    fileobj.seek(0)
    at = tail.rfind(_EOCD)
    if at < 0 or len(tail) - at < 22:
        raise ArchiveError(
            "the zip archive has no end-of-central-directory record; re-create it.", "invalid_archive"
        )
    _, _, _, _, entries, directory_bytes, _, _ = struct.unpack("<4s4H2LH", tail[at : at + 22])
    locator = tail[at - 20 : at] if at >= 20 else b""
    if locator.startswith(_EOCD64_LOCATOR):  # zip64: the real counts are in the zip64 record
        (offset,) = struct.unpack("<Q", locator[8:16])
        fileobj.seek(offset)
        record = fileobj.read(56)
        fileobj.seek(0)
        if len(record) < 56 or not record.startswith(_EOCD64):
            raise ArchiveError(
                "the zip archive's zip64 directory record is missing; re-create it.", "invalid_archive"
            )
        entries, directory_bytes = struct.unpack("<QQ", record[32:48])
    if entries > max_members:
        raise _too_many(max_members)
    if directory_bytes > MAX_ZIP_DIRECTORY_BYTES:
        raise ArchiveError(
            f"the zip archive's central directory is {directory_bytes} bytes (at most "
            f"{MAX_ZIP_DIRECTORY_BYTES} are read); an adapter archive holds a few files.",
            "invalid_archive",
        )


def check_tar_headers(fileobj: BinaryIO, max_members: int, max_bytes: int) -> None:
    """Walk every header of a (possibly compressed) tar stream; refuse what the module doc lists."""
    fileobj.seek(0)
    stream = _decompressed(fileobj)
    headers = total = 0
    while True:
        block = stream.read(_BLOCK)
        if len(block) < _BLOCK or block == bytes(_BLOCK):
            break  # the end-of-archive blocks (or a truncated archive: tarfile reports that)
        headers += 1
        if not _checksum_ok(block):
            if headers == 1:
                raise ArchiveError(NOT_AN_ARCHIVE, "invalid_archive")
            raise ArchiveError(
                f"tar header {headers} is damaged (bad checksum); re-create the archive.", "invalid_archive"
            )
        if headers > 2 * max_members:  # each member may carry one pax or long-name header
            raise _too_many(max_members)
        kind = block[156:157]
        try:
            size = tarfile.nti(block[124:136])
        except tarfile.InvalidHeaderError:
            raise ArchiveError(
                "a tar header has an unreadable size field; re-create the archive.", "invalid_archive"
            ) from None
        if size < 0:
            raise ArchiveError(
                "a tar header declares a negative size; re-create the archive.", "invalid_archive"
            )
        padded = -(-size // _BLOCK) * _BLOCK
        if kind in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE):
            if size > MAX_PAX_BYTES:
                raise _header_too_large("pax", size, MAX_PAX_BYTES)
            _check_pax_records(stream.read(padded)[:size])
            continue
        if kind in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
            if size > MAX_LONG_NAME_BYTES:
                raise _header_too_large("GNU long-name", size, MAX_LONG_NAME_BYTES)
            stream.read(padded)
            continue
        if kind == tarfile.GNUTYPE_SPARSE:
            raise ArchiveError(
                "the archive holds a sparse file; an adapter archive holds regular files.", "unsafe_archive"
            )
        total += size
        if total > max_bytes:
            raise ArchiveError(
                f"the archive decompresses to more than the upload limit of {max_bytes // (1 << 20)} MiB "
                "(--max-upload-mb); upload a smaller adapter or raise the limit.",
                "too_large",
            )
        _skip(stream, padded)
    fileobj.seek(0)


def _checksum_ok(block: bytes) -> bool:
    try:
        return tarfile.nti(block[148:156]) in tarfile.calc_chksums(block)
    except tarfile.InvalidHeaderError:
        return False


def _check_pax_records(data: bytes) -> None:
    """``"<len> <key>=<value>\\n"`` records back to back, each ``len`` bytes long, in linear time."""
    run = 0
    for byte in data:  # a long digit run makes CVE-2024-6232's regex search quadratic
        run = run + 1 if 48 <= byte <= 57 else 0
        if run > MAX_DIGIT_RUN:
            raise _bad_pax("a run of more than 64 digits")
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 21)
        if space <= pos or not data[pos:space].isdigit():
            raise _bad_pax(f"a record at byte {pos} does not start with its length")
        end = pos + int(data[pos:space])
        if (
            end > len(data)
            or end <= space + 2
            or data[end - 1 : end] != b"\n"
            or b"=" not in data[space + 2 : end]
        ):
            raise _bad_pax(f"the record at byte {pos} has a wrong length or no key=value")
        pos = end


def _decompressed(fileobj: BinaryIO) -> BinaryIO:
    magic = fileobj.read(6)
    fileobj.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=fileobj, mode="rb")  # type: ignore[return-value]
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(fileobj)  # type: ignore[return-value]
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(fileobj)  # type: ignore[return-value]
    return fileobj


def _skip(stream: BinaryIO, size: int) -> None:
    while size > 0:
        chunk = stream.read(min(size, 1 << 20))
        if not chunk:
            return
        size -= len(chunk)


def _too_many(max_members: int) -> ArchiveError:
    return ArchiveError(
        f"the archive has more than {max_members} entries; an adapter archive holds "
        "adapter_config.json and adapter_model.safetensors.",
        "invalid_archive",
    )


def _header_too_large(kind: str, size: int, limit: int) -> ArchiveError:
    return ArchiveError(
        f"a {kind} header of the archive is {size} bytes (at most {limit} are read); re-create the "
        "archive with plain names (e.g. `tar --format=gnu -czf adapter.tar.gz my-adapter/`).",
        "invalid_archive",
    )


def _bad_pax(what: str) -> ArchiveError:
    return ArchiveError(
        f"a pax header of the archive is malformed ({what}); re-create the archive.", "invalid_archive"
    )
