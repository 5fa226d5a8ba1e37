"""The LoRA backends by name, and ``--lora-backend auto``: one choice per device and dtype."""

from __future__ import annotations

import torch

from server.engine.lora.backend import LoraBackend
from server.engine.lora.compiled_cpu import CompiledCpuBackend
from server.engine.lora.gathered import GatheredBackend
from server.engine.lora.grouped import GroupedBackend
from server.engine.lora.segmented import SegmentedBackend

BACKENDS: dict[str, type[LoraBackend]] = {
    backend.name: backend
    for backend in (GroupedBackend, CompiledCpuBackend, SegmentedBackend, GatheredBackend)
}
BACKEND_NAMES = ("auto", *BACKENDS)
AUTO_ORDER = ("compiled-cpu", "grouped")  # auto: the first that serves the device and dtype


def choose_backend(name: str, device: torch.device | str, dtype: torch.dtype) -> LoraBackend:
    """The backend ``name`` (``--lora-backend``) for LoRA layers on ``device`` in ``dtype``;
    ``auto``: the compiled CPU kernel where it serves (CPU, float32, where it builds), else grouped."""
    if name == "auto":
        name = next(n for n in AUTO_ORDER if BACKENDS[n].serves(device, dtype))
    backend = BACKENDS.get(name)
    if backend is None:
        raise ValueError(f"unknown LoRA backend {name!r}: choose one of {', '.join(BACKEND_NAMES)}")
    return backend(device, dtype)
