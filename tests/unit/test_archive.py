"""adapters.archive: uploads read safely from parts, zip/tar archives and folders; every refusal named."""

from __future__ import annotations

import contextlib
import io
import zipfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.archive import (
    MAX_MEMBERS,
    AdapterFiles,
    ArchiveError,
    archive_stem,
    read_adapter_dir,
    read_archive,
    read_parts,
)
from tests.adapter_files import CONFIG, WEIGHTS, tar_bytes, zip_bytes

LIMIT = 1 << 20
CFG, W = b'{"r": 8}', b"weights-bytes"
GOOD = {CONFIG: CFG, WEIGHTS: W}


def read(data: bytes, filename: str | None = "upload.zip", limit: int = LIMIT) -> AdapterFiles:
    return read_archive(io.BytesIO(data), filename, limit)


def refused(data: bytes, error_type: str, *words: str, filename: str = "upload.zip") -> ArchiveError:
    with pytest.raises(ArchiveError) as info:
        read(data, filename)
    assert info.value.error_type == error_type, info.value.message
    for word in words:
        assert word in info.value.message
    return info.value


@pytest.mark.parametrize(
    "pack",
    [
        pytest.param(lambda m: zip_bytes(m), id="zip"),
        pytest.param(lambda m: tar_bytes(m), id="tar"),
        pytest.param(lambda m: tar_bytes(m, gz=True), id="tgz"),
    ],
)
@pytest.mark.parametrize("top", ["", "my-adapter/", "./"])
def test_reads_the_two_files_at_root_or_in_one_top_folder(pack, top: str) -> None:
    members = {top + CONFIG: CFG, top + WEIGHTS: W, top + "README.md": b"# card"}
    files = read(pack(members), "bundle.tar.gz")
    assert (files.config, files.weights) == (CFG, W)
    assert files.name == ("my-adapter" if top == "my-adapter/" else "bundle")


def test_archive_type_comes_from_the_bytes_not_the_name() -> None:
    assert read(tar_bytes(GOOD, gz=True), "misnamed.zip").weights == W
    assert read(zip_bytes(GOOD), "misnamed.tgz").weights == W


@pytest.mark.parametrize("name", ["/etc/adapter_config.json", "../adapter_config.json", "a/../../x", "C:/x"])
def test_zip_slip_paths_are_refused(name: str) -> None:
    refused(zip_bytes({**GOOD, name: b"x"}), "unsafe_archive", repr(name), "zip-slip")
    refused(tar_bytes({**GOOD, name: b"x"}), "unsafe_archive", "zip-slip")


def test_backslash_parent_paths_are_refused() -> None:
    refused(zip_bytes({**GOOD, "..\\evil.txt": b"x"}), "unsafe_archive", "zip-slip")


def test_links_are_refused() -> None:
    refused(tar_bytes(GOOD, symlinks={"x": "/etc/passwd"}), "unsafe_archive", "'x'", "link")
    refused(tar_bytes({CONFIG: CFG}, symlinks={WEIGHTS: "/etc/passwd"}), "unsafe_archive", "link")
    refused(tar_bytes(GOOD, hardlinks={"h": CONFIG}), "unsafe_archive", "'h'", "link")
    refused(zip_bytes(GOOD, symlinks={"z": "/etc/passwd"}), "unsafe_archive", "'z'", "link")


def test_more_than_one_adapter_is_refused() -> None:
    two = {"a/" + CONFIG: CFG, "a/" + WEIGHTS: W, "b/" + CONFIG: CFG, "b/" + WEIGHTS: W}
    refused(zip_bytes(two), "multiple_adapters", "more than one adapter", "'a'", "'b'")
    refused(tar_bytes({**GOOD, "b/" + CONFIG: CFG}), "multiple_adapters", "one adapter per request")


def test_nested_too_deep_missing_files_and_duplicates() -> None:
    refused(zip_bytes({"a/b/" + CONFIG: CFG, "a/b/" + WEIGHTS: W}), "invalid_archive", "single top folder")
    refused(zip_bytes({CONFIG: CFG}), "missing_file", WEIGHTS)
    refused(zip_bytes({WEIGHTS: W}), "missing_file", CONFIG)
    refused(zip_bytes({"notes.txt": b"hi"}), "missing_file", CONFIG)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf, pytest.warns(UserWarning):
        for name, data in (*GOOD.items(), (WEIGHTS, b"other")):
            zf.writestr(name, data)
    refused(buf.getvalue(), "unsafe_archive", "twice")


@pytest.mark.parametrize("pickle_name", ["adapter_model.bin", "adapter_model.pt"])
def test_pickle_weights_are_refused_never_read(pickle_name: str) -> None:
    err = refused(zip_bytes({CONFIG: CFG, pickle_name: b"\x80\x04not-read"}), "pickle_refused", pickle_name)
    assert "safetensors" in err.message


def test_not_an_archive() -> None:
    refused(b"just some text, not an archive", "invalid_archive", "zip", "tar")
    refused(b"", "invalid_archive", "empty")
    refused(b"PK\x03\x04" + b"\x00" * 40, "invalid_archive")
    refused(zip_bytes(GOOD)[:-30], "invalid_archive")  # truncated central directory


def test_decompression_bombs_are_refused_by_size() -> None:
    bomb = {CONFIG: CFG, WEIGHTS: b"\x00" * (LIMIT + 1)}  # deflates to ~1 kB
    assert len(zip_bytes(bomb)) < 10_000
    refused(zip_bytes(bomb), "too_large", "MiB")
    refused(tar_bytes(bomb, gz=True), "too_large")


def test_lying_zip_sizes_are_caught_while_reading() -> None:
    data = bytearray(zip_bytes({CONFIG: CFG, WEIGHTS: b"\x00" * 5000}))
    at, start = -1, 0
    while (start := data.find(b"PK\x01\x02", start + 1)) > 0:  # central directory headers
        name_len = int.from_bytes(data[start + 28 : start + 30], "little")
        if data[start + 46 : start + 46 + name_len] == WEIGHTS.encode():
            at = start
    assert at > 0
    data[at + 24 : at + 28] = (100).to_bytes(4, "little")  # declares 100 bytes, holds 5000
    refused(bytes(data), "invalid_archive")


def test_too_many_members() -> None:
    members = {f"f{i}.txt": b"" for i in range(MAX_MEMBERS + 1)}
    refused(zip_bytes({**GOOD, **members}), "invalid_archive", "entries")
    refused(tar_bytes({**GOOD, **members}), "invalid_archive", "entries")


def test_read_parts() -> None:
    files = read_parts([("my-lora/" + CONFIG, io.BytesIO(CFG)), (WEIGHTS, io.BytesIO(W))], LIMIT)
    assert (files.config, files.weights, files.name) == (CFG, W, "my-lora")
    with pytest.raises(ArchiveError, match="pickle"):
        read_parts([(CONFIG, io.BytesIO(CFG)), ("adapter_model.bin", io.BytesIO(b""))], LIMIT)
    with pytest.raises(ArchiveError, match=r"no part named 'adapter_model\.safetensors'"):
        read_parts([(CONFIG, io.BytesIO(CFG))], LIMIT)
    with pytest.raises(ArchiveError, match=r"unexpected file part 'x\.txt'"):
        read_parts([(CONFIG, io.BytesIO(CFG)), ("x.txt", io.BytesIO(W))], LIMIT)
    with pytest.raises(ArchiveError, match="twice"):
        read_parts([(CONFIG, io.BytesIO(CFG)), (CONFIG, io.BytesIO(CFG))], LIMIT)
    with pytest.raises(ArchiveError) as info:
        read_parts([(CONFIG, io.BytesIO(CFG)), (WEIGHTS, io.BytesIO(b"x" * 11))], 10)
    assert info.value.error_type == "too_large"


def test_read_adapter_dir(tmp_path) -> None:
    (tmp_path / CONFIG).write_bytes(CFG)
    with pytest.raises(ArchiveError, match=r"no adapter_model\.safetensors"):
        read_adapter_dir(tmp_path)
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ArchiveError, match="never loads"):
        read_adapter_dir(tmp_path)
    (tmp_path / WEIGHTS).write_bytes(W)
    assert read_adapter_dir(tmp_path) == AdapterFiles(CFG, W, tmp_path.name)
    with pytest.raises(ArchiveError, match="not a directory"):
        read_adapter_dir(tmp_path / "missing")


def test_archive_stem() -> None:
    assert archive_stem("dir/My Adapter.tar.gz") == "My Adapter"
    assert archive_stem("x.TGZ") == "x" and archive_stem("a.b.zip") == "a.b" and archive_stem(None) is None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=4096), magic=st.sampled_from([b"", b"PK\x03\x04", b"\x1f\x8b\x08", b"BZh"]))
def test_random_bytes_never_escape_as_other_errors(data: bytes, magic: bytes) -> None:
    try:
        read(magic + data)
    except ArchiveError as exc:
        assert exc.error_type in {
            "invalid_archive",
            "unsafe_archive",
            "missing_file",
            "multiple_adapters",
            "too_large",
        }


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_corrupted_archives_fail_cleanly(data) -> None:
    kind = data.draw(st.sampled_from(["zip", "tar", "tgz"]))
    blob = bytearray({"zip": zip_bytes, "tar": tar_bytes, "tgz": lambda m: tar_bytes(m, gz=True)}[kind](GOOD))
    for _ in range(data.draw(st.integers(1, 8))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(blob)))
    with contextlib.suppress(ArchiveError):  # tar has no checksum over data: a flipped byte may parse
        read(bytes(blob[:cut]))
