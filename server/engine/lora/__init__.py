"""Batched LoRA: slot storage, batch metadata and the backends that apply adapters.

* ``slots.py``: :class:`LoraSlotBank`, one adaptable output's resident adapters (no kernel choice);
* ``batch.py``: :class:`LoraBatchContext`, each row's slot and scale and the rows grouped by slot;
* ``backend.py``: :class:`LoraBackend`, the interface, and :class:`LoraProjection`, a projection's
  banks bound to a backend;
* ``grouped.py``, ``compiled_cpu.py``, ``segmented.py``, ``gathered.py``: the backends;
* ``choose.py``: ``--lora-backend`` by name, and ``auto``.
"""

from server.engine.lora.backend import LoraBackend, LoraProjection
from server.engine.lora.batch import BASE_SLOT, LoraBatchContext, RowGroups
from server.engine.lora.choose import BACKEND_NAMES, BACKENDS, choose_backend
from server.engine.lora.slots import LoraSlotBank

__all__ = [
    "BACKENDS",
    "BACKEND_NAMES",
    "BASE_SLOT",
    "LoraBackend",
    "LoraBatchContext",
    "LoraProjection",
    "LoraSlotBank",
    "RowGroups",
    "choose_backend",
]
