"""Linear layers on the CPU through oneDNN, with the weights kept in its packed layout.

At decode batch sizes a step is bound by streaming the weights, and how fast a GEMM streams them
depends on the layout it reads. One pass over the embedded model's linear layers (LM head
included), float32, on the 2-core CI machine (``bench/efficiency.py``: floor and packed floor,
same run; ``bench/results/efficiency-cpu.md``):

    batch    x @ W.T (MKL, dense W)    oneDNN, packed W
        1           58 ms                   43 ms
       16          108 ms                   69 ms
       64          240 ms                  173 ms

So the native runner keeps each projection's weight **only** in the packed layout on the CPU (no
dense copy: peak RSS measured 50-70 MiB above the dense layout, not twice the weights) and reads
it back (``unpack``, exact: packing is a reordering of the values) when the merge manager folds
an adapter in or checks the base.

The ops are PyTorch's own (``torch.ops.mkldnn``, what inductor's CPU backend calls); they are
probed once, and the runner falls back to dense ``F.linear`` where they are missing or disagree.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# The batch size oneDNN tunes the packed layout for; any batch size runs on it (measured: packed
# for 16, the layers ran as fast as packed for the step's own batch size at 16 and 64, and faster
# at 1).
PACKED_FOR_BATCH = 16


@functools.cache
def available() -> bool:
    """True when oneDNN's linear and weight packing exist here and agree with ``F.linear``."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(24, 16, generator=generator)
        bias = torch.randn(24, generator=generator)
        x = torch.randn(3, 16, generator=generator)
        packed = pack(weight)
        ok = torch.allclose(linear(x, packed, bias), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
        return ok and torch.equal(unpack(packed), weight)
    except (AttributeError, RuntimeError):  # an op missing from this build, or refusing this CPU
        return False


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight: [out, in] dense float32 -> the same values in oneDNN's layout (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACKED_FOR_BATCH)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """The dense [out, in] weight back, bit for bit (a new tensor)."""
    return packed.to_dense()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [N, in] -> [N, out] = ``x @ W.T + b``; ``weight`` packed or dense [out, in]."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
