"""Building and loading compiled kernels (server/engine/cpu_build.py): only from private places.

Issue 31, finding 8: a library planted at the predictable ``<cache_dir>/kernels/<name>-<hash>.so``
was loaded and run. Now the kernels directory must be ours and not group/other-writable, and so
must the library file; otherwise a fresh private directory is used.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from server.engine import cpu_build

SOURCE = "int loraplex_answer(void) { return 42; }\n"
FLAGS = ("-O1", "-shared", "-fPIC")


@pytest.fixture
def _cc_present() -> None:
    """These tests fail, never skip, without a C compiler: make setup installs one, CI has it."""
    if shutil.which("cc") is None:
        pytest.fail("this test needs a C compiler (make setup installs one)")


needs_cc = pytest.mark.usefixtures("_cc_present")


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "answer.c"
    path.write_text(SOURCE)
    return path


def _build(source: Path, cache: Path) -> Path | None:
    return cpu_build.compile_library("answer", source, cache, "test kernel", FLAGS)


@needs_cc
def test_builds_into_a_private_kernels_directory_and_reuses_it(tmp_path: Path, source: Path) -> None:
    cache = tmp_path / "cache"
    path = _build(source, cache)
    assert path is not None and path.parent == cache / "kernels"
    assert stat.S_IMODE(os.stat(cache / "kernels").st_mode) & 0o077 == 0
    assert cpu_build.is_private(path, directory=False)
    assert cpu_build.load_library(path, "test").loraplex_answer() == 42
    mtime = path.stat().st_mtime_ns
    assert _build(source, cache) == path and path.stat().st_mtime_ns == mtime  # cached, not rebuilt


@needs_cc
def test_a_group_or_world_writable_kernels_directory_is_never_used(tmp_path: Path, source: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "kernels").mkdir(parents=True)
    os.chmod(cache / "kernels", 0o777)
    path = _build(source, cache)
    assert path is not None and path.parent != cache / "kernels"
    assert cpu_build.is_private(path.parent, directory=True)  # a fresh mkdtemp of ours
    assert not list((cache / "kernels").iterdir())
    shutil.rmtree(path.parent)


@needs_cc
def test_a_planted_writable_library_is_neither_loaded_nor_reused(tmp_path: Path, source: Path) -> None:
    cache = tmp_path / "cache"
    genuine = _build(source, cache)
    assert genuine is not None
    planted_bytes = b"not a library: loading this would fail loudly"
    genuine.write_bytes(planted_bytes)
    os.chmod(genuine, 0o666)  # what another user could have written
    assert cpu_build.load_library(genuine, "test") is None
    rebuilt = _build(source, cache)
    assert rebuilt is not None and rebuilt != genuine and rebuilt.parent != genuine.parent
    assert cpu_build.load_library(rebuilt, "test").loraplex_answer() == 42
    assert genuine.read_bytes() == planted_bytes  # left alone, never run
    shutil.rmtree(rebuilt.parent)


def test_private_means_ours_and_not_writable_by_others(tmp_path: Path) -> None:
    file = tmp_path / "f.so"
    file.write_bytes(b"x")
    os.chmod(file, 0o700)
    assert cpu_build.is_private(file, directory=False)
    assert not cpu_build.is_private(file, directory=True)  # not a directory
    for mode in (0o720, 0o702):
        os.chmod(file, mode)
        assert not cpu_build.is_private(file, directory=False)
    assert not cpu_build.is_private(tmp_path / "missing", directory=False)
    os.chmod(file, 0o700)
    if os.getuid() == 0:  # root can hand the file to another user and check the owner rule too
        os.chown(file, 12345, -1)
        assert not cpu_build.is_private(file, directory=False)
