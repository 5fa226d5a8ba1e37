"""Turn a Hugging Face causal LM into a multi-adapter model and manage its adapter slots."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from torch import nn

from adapters.peft_format import BaseLinearShape, LoraAdapter
from server.engine.lora_linear import BASE_SLOT, LoraBatchContext, LoraLinear, linear_shape


def attach_lora_layers(model: nn.Module, ctx: LoraBatchContext) -> dict[str, LoraLinear]:
    """Wrap every linear layer LoRA may target (the output head excluded) in a :class:`LoraLinear`.

    Returns the wrappers by the wrapped module's original name (``model.layers.0.self_attn.q_proj``),
    the names PEFT adapters use.
    """
    output_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets: list[tuple[str, nn.Module, tuple[int, int, bool]]] = []
    for name, module in model.named_modules():
        shape = linear_shape(module)
        if shape is not None and module is not output_head and not isinstance(module, LoraLinear):
            targets.append((name, module, shape))
    layers: dict[str, LoraLinear] = {}
    for name, module, (in_features, out_features, _) in targets:
        wrapper = LoraLinear(module, in_features, out_features, ctx)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, wrapper)
        layers[name] = wrapper
    return layers


def base_linear_shapes(layers: dict[str, LoraLinear]) -> dict[str, BaseLinearShape]:
    return {
        name: BaseLinearShape(
            out_features=layer.out_features,
            in_features=layer.in_features,
            fan_in_fan_out=linear_shape(layer.base)[2],  # type: ignore[index]
        )
        for name, layer in layers.items()
    }


class SlotsFullError(RuntimeError):
    """Every slot holds an adapter that a running request still uses."""


@dataclass
class _Resident:
    adapter: LoraAdapter
    slot: int
    in_use: int = 0  # running rows that read this slot


class AdapterSlots:
    """Which adapter sits in which slot of the LoRA layers, with LRU eviction.

    An adapter used by a running row (``acquire`` without ``release``) is never evicted.
    Owned by the engine thread: not thread-safe by design.
    """

    def __init__(self, layers: dict[str, LoraLinear], ctx: LoraBatchContext, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.layers = layers
        self.ctx = ctx
        self.capacity = capacity
        self._resident: OrderedDict[str, _Resident] = OrderedDict()  # LRU order: oldest first
        self.loads = 0
        self.evictions = 0

    def __contains__(self, key: str) -> bool:
        return key in self._resident

    @property
    def resident_keys(self) -> list[str]:
        return list(self._resident)

    def slot_of(self, key: str) -> int:
        return self._resident[key].slot

    def can_acquire(self, key: str) -> bool:
        """True when the adapter is resident or a slot is free or evictable."""
        if key in self._resident or len(self._resident) < self.capacity:
            return True
        return any(r.in_use == 0 for r in self._resident.values())

    def acquire(self, adapter: LoraAdapter) -> int:
        """Make ``adapter`` resident (loading or evicting as needed), count one user, return its slot.

        Slots are keyed by ``adapter.key`` (id and version), so a replaced adapter's old version
        keeps serving the rows that started on it while new rows get the new one.
        """
        resident = self._resident.get(adapter.key)
        if resident is None:
            slot = self._free_slot()
            self._load(adapter, slot)
            resident = self._resident[adapter.key]
        self._resident.move_to_end(adapter.key)
        resident.in_use += 1
        return resident.slot

    def release(self, key: str) -> None:
        resident = self._resident.get(key)
        if resident is not None and resident.in_use > 0:
            resident.in_use -= 1

    def evict(self, key: str) -> bool:
        """Drop an adapter version from memory if no running row uses it; True when it was dropped."""
        resident = self._resident.get(key)
        if resident is None or resident.in_use > 0:
            return False
        self._unload(key)
        return True

    def _free_slot(self) -> int:
        used = {r.slot for r in self._resident.values()}
        if len(used) < self.capacity:
            return min(set(range(self.capacity)) - used)
        for key, resident in self._resident.items():  # oldest first
            if resident.in_use == 0:
                slot = resident.slot
                self._unload(key)
                self.evictions += 1
                return slot
        raise SlotsFullError(f"all {self.capacity} adapter slots are in use by running requests")

    def _load(self, adapter: LoraAdapter, slot: int) -> None:
        for name, weights in adapter.layers.items():
            self.layers[name].set_slot(slot, weights.A, weights.B, weights.scale)
        self._resident[adapter.key] = _Resident(adapter=adapter, slot=slot)
        self.ctx.invalidate()
        self.loads += 1

    def _unload(self, key: str) -> None:
        resident = self._resident.pop(key)
        for name in resident.adapter.layers:
            self.layers[name].clear_slot(resident.slot)
        self.ctx.invalidate()


__all__ = ["BASE_SLOT", "AdapterSlots", "SlotsFullError", "attach_lora_layers", "base_linear_shapes"]
