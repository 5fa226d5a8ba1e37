"""The quantized linear kernels compiled from C (``quant_cpu.c``): int8 and 4-bit weights
dequantized in registers, for batches of 1 to ``MAX_ROWS`` rows on AVX2/FMA.

Built like the grouped LoRA kernel (``cpu_build.py``: compiled on first use into a private
kernels directory, loaded with ctypes) and following its settings (``sgmv_cpu.configure``: ``off`` turns it
off; ``--cache-dir``). ``quantized.py`` checks it against the reference dequantizers once before
using it; where it cannot build or disagrees, the weights are dequantized in chunks and multiplied
by PyTorch (same results, slower). The ctypes call releases the GIL while it runs.

Threads: up to ``ONE_THREAD_ROWS`` rows on ``gemv_cpu.SMALL_STEP_THREADS`` (which the native
runner chooses per step by timing one thread against all, ``decode_threads.py``), above on
PyTorch's OpenMP threads, as the float32 kernel does (``gemv_cpu.py``): on a loaded machine every
parallel region waits for a time slice at its barrier, which at 120 calls a step outweighs the
second core (the linear layers alone at batch 1, one thread: 3.1-3.5x float32's; two threads
under load: every form 10-20x slower, ``bench/results/quant-kernels-cpu.md``), while one core
unpacks 4-bit weights at about 8 GB/s of packed bytes, so on a quiet machine two threads may pay
at batch 1 (``bench/quant_kernels.py`` measures both thread counts). In the one-call decode step
(``native/fused_cpu.py``) each of the step's threads calls these on its own run of a projection's
rows with one thread (the step shares one OpenMP region out, ``gemv_cpu.c``).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch

from server.engine import cpu_build, gemv_cpu, sgmv_cpu

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("quant_cpu.c")
FLAGS = (
    *cpu_build.AVX2_FLAGS,
    "-mf16c",
    "-ffp-contract=off",
)  # weights computed exactly as the references do;
# F16C (on every AVX2 CPU) widens float16 scales
MAX_ROWS = 64  # larger batches (prompts) dequantize and use PyTorch's matmul
ONE_THREAD_ROWS = 4  # up to this many rows the kernel runs on the calling thread (as gemv_cpu's)

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class CompiledQuant:
    def __init__(self, library: ctypes.CDLL) -> None:
        self._q8 = library.q8_linear
        self._q8.argtypes = [
            _ptr, _i64, _i64, _i64, _ptr, _i64, _ptr, _ptr, _i64, ctypes.c_int, _ptr, _i64, _i64, ctypes.c_int,
            ctypes.c_int,
        ]  # fmt: skip
        self._q8.restype = ctypes.c_int
        self._q4 = library.q4_linear
        self._q4.argtypes = [
            _ptr, _i64, _i64, _i64, _ptr, _i64, _ptr, _ptr, ctypes.c_int, ctypes.c_int, _ptr, _i64, _i64,
            ctypes.c_int, ctypes.c_int,
        ]  # fmt: skip
        self._q4.restype = ctypes.c_int

    @property
    def q8_address(self) -> int:
        """``q8_linear``'s address, for compiled code that calls it (``fused_cpu.parts_table``)."""
        return ctypes.cast(self._q8, _ptr).value or 0

    @property
    def q4_address(self) -> int:
        """``q4_linear``'s address (as ``q8_address``)."""
        return ctypes.cast(self._q4, _ptr).value or 0

    @staticmethod
    def _check(x: torch.Tensor, out: torch.Tensor, rows: int, k: int) -> None:
        fits = all(t.dtype == torch.float32 and t.device.type == "cpu" and t.stride(1) == 1 for t in (x, out))
        if not fits or x.shape[1] != k or out.shape[1] != rows or out.shape[0] != x.shape[0]:
            raise ValueError(
                f"quantized kernel: x {tuple(x.shape)} / out {tuple(out.shape)} do not fit a {rows}x{k} weight"
            )

    @staticmethod
    def _scales(scale: torch.Tensor, minimum: torch.Tensor | None, shape: tuple[int, int]) -> int:
        """1 when scale (and min) are float16, 0 for float32; both contiguous, of ``shape``."""
        assert scale.dtype in (torch.float32, torch.float16) and scale.is_contiguous()
        assert tuple(scale.shape) == shape, (tuple(scale.shape), shape)
        assert minimum is None or (
            minimum.dtype == scale.dtype and minimum.is_contiguous() and minimum.shape == scale.shape
        )
        return int(scale.dtype == torch.float16)

    def int8(
        self,
        x: torch.Tensor,
        q: torch.Tensor,
        scale: torch.Tensor,
        minimum: torch.Tensor | None,
        group: int,
        k: int,
        out: torch.Tensor,
        acc: bool,
    ) -> None:
        """out (+)= x @ (q * scale (+ min)).T; q: int8 [rows, kp], scale/min: [rows, kp / group]."""
        rows, kp = q.shape
        self._check(x, out, rows, k)
        assert q.is_contiguous() and (group == 16 or group % 32 == 0)
        half = self._scales(scale, minimum, (rows, kp // group))
        rc = self._q8(
            x.data_ptr(), x.shape[0], x.stride(0), k, q.data_ptr(), kp, scale.data_ptr(),
            None if minimum is None else minimum.data_ptr(), group, half, out.data_ptr(), out.stride(0), rows,
            int(acc), _threads(x.shape[0]),
        )  # fmt: skip
        if rc != 0:
            raise MemoryError("quantized kernel: could not allocate its buffers")

    def q4(
        self,
        x: torch.Tensor,
        q: torch.Tensor,
        scale: torch.Tensor,
        minimum: torch.Tensor | None,
        offset: int,
        k: int,
        out: torch.Tensor,
        acc: bool,
    ) -> None:
        """out (+)= x @ ((q + offset) * scale (+ min)).T; q: uint8 [rows, kp / 2]."""
        rows, half_k = q.shape
        self._check(x, out, rows, k)
        assert q.is_contiguous()
        half = self._scales(scale, minimum, (rows, half_k // 16))
        rc = self._q4(
            x.data_ptr(), x.shape[0], x.stride(0), k, q.data_ptr(), 2 * half_k, scale.data_ptr(),
            None if minimum is None else minimum.data_ptr(), offset, half, out.data_ptr(), out.stride(0), rows,
            int(acc), _threads(x.shape[0]),
        )  # fmt: skip
        if rc != 0:
            raise MemoryError("quantized kernel: could not allocate its buffers")


def _threads(rows: int) -> int:
    """Up to ``ONE_THREAD_ROWS`` rows the small steps' count (``gemv_cpu.SMALL_STEP_THREADS``,
    which the native runner chooses), else PyTorch's (see the module docstring)."""
    return gemv_cpu.SMALL_STEP_THREADS if rows <= ONE_THREAD_ROWS else torch.get_num_threads()


def load() -> CompiledQuant | None:
    """The compiled kernels, or None when turned off (``sgmv_cpu.configure("off")``) or not buildable here."""
    mode, cache_dir = sgmv_cpu.current()
    return None if mode == "off" else _build(cache_dir)


@functools.cache
def _build(cache_dir: Path) -> CompiledQuant | None:
    return _build_and_check(cache_dir)


def _build_and_check(cache_dir: Path) -> CompiledQuant | None:
    from server.engine.native import quantized  # the reference check needs the quantizers

    return cpu_build.load_checked(
        "quant_cpu", SOURCE, cache_dir, "quantized kernel", CompiledQuant, quantized.kernel_agrees, FLAGS
    )
