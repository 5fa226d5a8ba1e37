"""Adapter loads off the engine thread: slot contents built on a loader thread, installed in a step.

A request whose adapter is in no slot used to load it during admission, on the engine thread:
every factor cast, moved to the device and zero-padded to the bank's rank, and sometimes every
slot of every layer reallocated (a higher rank, one more slot), while every running row waited.
Now admission asks the :class:`SlotLoader` for the adapter and keeps the request waiting; the
loader thread builds the staged factors (``LoraSlotBank.stage``) and, when the adapter needs
bigger stacks, the grown stacks (``LoraSlotBank.grown``), and each projection's layout of the
adapter's factors for its LoRA kernel (``LoraSlotBank.reader``: ``prebuild``; the compiled CPU
kernel's packed blocks), which the engine thread used to build at the slot's first step; a later
step's admission installs them (``AdapterSlots._load``): a copy per layer, a pointer swap, the
layouts adopted. Other rows decode meanwhile.

Parsing and validating an adapter (and fetching it from disk or an adapter source) happen before
the request reaches the engine, in the API's worker threads (``server/api/deps.py``); the
adapter the engine gets is already a parsed :class:`LoraAdapter`.
"""

from __future__ import annotations

import concurrent.futures
import functools
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from adapters.peft_format import LoraAdapter, LoraLayerWeights
from adapters.torch_threads import one_thread_pool
from server.engine.lora.slots import GrownStacks, LoraSlotBank, SlotLayoutReader, StagedPart


@dataclass(frozen=True)
class StagedLayer:
    """One layer's part of a staged adapter: its factors as the slot holds them."""

    A: torch.Tensor  # [r, k] in the bank's dtype, on its device, padded to the bank's rank
    B: torch.Tensor  # [d, r]
    scale: float
    grown: GrownStacks | None  # bigger stacks for the bank, when the adapter needs them
    dora: torch.Tensor | None = None  # a DoRA layer's g = m / ‖W + s·B·A‖_row ([d]); B is g ⊙ B
    rank: int | None = None  # the adapter's own rank (A and B may be padded past it)


@dataclass(frozen=True)
class StagedAdapter:
    adapter: LoraAdapter
    layers: dict[str, StagedLayer]
    seconds: float  # time the loader thread spent building it
    # each projection's layout of the staged factors (``SlotLayoutReader.prebuild``), adopted at install
    layouts: tuple[tuple[SlotLayoutReader, Any], ...] = ()


def bank_of(target: object) -> LoraSlotBank | None:
    """The slot bank behind a runner's LoRA target (a bank, or a layer wrapping one)."""
    if isinstance(target, LoraSlotBank):
        return target
    bank = getattr(target, "bank", None)
    return bank if isinstance(bank, LoraSlotBank) else None


DoraFactor = Callable[[str, str, LoraLayerWeights], torch.Tensor]  # (adapter key, layer, weights) -> g


def stage_adapter(
    adapter: LoraAdapter,
    layers: Mapping[str, object],
    slots_needed: int,
    capacity: int,
    dora_factor: DoraFactor | None = None,
) -> StagedAdapter:
    """Build ``adapter``'s slot contents for every layer it adapts (any thread); a DoRA layer's
    factor g comes from ``dora_factor`` (it reads the base weight: the costly part of its load)."""
    started = time.perf_counter()
    staged: dict[str, StagedLayer] = {}
    for name, weights in adapter.layers.items():
        target = layers.get(name)
        if target is None:
            raise ValueError(
                f"adapter {adapter.adapter_id!r} adapts {name!r}, which this model does not have"
            )
        g = None
        if weights.is_dora:
            if dora_factor is None:
                raise ValueError(
                    f"adapter {adapter.adapter_id!r} is a DoRA adapter: its factors need the base weights"
                )
            g = dora_factor(adapter.key, name, weights)
        bank = bank_of(target)
        if bank is None:  # a target of unknown kind: AdapterSlots copies its raw factors in (set_slot)
            staged[name] = StagedLayer(weights.A, weights.B, weights.scale, None, g)
            continue
        grown = bank.grown(slots_needed, weights.A.shape[0], capacity)
        A, B = bank.stage(weights.A, weights.B, g) if grown is None else _stage_at(bank, weights, grown, g)
        staged[name] = StagedLayer(A, B, weights.scale, grown, g, rank=int(weights.A.shape[0]))
    _sync_device(staged.values())
    layouts = prebuild_layouts(layers, staged)
    return StagedAdapter(adapter, staged, time.perf_counter() - started, layouts)


def prebuild_layouts(
    layers: Mapping[str, object], staged: Mapping[str, StagedLayer]
) -> tuple[tuple[SlotLayoutReader, Any], ...]:
    """Each projection's layout of the staged factors, grouped by the projection that reads the
    banks (a fused q/k/v projection lays out its parts together); projections whose backend builds
    nothing ahead (``prebuild`` None) build theirs at the slot's first use, as before.

    The projections holding about half the factors' bytes are laid out on a helper thread beside
    this one (:func:`_packer`): the packing copies every factor once and releases the GIL, so on an
    idle server a cold adapter's layouts take half the time (a rank-64 q/k/v/o adapter's: 16-23 ms of
    the loader thread's CPU on 2 cores)."""
    parts: dict[int, tuple[SlotLayoutReader, dict[int, StagedPart]]] = {}
    for name, layer in staged.items():
        bank = bank_of(layers[name])
        if bank is None or bank.reader is None or layer.rank is None:
            continue
        reader, by_part = parts.setdefault(id(bank.reader), (bank.reader, {}))
        index = next(i for i, b in enumerate(reader.banks) if b is bank)
        by_part[index] = StagedPart(layer.A, layer.B, layer.scale, layer.rank)
    groups = list(parts.values())
    sizes = [sum(p.A.numel() + p.B.numel() for p in by_part.values()) for _, by_part in groups]
    mine, theirs, seen = [], [], 0
    for group, size in zip(groups, sizes, strict=True):
        (mine if seen < sum(sizes) / 2 or len(groups) < 2 else theirs).append(group)
        seen += size

    def build(
        todo: list[tuple[SlotLayoutReader, dict[int, StagedPart]]],
    ) -> list[tuple[SlotLayoutReader, Any]]:
        return [(reader, reader.prebuild(by_part)) for reader, by_part in todo]

    other = _packer().submit(build, theirs) if theirs else None
    try:
        built = build(mine)
    finally:
        built_there = other.result() if other is not None else []
    return tuple((reader, layout) for reader, layout in built + built_there if layout is not None)


@functools.cache
def _packer() -> concurrent.futures.ThreadPoolExecutor:
    """The thread that lays out half of a staged adapter's projections beside the loader thread."""
    return one_thread_pool(1, "loraplex-slot-pack")


def _stage_at(
    bank: LoraSlotBank, weights, grown: GrownStacks, dora: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors padded to the rank of the grown stacks they will be copied into."""
    A, B = bank.stage(weights.A, weights.B, dora)  # [r', k], [d, r']
    pad = grown.A_stack.shape[1] - A.shape[0]
    if pad > 0:
        A = torch.cat([A, A.new_zeros(pad, A.shape[1])])
        B = torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1)
    return A, B


def _sync_device(layers: Iterable[StagedLayer]) -> None:
    """Wait for the copies to a CUDA device issued on this thread's stream before the engine reads them."""
    if any(layer.A.is_cuda for layer in layers):
        torch.cuda.current_stream().synchronize()


class SlotLoader:
    """One background thread that stages adapters for :class:`~server.engine.lora_model.AdapterSlots`.

    Owned by the engine thread (``request``, ``poll``, ``retain`` are called there); only the
    staging itself runs on the loader thread. A load is keyed by ``adapter.key`` (id and version).
    """

    def __init__(self, stage: Callable[[LoraAdapter, int], StagedAdapter]) -> None:
        """``stage(adapter, slots_needed)`` builds an adapter's slot contents (on the loader thread)."""
        self._stage = stage
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # started at the first load
        self._loads: dict[str, concurrent.futures.Future[StagedAdapter]] = {}
        self.started = 0  # loads begun since start
        self.failed = 0
        self.seconds = 0.0  # loader-thread time spent staging

    def __contains__(self, key: str) -> bool:
        return key in self._loads

    @property
    def pending(self) -> int:
        """Loads begun and not yet taken (still running, or done and waiting for a slot)."""
        return len(self._loads)

    def request(self, adapter: LoraAdapter, slots_needed: int) -> None:
        """Begin staging ``adapter`` unless it is already under way."""
        if adapter.key in self._loads:
            return
        if self._pool is None:
            self._pool = one_thread_pool(1, "loraplex-slot-loader")  # adapters/torch_threads.py
        future = self._pool.submit(self._stage, adapter, slots_needed)
        self._loads[adapter.key] = future
        self.started += 1

    def poll(self, key: str) -> StagedAdapter | BaseException | None:
        """The staged adapter (taken: the loader forgets it), the error its load raised (taken too),
        or None while it is still loading or was never requested."""
        future = self._loads.get(key)
        if future is None or not future.done():
            return None
        del self._loads[key]
        error = future.exception()
        if error is not None:
            self.failed += 1
            return error
        staged = future.result()
        self.seconds += staged.seconds
        return staged

    def wait(self, timeout: float) -> None:
        """Block until every load under way is done (at most ``timeout`` seconds): an idle engine
        waits here, where no running row is stalled by it."""
        concurrent.futures.wait(list(self._loads.values()), timeout)

    def retain(self, keys: set[str]) -> None:
        """Forget finished loads no waiting request wants any more (cancelled, failed elsewhere)."""
        for key in [k for k, f in self._loads.items() if k not in keys and f.done()]:
            del self._loads[key]

    def shutdown(self) -> None:
        """Stop the loader thread (a later load starts a new one)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
