"""Float32 linear layers for decode-sized batches on the CPU, compiled from C (``gemv_cpu.c``).

At batch 1 a decode step reads every weight once and uses it once: its floor is the weights'
bytes over the machine's read bandwidth (``bench/decode_floor.py`` measures both). PyTorch's
dense ``x @ W.T`` and oneDNN's packed linear stream the weights well below that bandwidth at
batch 1; this kernel reads them packed in blocks of 16 output columns (``pack``: [ceil(out/16),
in, 16]) and streams them near it (figures in ``bench/results/decode-cpu.md``).

Built, loaded and checked like the grouped LoRA kernel (``cpu_build.py``, shared by the compiled
kernels): compiled on first use with the system C compiler (AVX2, FMA, OpenMP) into a private
``<cache_dir>/kernels/`` (else a private temporary directory), loaded with ctypes only from there,
checked once against ``F.linear`` on ragged shapes; ``load`` returns None where any of that fails,
and the native runner keeps oneDNN's layout (``--weight-layout packed`` or ``dense`` choose those
anyway). ``--lora-backend`` chooses how adapters are applied only: the blocked layout runs with every
LoRA backend (the tests run it with each). The call releases the GIL.

Threads: up to ``ONE_THREAD_ROWS`` rows the kernel runs on ``SMALL_STEP_THREADS`` threads (also
the one-call decode of ``native/fused_cpu.py`` and the quantized kernels), above on PyTorch's
OpenMP threads. Neither one thread nor all is right everywhere: on a quiet 2-core machine two
threads read the embedded model's layers faster (19.1 against 22.6 ms a pass; the batch-1 engine
step 18.9 against 29.2 ms), while on a loaded one a parallel region waits at its barrier for its
slowest thread, a scheduler time slice per call (one pass over the layers at batch 1 under load:
127 ms median with 1 thread against 490 ms with 2, interleaved; a step took 6x longer). So the
native runner sets ``SMALL_STEP_THREADS`` for each such step from ``LORAPLEX_DECODE_THREADS``:
``auto`` (the default) times the steps on one thread and on all and runs the faster, re-trying
the other now and then to follow the machine's load (``decode_threads.py``); a number pins the
count (1: what the server ran before ``auto``). Outside the runner's steps it is that number, or 1.
The one-call decode step (``native/fused_cpu.py``) runs its whole step in one OpenMP region on
that many threads, each taking its share of every projection, the threads meeting between the
layer's stages (``gemv_cpu.c``: ``step_wait``); a call from Python runs one region per product.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from server.engine import cpu_build, decode_threads, sgmv_cpu

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gemv_cpu.c")
ONE_THREAD_ROWS = 4  # up to this many rows the kernel runs on the calling thread (see above)
# ... or on these: the native runner sets it for each such step (``decode_threads.py``)
SMALL_STEP_THREADS = decode_threads.parse(os.environ.get(decode_threads.ENV)) or 1
BLOCK = sgmv_cpu.BLOCK  # output columns per packed block (BLOCK in gemv_cpu.c)


def small_step_threads() -> int:
    """The thread count of decode steps up to ``ONE_THREAD_ROWS`` rows (read at each call)."""
    return SMALL_STEP_THREADS


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight: [out, in] float32 -> [ceil(out / BLOCK), in, BLOCK], zero-padded (W.T in blocks of
    BLOCK output columns, each contiguous). One copy, no temporaries: the LM head is large."""
    out_features, in_features = weight.shape
    full, rest = divmod(out_features, BLOCK)
    packed = weight.new_zeros(full + (rest > 0), in_features, BLOCK)
    packed[:full].copy_(weight[: full * BLOCK].reshape(full, BLOCK, in_features).transpose(1, 2))
    if rest:
        packed[full, :, :rest].copy_(weight[full * BLOCK :].t())
    return packed


def unpack(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """The dense [out, in] weight back, bit for bit (a new tensor)."""
    blocks, in_features, _ = packed.shape
    return packed.permute(0, 2, 1).reshape(blocks * BLOCK, in_features)[:out_features].clone()


def packed_rows(packed: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` [N] of the dense weight, read from the packed one: [N, in] (the embedding
    lookup on a tied LM head kept packed)."""
    return packed[index // BLOCK, :, index % BLOCK]


class CompiledGemv:
    """The loaded library: ``linear`` is ``x @ W.T (+ b)`` on a packed weight."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._fn = library.linear_blocked
        self._fn.argtypes = [
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
            ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
        ]  # fmt: skip
        self._fn.restype = None

    def linear(
        self,
        x: torch.Tensor,
        packed: torch.Tensor,
        out_features: int,
        bias: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
        accumulate: bool = False,
    ) -> torch.Tensor:
        """x: [N, in] -> y: [N, out_features] = x @ W.T (+ b); into ``out`` when given (a column
        slice is fine), added to it with ``accumulate``. Shapes are checked here: the C code
        trusts them."""
        n, k = x.shape
        if out is None:
            if accumulate:
                raise ValueError("accumulate needs an out tensor")
            out = x.new_empty(n, out_features)
        tensors = [x, packed, out, *([] if bias is None else [bias])]
        fits = all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
        fits = fits and x.stride(1) == 1 and out.stride(1) == 1 and packed.is_contiguous()
        fits = fits and packed.dim() == 3 and packed.shape[1] == k and packed.shape[2] == BLOCK
        fits = fits and packed.shape[0] * BLOCK >= out_features > packed.shape[0] * BLOCK - BLOCK
        fits = fits and out.shape == (n, out_features)
        fits = fits and (bias is None or (bias.shape == (out_features,) and bias.is_contiguous()))
        if not fits:
            raise ValueError(
                f"compiled linear kernel: x {tuple(x.shape)}, packed {tuple(packed.shape)}, out "
                f"{tuple(out.shape)} do not make a [N, {out_features}] float32 CPU product"
            )
        self._fn(
            x.data_ptr(), x.stride(0), n, packed.data_ptr(), k, out_features,
            None if bias is None else bias.data_ptr(), out.data_ptr(), out.stride(0), int(accumulate),
            SMALL_STEP_THREADS if n <= ONE_THREAD_ROWS else torch.get_num_threads(),
        )  # fmt: skip
        return out


def load() -> CompiledGemv | None:
    """The compiled kernel, or None when it cannot be built or checked here (then use PyTorch's
    ops). Built in the LoRA kernel's cache directory (``sgmv_cpu.configure``)."""
    return _build(sgmv_cpu.current()[1])


def _agrees_with_reference(kernel: CompiledGemv) -> bool:
    """Ragged shapes (partial blocks, odd widths, 1 to 13 rows: every row-tile size), a bias, an
    output slice and accumulation, against ``F.linear``."""
    gen = torch.Generator().manual_seed(0)
    for rows, k, out_features in ((1, 37, 21), (7, 64, 48), (13, 19, 5)):
        x = torch.randn(rows, k, generator=gen)
        weight = torch.randn(out_features, k, generator=gen)
        bias = torch.randn(out_features, generator=gen)
        y = kernel.linear(x, pack(weight), out_features, bias)
        wide = torch.randn(rows, out_features + 3, generator=gen)
        expected = wide.clone()
        expected[:, 1:-2] += F.linear(x, weight)
        kernel.linear(x, pack(weight), out_features, out=wide[:, 1:-2], accumulate=True)
        if not (torch.allclose(y, F.linear(x, weight, bias), rtol=1e-4, atol=1e-4)):
            return False
        if not torch.allclose(wide, expected, rtol=1e-4, atol=1e-4):
            return False
    return True


@functools.cache
def _build(cache_dir: Path) -> CompiledGemv | None:
    return _build_and_check(cache_dir)


def _build_and_check(cache_dir: Path) -> CompiledGemv | None:
    return cpu_build.load_checked(
        "gemv_cpu", SOURCE, cache_dir, "compiled linear kernel", CompiledGemv, _agrees_with_reference
    )
