"""The LoRA kernels the tests run, including both forms of the grouped kernel on the CPU.

In float32 on the CPU the grouped kernel runs as C compiled on first use where it builds
(``server/engine/sgmv_cpu.py``), else as PyTorch ops. Kernel parametrizations list both, so each
form is held to the dense reference and to PEFT: ``grouped`` (compiled, where it builds) and
``grouped-pytorch`` (the compiled form turned off for the layers built next; the autouse fixture
in conftest.py turns it back on after each test).
"""

from __future__ import annotations

from server.engine import sgmv_cpu
from server.engine.lora_linear import Kernel

LORA_KERNELS = ["grouped", "grouped-pytorch", "segmented", "gather_bmm"]


def lora_kernel(variant: str) -> Kernel:
    """The ``--kernel`` value for a test variant, with the compiled form set for it."""
    sgmv_cpu.configure("off" if variant == "grouped-pytorch" else "auto")
    return "grouped" if variant == "grouped-pytorch" else variant  # type: ignore[return-value]
