"""llama.cpp's ``llama-server`` as the anchor for one stream's speed (issue 25).

The anchor is llama.cpp as the ``llama-cpp-python`` source package vendors it, at the version the
``bench-llamacpp`` extra pins (pyproject.toml). The Python wheel carries the library but not the
``llama-server`` and ``llama-quantize`` programs, so this module downloads that source package
(``pip download``, from the package registry), and builds those two targets with CMake into
``bench/.cache/llama.cpp/`` once (~15-25 min on 2 cores; later runs reuse the build). It is
never part of ``make test``: only the benchmarks that are asked for it (``--llama-cpp``) build it.

The same weights on both sides: the embedded model ships as a Q4_1 GGUF, which loraplex expands
to float32 at start; ``llama-quantize --allow-requantize`` writes the same values as an F32 GGUF
(dequantizing Q4_1 is exact in float32), and the Q4_1 file itself is llama.cpp's quantized form.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.common import ROOT, free_port

CACHE = ROOT / "bench" / ".cache" / "llama.cpp"
PROGRAMS = ("llama-server", "llama-quantize")


def pinned_requirement() -> str:
    """``llama-cpp-python==X`` as the ``bench-llamacpp`` extra in pyproject.toml pins it."""
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'"(llama-cpp-python==[0-9.]+)"', text)
    if match is None:
        raise RuntimeError("pyproject.toml's bench-llamacpp extra pins no llama-cpp-python==X")
    return match.group(1)


def build(cache: Path = CACHE, jobs: int = 2) -> Path:
    """The directory holding ``llama-server`` and ``llama-quantize``, built once from source."""
    requirement = pinned_requirement()
    version = requirement.split("==")[1]
    build_dir = cache / version / "build"
    bin_dir = build_dir / "bin"
    if all((bin_dir / name).exists() for name in PROGRAMS):
        return bin_dir
    source = _source_tree(cache / version, requirement)
    configure = [
        "cmake", "-S", str(source), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
        "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON",
        "-DBUILD_SHARED_LIBS=OFF",
    ]  # fmt: skip
    print(f"building llama.cpp {version} (llama-server, llama-quantize) in {build_dir}", file=sys.stderr)
    subprocess.run(configure, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", *PROGRAMS],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return bin_dir


def _source_tree(root: Path, requirement: str) -> Path:
    """llama.cpp's sources, as vendored in the ``llama-cpp-python`` source package."""
    root.mkdir(parents=True, exist_ok=True)
    archives = sorted(root.glob("llama_cpp_python-*.tar.gz"))
    if not archives:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             requirement, "-d", str(root)],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        archives = sorted(root.glob("llama_cpp_python-*.tar.gz"))
    unpacked = root / archives[0].name.removesuffix(".tar.gz")
    if not unpacked.exists():
        with tarfile.open(archives[0]) as archive:
            archive.extractall(root, filter="data")
    return unpacked / "vendor" / "llama.cpp"


def requantized(bin_dir: Path, source_gguf: Path, type_name: str, cache: Path = CACHE) -> Path:
    """``source_gguf``'s weights written as ``type_name`` (F32, Q8_0, ...), made once."""
    out = cache / "models" / f"{source_gguf.stem}.{type_name}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        subprocess.run(
            [str(bin_dir / "llama-quantize"), "--allow-requantize", str(source_gguf), str(tmp), type_name],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        tmp.rename(out)
    return out


@dataclass
class LlamaServer:
    """``llama-server`` on loopback serving one GGUF file."""

    process: subprocess.Popen
    url: str

    def memory_kib(self, field: str) -> int:
        """``VmRSS`` (now) or ``VmHWM`` (peak), from /proc."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)


@contextlib.contextmanager
def llama_server(
    bin_dir: Path, gguf: Path, *, threads: int = 2, parallel: int = 1, context: int = 4096
) -> Iterator[LlamaServer]:
    """Start ``llama-server`` (``threads`` threads, ``parallel`` slots) and stop it after."""
    port = free_port()
    command = [
        str(bin_dir / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
        "-t", str(threads), "-tb", str(threads), "-np", str(parallel), "-c", str(context * parallel),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = LlamaServer(process, f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {process.returncode}: {' '.join(command)}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("llama-server did not become ready in 120 s")
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()


async def request_seconds(url: str, prompt: str, new_tokens: int, stream: bool) -> float:
    """Wall time of one greedy request of ``new_tokens`` (EOS ignored, no prompt cache reuse)."""
    body = {
        "prompt": prompt,
        "n_predict": new_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "cache_prompt": False,
        "stream": stream,
    }
    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        if not stream:
            response = await client.post(url + "/completion", json=body)
            response.raise_for_status()
            predicted = response.json()["tokens_predicted"]
        else:
            predicted = 0
            async with client.stream("POST", url + "/completion", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if line.startswith("data:") and '"stop":true' in line.replace(" ", ""):
                        predicted = int(re.search(r'"tokens_predicted":\s*(\d+)', line).group(1))
        seconds = time.perf_counter() - start
    assert predicted == new_tokens, f"llama-server generated {predicted} tokens, not {new_tokens}"
    return seconds
