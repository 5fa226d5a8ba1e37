"""Which adapter sits in which memory slot of a runner's LoRA layers."""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from adapters.peft_format import LoraAdapter, LoraLayerWeights
from server.engine.dora import dora_factor
from server.engine.lora.vocab import VocabAdapters
from server.engine.runner import LoraTarget
from server.engine.slot_loader import SlotLoader, StagedAdapter, bank_of, stage_adapter

_AGING_ROUNDS = 64  # use counts are halved every capacity * this many acquisitions
LOADING = "loading"  # AdapterSlots.prepare: the adapter's load is still under way
EXPECT_SECONDS = 5.0  # how long a load begun for a request on its way (AdapterSlots.expect) is kept


@dataclass
class _Resident:
    adapter: LoraAdapter
    slot: int
    in_use: int = 0  # running rows that read this slot


class AdapterSlots:
    """Which adapter sits in which slot of the LoRA layers, evicting the least used first.

    Eviction takes, among the adapters no running row uses, the one acquired fewest times (counts
    kept across residencies and halved now and then, so popularity can change), the least
    recently used among equals. On power-law traffic (``bench/many_adapters.py``: 200 adapters,
    32 slots, popularity ∝ 1/i) this keeps the hot adapters resident where plain LRU lets a burst
    of cold ones push them out: hit rate 69% against LRU's 57%, the optimum being 76%.

    An adapter used by a running row (``acquire`` without ``release``) is never evicted.
    Owned by the engine thread: not thread-safe by design. Loads run on a loader thread
    (``server/engine/slot_loader.py``): :meth:`prepare` starts one and says when it is done, and
    :meth:`acquire` then only installs what the loader built.
    """

    def __init__(
        self,
        layers: Mapping[str, LoraTarget],
        capacity: int,
        on_change: Callable[[], None] = lambda: None,
        base_weight: Callable[[str], torch.Tensor] | None = None,
        vocab: VocabAdapters | None = None,
    ) -> None:
        """``on_change`` runs after slot contents change (the runner drops cached batch data).
        ``base_weight(name)``: the pristine base weight of a layer (``MergeManager.original_weight``,
        [out, in]), which a DoRA adapter's factor needs; without it DoRA adapters are refused.
        ``vocab``: where adapters' own embedding and head go (the runner's ``vocab``)."""
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.layers = layers
        self.base_weight = base_weight
        self.vocab = vocab
        # DoRA factors g per adapter version (layer name -> [out]): computed once, reused on reloads
        self._dora_factors: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._dora_lock = threading.Lock()  # the loader thread and the engine thread both stage
        self.on_change = on_change
        self.capacity = capacity
        self._resident: OrderedDict[str, _Resident] = OrderedDict()  # LRU order: oldest first
        self._uses: Counter[str] = Counter()  # acquisitions per adapter version (aged: see _count)
        self._acquired = 0
        self.loads = 0
        self.evictions = 0
        self.inline_grows = 0  # loads that had to reallocate a bank's stacks on the engine thread
        self.loader = SlotLoader(
            lambda adapter, slots: stage_adapter(adapter, layers, slots, capacity, self._dora_factor)
        )
        self._staged: dict[str, StagedAdapter] = {}  # loads done, waiting for their request's admission
        self._failed: dict[str, BaseException] = {}  # loads that raised, while requests still want them
        self._expected: dict[str, float] = {}  # loads begun for requests on their way: key -> until when

    def __contains__(self, key: str) -> bool:
        return key in self._resident

    @property
    def resident_keys(self) -> list[str]:
        return list(self._resident)

    @property
    def in_use(self) -> int:
        """Running rows holding a slot (each row counts once): 0 whenever the engine is idle."""
        return sum(r.in_use for r in list(self._resident.values()))  # list(): read from other threads

    def can_acquire(self, key: str) -> bool:
        """True when the adapter is resident or a slot is free or evictable."""
        if key in self._resident or len(self._resident) < self.capacity:
            return True
        return any(r.in_use == 0 for r in self._resident.values())

    @property
    def loading(self) -> bool:
        """True while some load is under way on the loader thread (or done and not yet polled)."""
        return self.loader.pending > 0

    def prepare(self, adapter: LoraAdapter) -> str | BaseException | None:
        """Whether ``adapter`` can be acquired now without building its slot contents here: None
        when it can (resident, or its load is done), ``LOADING`` while the loader thread builds it
        (started here if needed), or the error its load raised (the same for every request that waits
        for it; forgotten once none does, so a later request tries again)."""
        key = adapter.key
        if key in self._resident or key in self._staged:
            return None
        if key in self._failed:
            return self._failed[key]
        result = self.loader.poll(key)
        if isinstance(result, StagedAdapter):
            self._staged[key] = result
            return None
        if result is not None:
            self._failed[key] = result  # every waiting request for it fails alike
            return result
        in_flight = len(self._staged) + self.loader.pending
        if key not in self.loader and in_flight < self.capacity:  # at most a slot's worth staged ahead
            self.loader.request(adapter, min(self.capacity, len(self._resident) + in_flight + 1))
        return LOADING

    def expect(self, adapter: LoraAdapter, seconds: float = EXPECT_SECONDS) -> None:
        """Begin loading ``adapter`` for a request not yet submitted (``Engine.prefetch``), and keep
        the load for it ``seconds`` even while no waiting request wants it (:meth:`retain`)."""
        if adapter.key in self._resident:
            return
        self._expected[adapter.key] = time.monotonic() + seconds
        self.prepare(adapter)

    def wait_for_loads(self, timeout: float) -> None:
        """Block until the loads under way are done (at most ``timeout`` seconds): only where no
        running row would be stalled."""
        self.loader.wait(timeout)

    def retain(self, keys: set[str]) -> None:
        """Forget finished loads and failures that no waiting request wants any more (nor one on
        its way: :meth:`expect`)."""
        if self._expected:
            now = time.monotonic()
            self._expected = {k: until for k, until in self._expected.items() if until > now}
            keys = keys | self._expected.keys()
        for key in [k for k in self._staged if k not in keys]:
            del self._staged[key]
        for key in [k for k in self._failed if k not in keys]:
            del self._failed[key]
        self.loader.retain(keys)

    def acquire(self, adapter: LoraAdapter) -> int:
        """Make ``adapter`` resident (evicting as needed), count one user, return its slot.

        A load done by the loader thread (:meth:`prepare`) is installed; else the adapter is staged
        here, on the calling thread. Slots are keyed by ``adapter.key`` (id and version), so a
        replaced adapter's old version keeps serving the rows that started on it while new rows
        get the new one.
        """
        resident = self._resident.get(adapter.key)
        self._expected.pop(adapter.key, None)
        if resident is None:
            staged = self._staged.pop(adapter.key, None)
            slot = self._free_slot()
            if staged is None:
                staged = stage_adapter(adapter, self.layers, slot + 1, self.capacity, self._dora_factor)
            self._load(staged, slot)
            resident = self._resident[adapter.key]
        self._resident.move_to_end(adapter.key)
        resident.in_use += 1
        self._count(adapter.key)
        return resident.slot

    def _count(self, key: str) -> None:
        """One more use of ``key``; every ``capacity * 64`` uses all counts are halved (and zeros
        dropped), so a formerly hot adapter does not hold its slot forever and the table stays small."""
        self._uses[key] += 1
        self._acquired += 1
        if self._acquired % (self.capacity * _AGING_ROUNDS) == 0:
            self._uses = Counter({k: n // 2 for k, n in self._uses.items() if n > 1})

    def eviction_order(self) -> list[str]:
        """The resident adapters no running row uses, the next to be evicted first."""
        idle = [(i, key) for i, (key, r) in enumerate(self._resident.items()) if r.in_use == 0]
        return [key for _, key in sorted(idle, key=lambda item: (self._uses[item[1]], item[0]))]

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
        order = self.eviction_order()
        if not order:  # the engine admits a row only when can_acquire() says a slot is free or evictable
            raise AssertionError(f"all {self.capacity} adapter slots are in use by running requests")
        slot = self._resident[order[0]].slot
        self._unload(order[0])
        self.evictions += 1
        return slot

    def _load(self, staged: StagedAdapter, slot: int) -> None:
        """Install staged contents in ``slot`` (engine thread): a copy per layer, a pointer swap
        where the loader grew a bank's stacks."""
        adapter = staged.adapter
        try:
            for name, layer in staged.layers.items():
                bank = bank_of(self.layers[name])
                if bank is None:
                    self.layers[name].set_slot(slot, layer.A, layer.B, layer.scale, layer.dora)
                elif not bank.install(
                    slot,
                    layer.A,
                    layer.B,
                    layer.scale,
                    layer.grown,
                    self.capacity,
                    dora_factor=layer.dora,
                    rank=layer.rank,
                ):
                    self.inline_grows += 1
            if adapter.vocab:
                if self.vocab is None:
                    raise ValueError("this runner serves no adapter's own embedding or head")
                for name, layer in adapter.vocab.items():
                    self.vocab.set_slot(slot, name, layer)
        except Exception:  # a half-written slot would leak into the next adapter loaded there
            for name in adapter.layers:
                self.layers[name].clear_slot(slot)
            if self.vocab is not None:
                self.vocab.clear_slot(slot)
            raise
        for reader, layout in staged.layouts:  # laid out by the loader: nothing to pack at first use
            reader.adopt(slot, layout)
        self._resident[adapter.key] = _Resident(adapter=adapter, slot=slot)
        self.on_change()
        self.loads += 1

    def _dora_factor(self, key: str, name: str, weights: LoraLayerWeights) -> torch.Tensor:
        """g = m / ‖W + s·B·A‖_row of one DoRA layer ([out]), from the pristine base weight.
        Called while staging a load: on the loader thread, or on the engine thread when a load is
        installed at once (``acquire``); the cache is locked for that."""
        if self.base_weight is None:
            raise ValueError("DoRA adapters need the base weights (AdapterSlots(base_weight=...))")
        with self._dora_lock:
            factors = self._dora_factors.setdefault(key, {})
            self._dora_factors.move_to_end(key)
            while len(self._dora_factors) > 4 * self.capacity:
                self._dora_factors.popitem(last=False)
            cached = factors.get(name)
        if cached is None:
            cached = dora_factor(self.base_weight(name), weights)  # original_weight: [out, in]
            with self._dora_lock:
                factors[name] = cached
        return cached

    def _unload(self, key: str) -> None:
        resident = self._resident.pop(key)
        for name in resident.adapter.layers:
            self.layers[name].clear_slot(resident.slot)
        if self.vocab is not None:
            self.vocab.clear_slot(resident.slot)
        self.on_change()
