"""The quantized linear kernels compiled from C (``quant_cpu.c``): int8 and 4-bit weights, for
batches of 1 to ``MAX_ROWS`` rows on AVX2/FMA, with float inputs (the weights dequantized in
registers) or int8-quantized ones (integer dot products; AVX2, or AVX-512 VNNI where the CPU has
it).

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
rows with one thread (the step shares one OpenMP region out, ``gemv_cpu.c``); the integer
kernels there each quantize the whole input (a few rows of k floats, against their run of
out / threads weight rows), so the threads need not meet once more per projection.

Dot products (``DOT``, ``--quant-dot`` / ``LORAPLEX_QUANT_DOT``): ``float`` (the default) keeps
float32 inputs and dequantizes the weights in registers (``q8_linear`` / ``q4_linear``); ``int``
quantizes each input row to int8 in blocks of 32 and multiplies with integer multiply-adds
(``q8_linear_int`` / ``q4_linear_int`` on AVX2, ``q8_linear_vnni`` / ``q4_linear_vnni`` where the
CPU has AVX-512 VNNI): faster, but a rounding difference between two paths to the same logits (a
prompt prefix from the prefix cache, another batch) can move an input across an int8 step, so
near-tied greedy tokens may differ between runs of one request (``docs/quantization.md``), hence
not the default. Every kernel this CPU runs is checked at load
(``quantized.kernel_agrees``): with ``int`` the best integer set that passes serves (``int_isa``), the float
ones where none does. The choice is read at each call (``quantized.linear``) and each one-call
decode step (``fused_cpu.parts_table``: a model keeps a table per dot product).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path
from typing import Literal

import torch

from server.engine import cpu_build, gemv_cpu, sgmv_cpu

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("quant_cpu.c")
FLAGS = (
    *cpu_build.AVX2_FLAGS,
    "-mf16c",
    "-ffp-contract=off",
)  # weights and input scales computed exactly as the references do;
# F16C (on every AVX2 CPU) widens float16 scales; the VNNI kernels get theirs from a target pragma
MAX_ROWS = 64  # larger batches (prompts) dequantize and use PyTorch's matmul
ONE_THREAD_ROWS = 4  # up to this many rows the kernel runs on the calling thread (as gemv_cpu's)

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p

Dot = Literal["int", "float"]
DOTS: tuple[Dot, ...] = ("int", "float")
Isa = Literal["avx2", "vnni"]  # the integer kernels' instruction sets


def _dot_from_env() -> Dot:
    """``LORAPLEX_QUANT_DOT`` for library use (the server's ``Settings`` read and validate it too,
    and ``configure_dot`` it at start-up); ``float`` when unset or unknown (logged)."""
    value = os.environ.get("LORAPLEX_QUANT_DOT", "float").strip().lower() or "float"
    if value not in DOTS:
        log.warning("LORAPLEX_QUANT_DOT=%r is neither int nor float; float is used", value)
        return "float"
    return value  # type: ignore[return-value]


DOT: Dot = _dot_from_env()  # the dot product the quantized kernels use (see the module docstring)


def configure_dot(dot: Dot) -> None:
    """Choose the quantized kernels' dot product from now on (set it before loading a model)."""
    global DOT
    if dot not in DOTS:
        raise ValueError(f"unknown quantized dot product {dot!r}: choose int or float")
    DOT = dot


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
        # the integer kernels per instruction set: AVX2, and AVX-512 VNNI where this CPU has it
        self._int: dict[Isa, tuple[ctypes._CFuncPtr, ctypes._CFuncPtr]] = {}
        vnni = library.quant_vnni_supported
        vnni.restype = ctypes.c_int
        for isa, suffix in (("avx2", "int"), ("vnni", "vnni")):
            if isa == "vnni" and not vnni():
                continue
            q8, q4 = getattr(library, f"q8_linear_{suffix}"), getattr(library, f"q4_linear_{suffix}")
            q8.argtypes, q8.restype = self._q8.argtypes, ctypes.c_int
            q4.argtypes, q4.restype = self._q4.argtypes, ctypes.c_int
            self._int[isa] = (q8, q4)
        self._quantize = library.quantize_activations
        self._quantize.argtypes = [_ptr, _i64, _i64, _i64, _i64, _ptr, _ptr]
        self._quantize.restype = None
        self.int_isa: Isa | None = None  # set by ``quantized.kernel_agrees``: the integer kernels that passed

    @property
    def isas(self) -> tuple[Isa, ...]:
        """The integer kernels' instruction sets this CPU runs (``avx2``, and ``vnni`` where it has
        AVX-512 VNNI), best last."""
        return tuple(self._int)

    @property
    def int_checked(self) -> bool:
        """True once the integer kernels passed their check (``int_isa`` is the one serving)."""
        return self.int_isa is not None

    def _pick(self, dot: Dot | None, isa: Isa | None) -> tuple[ctypes._CFuncPtr, ctypes._CFuncPtr]:
        """(int8, 4-bit) kernels for ``dot`` (see ``self.dot``) and ``isa`` (default ``int_isa``)."""
        if self.dot(dot) == "float":
            return self._q8, self._q4
        chosen = isa or self.int_isa or "avx2"
        return self._int[chosen]

    def dot(self, dot: Dot | None = None) -> Dot:
        """The dot product a call uses: ``dot`` where given (the checks name theirs), else
        ``DOT``, ``float`` unless the integer kernels passed their check."""
        if dot is not None:
            return dot
        return "int" if DOT == "int" and self.int_checked else "float"

    def describe(self) -> str:
        """What the kernels' calls use now: ``int (vnni)``, ``int (avx2)`` or ``float``."""
        return f"int ({self.int_isa})" if self.dot() == "int" else "float"

    def q8_address(self, dot: Dot | None = None) -> int:
        """The int8 kernel's address (``q8_linear_vnni``, ``q8_linear_int`` or ``q8_linear``, per
        ``self.dot`` and ``int_isa``), for compiled code that calls it (``fused_cpu.parts_table``)."""
        return ctypes.cast(self._pick(dot, None)[0], _ptr).value or 0

    def q4_address(self, dot: Dot | None = None) -> int:
        """The 4-bit kernel's address (as ``q8_address``)."""
        return ctypes.cast(self._pick(dot, None)[1], _ptr).value or 0

    def quantize_activations(self, x: torch.Tensor, kp: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The integer kernels' activation quantization alone: x [n, k] float32 -> (int8 [n, kp],
        block scales float32 [n, kp / 32]); compared with ``quantized.quantize_activations``."""
        assert x.dtype == torch.float32 and x.stride(1) == 1 and kp % 32 == 0 and x.shape[1] <= kp
        q = torch.empty(x.shape[0], kp, dtype=torch.int8)
        d = torch.empty(x.shape[0], kp // 32)
        self._quantize(x.data_ptr(), x.shape[0], x.stride(0), x.shape[1], kp, q.data_ptr(), d.data_ptr())
        return q, d

    @staticmethod
    def _check(x: torch.Tensor, out: torch.Tensor, rows: int, k: int) -> None:
        # spelled out (no generator): this runs for every projection of every step
        fits = x.dtype == out.dtype == torch.float32 and x.device.type == out.device.type == "cpu"
        fits = fits and x.stride(1) == 1 and out.stride(1) == 1
        if not fits or x.shape[1] != k or out.shape[1] != rows or out.shape[0] != x.shape[0]:
            raise ValueError(
                f"quantized kernel: x {tuple(x.shape)} / out {tuple(out.shape)} do not fit a {rows}x{k} weight"
            )

    @staticmethod
    def _scales(scale: torch.Tensor, minimum: torch.Tensor | None, shape: tuple[int, int]) -> int:
        """1 when scale (and min) are float16, 0 for float32; both contiguous, of ``shape``."""
        assert scale.dtype in (torch.float32, torch.float16) and scale.is_contiguous()
        assert scale.shape == shape, (tuple(scale.shape), shape)
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
        dot: Dot | None = None,
        isa: Isa | None = None,
    ) -> None:
        """out (+)= x @ (q * scale (+ min)).T; q: int8 [rows, kp], scale/min: [rows, kp / group]
        (``dot``: see ``self.dot``; ``isa``: the integer kernels', default ``int_isa``)."""
        rows, kp = q.shape
        self._check(x, out, rows, k)
        assert q.is_contiguous() and (group == 16 or group % 32 == 0)
        half = self._scales(scale, minimum, (rows, kp // group))
        rc = self._pick(dot, isa)[0](
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
        dot: Dot | None = None,
        isa: Isa | None = None,
    ) -> None:
        """out (+)= x @ ((q + offset) * scale (+ min)).T; q: uint8 [rows, kp / 2]."""
        rows, half_k = q.shape
        self._check(x, out, rows, k)
        assert q.is_contiguous()
        half = self._scales(scale, minimum, (rows, half_k // 16))
        rc = self._pick(dot, isa)[1](
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


def describe() -> str:
    """The dot products quantized projections run with here (``CompiledQuant.describe``; ``float``
    where the compiled kernels are off or do not build: PyTorch multiplies dequantized weights)."""
    kernel = load()
    return kernel.describe() if kernel is not None else "float"


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
