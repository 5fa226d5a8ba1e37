"""Archive structures bounded before the standard library parses them (issue 31, finding 5): the
tar pax ReDoS (CVE-2024-6232 in Python < 3.11.10), huge GNU long names, huge zip central
directories. Each attack is refused quickly and in bounded memory; ordinary archives still read."""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import time
import tracemalloc

import pytest

from adapters.archive import MAX_MEMBERS, ArchiveError, read_archive
from adapters.archive_bounds import MAX_PAX_BYTES
from tests.adapter_files import CONFIG, WEIGHTS, tar_bytes

LIMIT = 64 << 20
GOOD = {CONFIG: b'{"r": 8}', WEIGHTS: b"weights-bytes"}


def _special(kind: bytes, data: bytes, name: str = "././@Header") -> bytes:
    """A tar header block of type ``kind`` carrying ``data``, then a regular adapter archive."""
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data)
    padding = b"\0" * (-len(data) % 512)
    return info.tobuf(format=tarfile.USTAR_FORMAT) + data + padding + tar_bytes(GOOD)


def _refused_quickly(blob: bytes, *words: str, seconds: float = 0.5, peak_mib: float = 16) -> None:
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(ArchiveError) as info:
            read_archive(io.BytesIO(blob), "a.tar.gz", LIMIT)
        elapsed = time.monotonic() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < seconds and peak < peak_mib * (1 << 20), (elapsed, peak)
    for word in words:
        assert word in info.value.message, info.value.message


def test_a_pax_header_made_to_backtrack_is_refused_at_once() -> None:
    """CVE-2024-6232: a 100 KB pax header of digits (gzip: a few hundred bytes) took the venv's
    tarfile seconds (quadratic); an 8 KB one of digits is refused by the digit-run rule."""
    bomb = gzip.compress(_special(tarfile.XHDTYPE, b"1" * 100_000))
    assert len(bomb) < 1000
    _refused_quickly(bomb, "pax header", "100000 bytes")
    _refused_quickly(gzip.compress(_special(tarfile.XHDTYPE, b"1" * (MAX_PAX_BYTES - 1))), "digits")
    _refused_quickly(_special(tarfile.XHDTYPE, b"12 path=a\n"), "malformed")


def test_a_huge_gnu_long_name_is_refused_before_it_is_read() -> None:
    bomb = gzip.compress(_special(tarfile.GNUTYPE_LONGNAME, b"a" * (64 << 20)))
    _refused_quickly(bomb, "GNU long-name", seconds=2.0)


def test_a_sparse_member_is_refused() -> None:
    _refused_quickly(_special(tarfile.GNUTYPE_SPARSE, b"x" * 10, name="sparse"), "sparse")


def _zip_with_directory(entries: int) -> bytes:
    """A zip whose central directory lists ``entries`` empty files (written by hand: fast)."""
    records = []
    for i in range(entries):
        name = b"f%07d" % i
        records.append(struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, 0, 0, 0, len(name),
                                   0, 0, 0, 0, 0, 0) + name)  # fmt: skip
    directory = b"".join(records)
    eocd = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, min(entries, 0xFFFF), min(entries, 0xFFFF),
                       len(directory), 0, 0)  # fmt: skip
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, 0, 0, 0, 0, 0)  # one empty entry
    return local + directory + eocd


def test_a_zip_directory_of_many_entries_is_refused_before_parsing() -> None:
    blob = _zip_with_directory(300_000)  # 15 MB of central directory
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(ArchiveError) as info:
            read_archive(io.BytesIO(blob), "a.zip", LIMIT)
        elapsed, peak = time.monotonic() - started, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"more than {MAX_MEMBERS} entries" in info.value.message
    assert elapsed < 0.5 and peak < 4 << 20, (elapsed, peak)


def test_ordinary_pax_and_gnu_archives_still_read() -> None:
    long_folder = "a-folder-with-a-name-longer-than-one-hundred-characters-" * 2
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w:gz", format=fmt) as tf:
            for name, data in GOOD.items():
                info = tarfile.TarInfo(f"{long_folder}/{name}")
                info.size, info.mtime = len(data), 1_700_000_000.5
                info.pax_headers = {"comment": "é"} if fmt == tarfile.PAX_FORMAT else {}
                tf.addfile(info, io.BytesIO(data))
        files = read_archive(io.BytesIO(raw.getvalue()), "a.tar.gz", LIMIT)
        assert files.config == GOOD[CONFIG] and files.weights == GOOD[WEIGHTS]
