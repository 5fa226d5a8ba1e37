"""Compile a C kernel on first use, cache it, and load it only from a place no one else can write.

Used by the grouped LoRA kernel (``sgmv_cpu.py``) and the quantized linear kernels
(``native/quant_cpu.py``). The steps every compiled kernel shares:

    source + flags ──sha256──► <cache_dir>/kernels/<name>-<hash>.so   (built once, atomically)
                                   │ directory: ours, not group/other-writable, else a fresh
                                   │            private mkdtemp of this process
                                   ▼ file: ours, not group/other-writable, else rebuilt privately
                               ctypes.CDLL ──► the caller checks it against its reference

Without a C compiler, on a CPU without AVX2/FMA, or when anything here fails, ``build`` returns
None and the caller keeps its PyTorch form.

Why the ownership checks: the library's path is predictable, so a library planted there by
another local user (a shared or group-writable cache directory) would otherwise be loaded and
run inside the server (issue 31, finding 8).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)

Kernel = TypeVar("Kernel")

AVX2_FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")


def cpu_supports_avx2_fma() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = next(
            (
                line.split(":", 1)[1].split()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("flags")
            ),
            [],
        )
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


def is_private(path: Path, directory: bool) -> bool:
    """True when ``path`` exists, is a directory (or a regular file), is owned by this process's
    user and is writable by neither its group nor others (``os.stat``, links followed)."""
    try:
        info = os.stat(path)
    except OSError:
        return False
    kind_ok = stat.S_ISDIR(info.st_mode) if directory else stat.S_ISREG(info.st_mode)
    return kind_ok and info.st_uid == os.getuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _private_cache(cache_dir: Path, label: str) -> Path | None:
    """``<cache_dir>/kernels``, created 0700 if missing; None when it exists but is not private
    (or cannot be created)."""
    directory = cache_dir / "kernels"
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        log.info("%s: cannot create %s (%s)", label, directory, error)
        return None
    if not is_private(directory, directory=True):
        log.warning(
            "%s: %s is not owned by this user or is writable by others; building in a private "
            "temporary directory instead (fix: chmod go-w, or choose another --cache-dir)",
            label,
            directory,
        )
        return None
    return directory


def compile_library(
    name: str, source: Path, cache_dir: Path, label: str, flags: Sequence[str] = AVX2_FLAGS
) -> Path | None:
    """The shared library for this source and these flags: found in, or compiled once into, a
    private kernels directory (see the module docstring). None when it cannot be built."""
    compiler = shlex.split(os.environ.get("CC") or "cc")  # e.g. CC="ccache gcc"
    if not compiler or shutil.which(compiler[0]) is None:
        log.info("%s: no C compiler (%s); using PyTorch ops", label, " ".join(compiler))
        return None
    digest = hashlib.sha256(source.read_bytes() + " ".join((*compiler, *flags)).encode()).hexdigest()[:16]
    filename = f"{name}-{digest}.so"
    shared = _private_cache(cache_dir, label)
    for directory in ([shared] if shared is not None else []) + [None]:  # None: a fresh mkdtemp
        try:
            directory = directory or Path(tempfile.mkdtemp(prefix="loraplex-kernels-"))  # 0700, ours
            target = directory / filename
            if target.exists():
                if is_private(target, directory=False):
                    return target
                log.warning("%s: refusing %s (not ours, or writable by others); rebuilding", label, target)
                continue  # never load it: build in a fresh private directory instead
            with tempfile.TemporaryDirectory(dir=directory) as scratch:
                built = Path(scratch) / filename
                result = subprocess.run(
                    [*compiler, *flags, "-o", str(built), str(source)],
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                if result.returncode != 0:
                    log.warning(
                        "%s: %s failed; using PyTorch ops:\n%s",
                        label,
                        " ".join(compiler),
                        result.stderr[-2000:],
                    )
                    return None
                os.chmod(built, 0o700)
                os.replace(built, target)  # atomic: a concurrent build leaves one complete file
            return target
        except (OSError, subprocess.SubprocessError) as error:  # unwritable cache, hung compiler: next
            log.info("%s: cannot build in %s (%s)", label, directory, error)
    return None


def load_library(path: Path, label: str) -> ctypes.CDLL | None:
    """``ctypes.CDLL(path)`` if the file is still ours and not writable by others, else None."""
    if not is_private(path, directory=False):
        log.warning("%s: refusing to load %s (not ours, or writable by others)", label, path)
        return None
    try:
        return ctypes.CDLL(str(path))
    except OSError as error:
        log.warning("%s: cannot load %s (%s); using PyTorch ops", label, path, error)
        return None


def build(
    name: str, source: Path, cache_dir: Path, label: str, flags: Sequence[str] = AVX2_FLAGS
) -> ctypes.CDLL | None:
    """Compile (or find) and load the library; None where it cannot be built or loaded here."""
    if not cpu_supports_avx2_fma():
        log.info("%s: this CPU lacks AVX2/FMA; using PyTorch ops", label)
        return None
    path = compile_library(name, source, cache_dir, label, flags)
    return None if path is None else load_library(path, label)


def load_checked(
    name: str,
    source: Path,
    cache_dir: Path,
    label: str,
    wrap: Callable[[ctypes.CDLL], Kernel],
    agrees: Callable[[Kernel], bool],
    flags: Sequence[str] = AVX2_FLAGS,
) -> Kernel | None:
    """``build``, wrap the library, check it against the caller's reference: the kernel, or None
    (logged) where any step fails or disagrees, so the caller's PyTorch form serves and a model load
    never fails because of a compiled kernel."""
    try:
        library = build(name, source, cache_dir, label, flags)
        if library is None:
            return None
        kernel = wrap(library)
        if not agrees(kernel):
            log.warning("%s: disagrees with the reference on this machine; using PyTorch ops", label)
            return None
    except Exception:
        log.exception("%s: could not be built or checked; using PyTorch ops", label)
        return None
    log.info("%s loaded", label)
    return kernel
