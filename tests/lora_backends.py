"""The LoRA backends the tests run: every one in ``server/engine/lora/choose.py``.

All of them serve the CPU in float32 here; ``compiled-cpu`` needs a C compiler and AVX2/FMA (as CI
has): where it cannot be built its cases fail with the reason, they are not skipped.
"""

from __future__ import annotations

import torch

from server.engine.lora import BACKENDS, LoraBackend, choose_backend

LORA_BACKENDS = list(BACKENDS)  # grouped, compiled-cpu, segmented, gathered


def lora_backend(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoraBackend:
    """The backend ``name`` for layers on ``device`` in ``dtype``."""
    return choose_backend(name, device, dtype)
