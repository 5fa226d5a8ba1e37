"""The engine described in one place: :func:`describe` builds the snapshot ``Engine.describe()`` returns.

Everything outside ``server/engine/`` that shows the engine (``/info``, ``/metrics``, a cluster
replica's report, the probe's KV capacity, the OpenAI routes' vocabulary check) reads this
snapshot, never the engine's or the runner's attributes: this module is the one place that
knows their names (runner attributes only some runners have, like the native runner's graphs or
weight layout, are read here with their defaults).

Consistency: ``describe`` runs on any thread, while the engine thread steps. It locks nothing
and never waits for a step: each number is read once (a counter is an ``int`` read under the
GIL), and collections the engine thread changes (the resident adapters, the batch sizes, the KV
memory's sequences) are copied, the copy retried if the engine changed them mid-read. So each
counter is a value the engine had, and counters never go backwards between two snapshots; but
the snapshot is not one cut through a step: two fields may come from either side of the same
step (``running`` from before a row finished, ``generated_tokens`` from after), and a figure
derived from several reads (the KV memory in use) may be off by what one step changed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:  # the snapshot's types import no torch: a reader needs none of the engine's code
    from server.engine.decode_threads import DecodeThreads
    from server.engine.lora_model import AdapterSlots
    from server.engine.merge import MergeManager
    from server.engine.runner import ModelRunner

T = TypeVar("T")
D = TypeVar("D")
_READ_TRIES = 5  # a copy of a collection the engine thread changes mid-read is taken again


@dataclass(frozen=True)
class RunnerInfo:
    """What runs the model: the runner and how its steps run."""

    name: str  # "hf" or "native"
    lora_backend: str  # --lora-backend, ``auto`` resolved: the backend eager steps use
    decode_kind: str  # --compile: "eager", "compile" (CPU) or "cuda_graphs"
    decode_lora_backend: str  # the backend graph-run decode steps use (eager: ``lora_backend``)
    graphs: int  # decode graphs compiled or captured so far
    warm_up_seconds: float  # spent compiling or capturing them at start-up
    weight_layout: str  # "dense", "blocked", "packed" or "quantized"
    quantization: str  # --quantization: "none", "int8", "int4", "gguf"
    vocab_size: int  # logits per position; token ids are 0 .. vocab_size - 1
    supports_prefix_cache: bool  # whether the runner can cache prompt prefixes at all
    # the compiled kernels' threads in small decode steps (``decode_threads.py``; {}: none chosen)
    decode_threads: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    # with --quantization: the kernels' dot products, "int (vnni)", "int (avx2)" or "float"
    # (``quant_cpu.CompiledQuant.describe``); "" without quantization
    quant_dot: str = ""


@dataclass(frozen=True)
class KvInfo:
    """The runner's KV memory, in tokens."""

    used_tokens: int  # tokens held (a block shared by sequences counted once)
    capacity_tokens: int | None  # None: grows on demand (the Hugging Face runner)
    bytes_reserved: int
    block_size: int | None  # tokens per block of a paged KV memory; None without one

    @property
    def free_tokens(self) -> int | None:
        return None if self.capacity_tokens is None else self.capacity_tokens - self.used_tokens


@dataclass(frozen=True)
class PrefixCacheInfo:
    """``--prefix-cache``: whether it runs (``reason`` says why not) and its counters since start."""

    enabled: bool
    reason: str | None = None  # set when not enabled
    lookups: int = 0  # sequences that looked for a cached prefix
    lookup_tokens: int = 0  # prompt tokens they looked up
    hit_tokens: int = 0  # of those, found cached (not prefilled again)
    evictions: int = 0  # cached blocks taken back for other tokens
    cached_blocks: int = 0  # blocks registered now
    evictable_blocks: int = 0  # of those, referenced by no sequence

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0


@dataclass(frozen=True)
class StatsInfo:
    """The engine's counters since start: ``engine.EngineStats``'s, read by the same names (a new
    counter there is shown by adding its field here)."""

    steps: int
    peak_batch: int  # most rows decoded together
    swaps: int  # merged-mode changes of the merged adapter
    swap_seconds: float
    generated_tokens: int  # tokens sampled (all rows, prefill's first tokens too)
    preemptions: int  # rows whose KV memory was taken back, recomputed later
    batch_sizes: Mapping[int, int]  # decode steps by rows in the batch: {rows: steps}


@dataclass(frozen=True)
class SlotsInfo:
    """The adapter memory slots (``lora_model.AdapterSlots``)."""

    resident_keys: tuple[str, ...]  # adapter versions in a slot (``id@version``), least recently used first
    in_use: int  # running rows holding a slot
    loads: int  # adapters copied into a slot since start
    evictions: int  # adapters evicted (LRU) since start
    capacity: int  # --max-loaded-adapters
    # the loader thread (server/engine/slot_loader.py)
    loads_pending: int = 0  # loads under way or staged, not yet installed
    load_seconds: float = 0.0  # loader-thread time spent building slot contents
    load_failures: int = 0  # loads that failed (their requests failed)
    inline_grows: int = 0  # banks reallocated on the engine thread (the loader's stacks were stale)


@dataclass(frozen=True)
class QueueInfo:
    running: int  # rows admitted: decoding, or still prefilling their prompt
    waiting: int  # submitted and not yet admitted


@dataclass(frozen=True)
class LimitsInfo:
    """The engine's limits: ``engine.EngineConfig``'s fields of the same names."""

    max_batch: int
    max_input_tokens: int
    max_total_tokens: int
    max_prefill_tokens: int
    max_loaded_adapters: int


@dataclass(frozen=True)
class SpeculationInfo:
    """``--speculate``: whether speculative decoding runs (``reason`` says why not) and its counters
    since start (``engine.SpeculationStats``), in all and by adapter."""

    enabled: bool
    reason: str | None = None  # set when not enabled
    speculate: int = 0  # draft tokens proposed per row and step
    max_batch: int = 0  # --speculate-max-batch: no drafts in steps with more running rows
    verify_rows: int = 0  # rows that carried drafts in a step
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    # adapter id (``__base__``: none) -> (drafted, accepted)
    by_adapter: Mapping[str, tuple[int, int]] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine at one moment (see the module docstring for what "one moment" promises)."""

    runner: RunnerInfo
    kv: KvInfo
    prefix_cache: PrefixCacheInfo
    mode: str  # "unmerged", "merged" or "auto" (a quantized base runs auto as unmerged)
    merged_adapter: str | None  # the stored id of the adapter folded into the weights, if any
    stats: StatsInfo
    slots: SlotsInfo
    queue: QueueInfo
    limits: LimitsInfo
    speculation: SpeculationInfo = field(
        default_factory=lambda: SpeculationInfo(enabled=False, reason="--speculate 0")
    )


class Described(Protocol):
    """What :func:`describe` reads of an ``Engine`` (a Protocol: ``engine.py`` imports this module)."""

    runner: ModelRunner
    stats: Any  # engine.EngineStats: StatsInfo's fields by the same names
    slots: AdapterSlots
    config: Any  # engine.EngineConfig: ``mode`` and LimitsInfo's fields by the same names
    merger: MergeManager
    prefix_cache: bool  # --prefix-cache on and supported by the runner
    speculate: int  # --speculate where the runner verifies drafts, else 0

    @property
    def num_running(self) -> int: ...
    @property
    def num_waiting(self) -> int: ...


def describe(engine: Described) -> EngineSnapshot:
    """``engine`` as an :class:`EngineSnapshot`; safe from any thread (module docstring)."""
    runner = engine.runner
    stats = engine.stats
    slots = engine.slots
    config = engine.config
    merged = engine.merger.merged
    return EngineSnapshot(
        runner=_runner_info(runner),
        kv=_kv_info(runner),
        prefix_cache=_prefix_cache_info(runner, engine.prefix_cache),
        mode=config.mode,
        merged_adapter=merged.adapter_id if merged is not None else None,
        stats=_same_fields(
            StatsInfo, stats, batch_sizes=MappingProxyType(_copied(lambda: dict(stats.batch_sizes)))
        ),
        slots=SlotsInfo(
            resident_keys=tuple(_copied(lambda: slots.resident_keys)),
            in_use=_copied(lambda: slots.in_use),
            loads=slots.loads,
            evictions=slots.evictions,
            capacity=slots.capacity,
            loads_pending=slots.loader.pending,
            load_seconds=slots.loader.seconds,
            load_failures=slots.loader.failed,
            inline_grows=slots.inline_grows,
        ),
        queue=QueueInfo(running=engine.num_running, waiting=engine.num_waiting),
        limits=_same_fields(LimitsInfo, config),
        speculation=_speculation_info(engine),
    )


def _runner_info(runner: ModelRunner) -> RunnerInfo:
    graphs: Any = getattr(runner, "graphs", None)  # the native runner's GraphedDecode under --compile
    return RunnerInfo(
        name=runner.name,
        lora_backend=runner.lora_backend.name,
        decode_kind=getattr(runner, "decode_kind", "eager"),
        decode_lora_backend=(graphs.lora_form if graphs is not None else runner.lora_backend).name,
        graphs=graphs.captures if graphs is not None else 0,
        warm_up_seconds=graphs.warm_up_seconds if graphs is not None else 0.0,
        weight_layout=getattr(runner, "weight_layout", "dense"),
        quantization=getattr(runner, "quantization", "none"),
        vocab_size=runner.vocab_size,
        supports_prefix_cache=runner.supports_prefix_cache,
        decode_threads=_decode_threads(runner),
        quant_dot=getattr(runner, "quant_dot", ""),
    )


def _decode_threads(runner: ModelRunner) -> Mapping[str, Any]:
    chooser: DecodeThreads | None = getattr(runner, "decode_threads", None)  # the native runner's
    return MappingProxyType({}) if chooser is None else MappingProxyType(_copied(chooser.describe))


def _kv_info(runner: ModelRunner) -> KvInfo:
    usage = _copied(runner.kv_usage)  # sums over the sequences the engine thread changes
    block = getattr(getattr(runner, "kv", None), "block_size", None)  # the native runner's PagedKVCache
    return KvInfo(usage.used_tokens, usage.capacity, usage.bytes_reserved, block)


def _prefix_cache_info(runner: ModelRunner, enabled: bool) -> PrefixCacheInfo:
    stats = runner.prefix_cache_stats() if enabled else None  # a fresh copy of its counters
    if stats is None:
        reason = (
            "--prefix-cache off"
            if runner.supports_prefix_cache
            else f"the {runner.name} runner has no prefix cache (the native runner has)"
        )
        return PrefixCacheInfo(enabled=False, reason=reason)
    return _same_fields(
        PrefixCacheInfo, stats, enabled=True, reason=None
    )  # runner.PrefixCacheStats' counters


def _speculation_info(engine: Described) -> SpeculationInfo:
    config, runner = engine.config, engine.runner
    if not engine.speculate:
        reason = (
            "--speculate 0"
            if runner.supports_speculation or not config.speculate
            else f"the {runner.name} runner does not verify drafts (the native runner does)"
        )
        return SpeculationInfo(enabled=False, reason=reason)
    stats = engine.stats.speculation  # engine.SpeculationStats
    by_adapter = _copied(lambda: {k: (v[0], v[1]) for k, v in stats.by_adapter.items()})
    return SpeculationInfo(
        enabled=True,
        speculate=engine.speculate,
        max_batch=config.speculate_max_batch,
        verify_rows=stats.steps,
        drafted_tokens=stats.drafted,
        accepted_tokens=stats.accepted,
        by_adapter=MappingProxyType(by_adapter),
    )


def _same_fields(cls: type[D], source: object, **given: Any) -> D:
    """A ``cls`` whose fields are ``given``, the others ``source``'s attributes of the same names."""
    values = {f.name: getattr(source, f.name) for f in fields(cls) if f.name not in given}
    return cls(**values, **given)


def _copied(read: Callable[[], T]) -> T:
    """``read()``, tried again when the engine thread changed a dict it iterates (RuntimeError);
    the last try's error is raised (it takes the engine changing that dict during every try)."""
    for _ in range(_READ_TRIES - 1):
        try:
            return read()
        except RuntimeError:
            continue
    return read()
