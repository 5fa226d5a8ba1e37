"""The packed layouts a projection's weight can be kept in on the CPU (float32), one interface.

- ``packed``: oneDNN's opaque layout, run by its linear op (``onednn.py``);
- ``blocked``: blocks of 16 output columns, run by the compiled kernel (``gemv_cpu.py``), which
  streams the weights near the memory bandwidth at decode batch sizes.

Either way no dense copy is kept: the merge manager reads rows through ``unpack`` (exact: both
are reorderings of the values) and writes them back through ``pack`` (``layers.PackedEdits``).
"""

from __future__ import annotations

from typing import Protocol

import torch

from server.engine import gemv_cpu
from server.engine.native import onednn


class PackedLayout(Protocol):
    name: str

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """weight: [out, in] dense -> the layout's tensor."""
        ...

    def unpack(self, packed: torch.Tensor, out_features: int) -> torch.Tensor:
        """The dense [out, in] weight back, bit for bit (a new tensor)."""
        ...

    def linear(
        self,
        x: torch.Tensor,
        packed: torch.Tensor,
        out_features: int,
        bias: torch.Tensor | None,
        out: torch.Tensor | None = None,
        accumulate: bool = False,
    ) -> torch.Tensor:
        """x: [N, in] -> x @ W.T (+ b): [N, out_features]; into ``out`` when given, added to it
        with ``accumulate``."""
        ...


class OneDnnLayout:
    name = "packed"

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        return onednn.pack(weight)

    def unpack(self, packed: torch.Tensor, out_features: int) -> torch.Tensor:
        return onednn.unpack(packed)

    def linear(self, x, packed, out_features, bias, out=None, accumulate=False) -> torch.Tensor:
        y = onednn.linear(x, packed, bias)  # oneDNN's op has no out=
        if out is None:
            return y
        return out.add_(y) if accumulate else out.copy_(y)


class BlockedLayout:
    name = "blocked"

    def __init__(self, kernel: gemv_cpu.CompiledGemv) -> None:
        self.kernel = kernel

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        return gemv_cpu.pack(weight)

    def unpack(self, packed: torch.Tensor, out_features: int) -> torch.Tensor:
        return gemv_cpu.unpack(packed, out_features)

    def linear(self, x, packed, out_features, bias, out=None, accumulate=False) -> torch.Tensor:
        return self.kernel.linear(x, packed, out_features, bias, out, accumulate)
