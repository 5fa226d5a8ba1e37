"""The scheduler: which waiting requests join the batch, which adapter is merged, which rows are
preempted (:class:`Scheduler`), with the serving modes' pure decisions beside it.

* ``unmerged``: everything may join; adapters are applied per row (LoRA layers).
* ``merged``: one adapter (or none) is folded into the weights; only its requests join. When
  requests for another adapter wait, the merged one stops taking new rows once the oldest of
  them has waited ``switch_wait`` seconds (or nothing else is waiting); the batch drains, then
  the engine swaps to the adapter of the oldest waiting request. Every request therefore waits
  at most ``switch_wait`` + one batch drain + one swap per adapter ahead of it: no starvation.
* ``auto``: unmerged by default; merged while every running and waiting request wants the same
  adapter. Merging is a bet that the traffic stays uniform, so it is placed like a ski rental:
  only after the traffic has been uniform for as long as a merge and the later unmerge cost
  (at least ``min_uniform_steps`` steps; a swap's cost is the lower median of the recent swaps,
  so that one slow swap does not postpone every later merge). Mixed traffic unmerges at once, since otherwise the
  other requests would wait.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from server.engine.lora_model import LOADING, AdapterSlots
from server.engine.merge import MergeManager
from server.engine.requests import ErrorEvent, GenerationRequest
from server.engine.row import Row
from server.engine.runner import ModelRunner

log = logging.getLogger(__name__)

AdapterKey = str | None  # adapter id@version (*scale when not 1), None for the bare base


def key_of(request: GenerationRequest) -> AdapterKey:
    """What the request needs merged to run as a base row: its adapter at its ``adapter_scale``."""
    served = request.served_adapter
    return served.key if served is not None else None


def prefix_identity(request: GenerationRequest) -> str:
    """What computes a request's K and V, as the prefix cache keys it: the bare base, or the adapter
    version it is served (``id@version``: a stored adapter's version holds its sha256 and a sequence
    number that never repeats; a composition's, its whole digest) at its ``adapter_scale``. Merged
    and unmerged serving of one adapter have the same identity: see docs/prefix-caching.md."""
    served = request.served_adapter
    return "base" if served is None else f"adapter:{served.key}"


def recompute_ids(request: GenerationRequest, row: Row | None) -> list[int]:
    """The tokens to prefill: the prompt, plus what a preempted row (``row``) already streamed."""
    return request.prompt_ids if row is None else [*request.prompt_ids, *row.generated_ids]


@dataclass
class MergedPlan:
    admit_key: AdapterKey  # requests with this key may join
    admit: bool  # False while a switch is pending (the batch drains)
    switch_to: GenerationRequest | None  # swap to this request's adapter now (batch is empty)


def plan_merged(
    waiting: Iterable[GenerationRequest], merged_key: AdapterKey, batch_empty: bool, switch_wait: float
) -> MergedPlan:
    """Merged mode: keep serving the merged adapter, or drain and switch (see module docstring)."""
    now = time.perf_counter()
    oldest_other: GenerationRequest | None = None
    any_matching = False
    for request in waiting:
        if key_of(request) == merged_key:
            any_matching = True
        elif oldest_other is None:
            oldest_other = request
    if oldest_other is None:
        return MergedPlan(merged_key, True, None)
    pending = not any_matching or now - oldest_other.submitted_at >= switch_wait
    if not pending:
        return MergedPlan(merged_key, True, None)
    if batch_empty:
        return MergedPlan(key_of(oldest_other), True, oldest_other)
    return MergedPlan(merged_key, False, None)


@dataclass
class AutoPolicy:
    """Auto mode's merge decision, with ski-rental hysteresis."""

    min_uniform_steps: int = 8
    uniform_steps: int = 0
    uniform_key: AdapterKey = None
    mean_step_seconds: float = 0.0

    def observe_step(self, seconds: float) -> None:
        """Feed the duration of an unmerged decode step (exponential moving average)."""
        self.mean_step_seconds = (
            seconds if self.mean_step_seconds == 0 else 0.9 * self.mean_step_seconds + 0.1 * seconds
        )

    def steps_needed(self, swap_seconds: float) -> int:
        """Uniform steps before merging: a merge plus the later unmerge, in step durations."""
        if self.mean_step_seconds <= 0:
            return self.min_uniform_steps
        return max(self.min_uniform_steps, math.ceil(2 * swap_seconds / self.mean_step_seconds))

    def decide(
        self, wanted: set[AdapterKey], merged_key: AdapterKey, swap_seconds: float
    ) -> AdapterKey | str:
        """Return the adapter key to have merged now (None: unmerged), or ``"keep"``."""
        if merged_key is not None:
            if wanted - {merged_key}:
                self.uniform_steps = 0
                return None
            return "keep"
        if len(wanted) != 1 or None in wanted:
            self.uniform_steps = 0  # mixed traffic, or base-only traffic (nothing to merge)
            return "keep"
        (key,) = wanted
        if key != self.uniform_key:
            self.uniform_key, self.uniform_steps = key, 0
        self.uniform_steps += 1
        if self.uniform_steps >= self.steps_needed(swap_seconds):
            return key
        return "keep"


_IDLE_LOAD_WAIT = 0.1  # seconds an idle engine waits for an adapter load before its next step


class _Control(Protocol):
    needs_unmerged: bool  # an admin call waits for the merged adapter to leave the weights


class SchedulerHost(Protocol):
    """What the scheduler reads and changes of the engine (``engine.Engine``): its collaborators,
    its batch, and how it builds and releases a row. A protocol, so that this module
    need not import the engine (which imports it)."""

    config: Any  # engine.EngineConfig
    stats: Any  # engine.EngineStats
    runner: ModelRunner
    slots: AdapterSlots
    merger: MergeManager
    prefix_cache: bool
    _rows: list[Row]
    _prefilling: list[Row]
    _controls: Sequence[_Control]

    @property
    def num_running(self) -> int: ...

    def _new_row(self, request: GenerationRequest) -> Row: ...

    def _release(self, row: Row) -> None: ...


class Scheduler:
    """Which requests join the batch and when (admission), which adapter is merged (mode
    switching), and which rows give their KV memory back when it runs short (preemption).

    It owns the waiting queue (FIFO; a preempted request goes back to its head) and the auto
    mode's policy; it decides over the engine's batch, and the engine runs the step. Engine thread
    only (the engine's inbox hands requests over).
    """

    def __init__(self, engine: SchedulerHost, auto: AutoPolicy) -> None:
        self.engine = engine
        self.auto = auto
        self.waiting: deque[GenerationRequest] = deque()
        # preempted rows waiting to be recomputed, by request id (their progress so far)
        self.preempted: dict[int, Row] = {}

    def drop_cancelled(self) -> None:
        """Waiting requests whose client went away leave the queue (and a preempted one its row)."""
        if any(r.cancelled.is_set() for r in self.waiting):
            for request in self.waiting:
                if request.cancelled.is_set():
                    self.preempted.pop(request.request_id, None)
            self.waiting = deque(r for r in self.waiting if not r.cancelled.is_set())

    # ------------------------------------------------------------------ admission

    def admit(self, only_key: AdapterKey | str = "any") -> list[Row]:
        """Take waiting requests into free rows (:meth:`admit_pass`). A request whose adapter is
        still loading (``AdapterSlots.prepare``, on the loader thread) waits while other rows run;
        when nothing runs, the engine waits here for the load rather than spinning.

        The loads of the first ``max_batch`` waiting requests start here even while the batch is
        full (at most a slot's worth staged ahead: ``prepare``), so an adapter loads while its
        request queues instead of after it reaches the head with a free row."""
        if self.engine.config.mode != "merged":
            head = list(self.waiting)[: self.engine.config.max_batch]
            wanted = [r.adapter for r in head if r.adapter is not None]
            loading = [self.engine.slots.prepare(adapter) == LOADING for adapter in wanted]
            if any(loading) and not self.engine.num_running:  # no row to stall: load, then admit
                merged = self.engine.merger.merged
                if merged is not None and any(key_of(r) != merged.key for r in head):
                    self.unmerge_idle()  # the swap their admission makes anyway, beside their loads
                self.engine.slots.wait_for_loads(_IDLE_LOAD_WAIT)
        admitted = self.admit_pass(only_key)
        self.engine.slots.retain({r.adapter.key for r in self.waiting if r.adapter is not None})
        return admitted

    def expect(self, version: str) -> None:
        """A request for adapter version ``version`` is on its way (its HTTP body was just read;
        the adapter may still be read from disk). Auto mode, idle, with another adapter merged: the
        request could not run beside the merged weights, so its admission would unmerge first, after
        its adapter's load; unmerging now does it while the adapter is read and staged instead."""
        merged = self.engine.merger.merged
        if self.engine.config.mode != "auto" or merged is None or merged.version == version:
            return
        if self.engine.num_running or self.waiting:  # not idle: admission decides, as ever
            return
        self.unmerge_idle()

    def unmerge_idle(self) -> None:
        """Auto mode, nothing running: unmerge (the next requests want another adapter)."""
        self.auto.uniform_steps = 0
        self.set_merged(None)

    def admit_pass(self, only_key: AdapterKey | str = "any") -> list[Row]:
        """Take waiting requests into free rows, FIFO, while their prompts fit in free KV memory.

        A runner without chunked prefill prefills whole prompts in the step that admits them, so
        they must also fit the step's prefill token budget (the first one always does).
        ``only_key``: in merged mode, only requests for the merged adapter (or None: the base).
        """
        free = self.engine.config.max_batch - self.engine.num_running
        chunked = self.engine.runner.supports_chunked_prefill
        budget = self.engine.config.max_prefill_tokens
        admitted: list[Row] = []
        still_waiting: deque[GenerationRequest] = deque()
        needs_slot = self.engine.config.mode != "merged"
        # prompt tokens promised to admitted rows but not yet in the KV cache
        kv_tokens = sum(len(r.prefill_ids) - r.prefilled for r in self.engine._prefilling)
        kv_sequences = len(self.engine._prefilling)
        while self.waiting:
            request = self.waiting.popleft()
            eligible = free > 0 and (only_key == "any" or key_of(request) == only_key)
            if eligible and needs_slot and request.adapter is not None:
                load = self.engine.slots.prepare(request.adapter)  # None: resident or loaded
                if isinstance(load, BaseException):  # its load failed: this request alone fails
                    self.refuse_admission(request, load)
                    continue
                eligible = load is None and self.engine.slots.can_acquire(request.adapter.key)
            n = self.new_kv_tokens(request) if eligible else 0  # hashes the prompt: only when eligible
            in_budget = chunked or not admitted or n <= budget
            if not (eligible and in_budget and self.engine.runner.can_admit(kv_tokens + n, kv_sequences + 1)):
                still_waiting.append(request)
                continue
            try:
                admitted.append(self.engine._new_row(request))
            except Exception as exc:  # this request's own data (its adapter, its sampling): fail it alone
                self.refuse_admission(request, exc)
                continue
            free -= 1
            budget -= n
            kv_tokens += n
            kv_sequences += 1
        self.waiting = still_waiting
        return admitted

    def new_kv_tokens(self, request: GenerationRequest) -> int:
        """The KV memory a request's admission takes, in tokens: its prompt (and, when recomputed,
        what it streamed), less a cached prefix it will reuse (``Engine._start_sequence``), plus the part of
        that prefix in blocks no one holds now (reviving them takes them from the free memory)."""
        row = self.preempted.get(request.request_id)
        ids = recompute_ids(request, row)
        if not self.engine.prefix_cache or (
            request.want_prompt_logprobs and (row is None or row.prompt is None)
        ):
            return len(ids)
        hit = self.engine.runner.cached_prefix(prefix_identity(request), ids)
        return len(ids) - hit.tokens + hit.revived_tokens

    def refuse_admission(self, request: GenerationRequest, exc: Exception) -> None:
        """A request whose admission raised ends with an error; the engine and other rows go on."""
        log.exception("request %d failed at admission", request.request_id)
        self.preempted.pop(request.request_id, None)
        request.finished_at = time.perf_counter()
        request.emit(
            ErrorEvent(f"generation failed: this request could not be admitted: {exc}", "generation")
        )

    # ------------------------------------------------------------------ merged and auto modes

    def admit_merged(self) -> list[Row]:
        merged = self.engine.merger.merged
        plan = plan_merged(
            self.waiting,
            merged.key if merged else None,
            not self.engine.num_running,
            self.engine.config.switch_wait,
        )
        if plan.switch_to is not None:
            self.set_merged(plan.switch_to.served_adapter)
        if not plan.admit or self.drain_requested():
            return []
        return self.admit(only_key=plan.admit_key)

    def drain_requested(self) -> bool:
        return any(c.needs_unmerged for c in self.engine._controls) and self.engine.merger.merged is not None

    def auto_switch(self, admitted: list[Row]) -> None:
        """Auto mode: merge the one adapter all traffic wants, unmerge when traffic mixes."""
        merged = self.engine.merger.merged
        rows = [*self.engine._rows, *self.engine._prefilling, *admitted]  # every row of the next forwards
        if self.drain_requested():
            self.set_merged(None)  # rows in auto mode hold slots: they go on unmerged seamlessly
            return
        wanted: set[AdapterKey] = {key_of(r) for r in self.waiting} | {key_of(r.request) for r in rows}
        if not wanted:
            return
        decision = self.auto.decide(
            wanted, merged.key if merged else None, self.engine.merger.stats.typical_swap_seconds()
        )
        if decision == "keep":
            return
        if decision is None:
            self.set_merged(None)
            return
        candidates = [r.request for r in rows] + list(self.waiting)
        self.set_merged(next(r.served_adapter for r in candidates if key_of(r) == decision))

    def set_merged(self, adapter) -> None:
        seconds = self.engine.merger.merge(adapter)
        if seconds:
            self.engine.stats.swaps = self.engine.merger.stats.swaps
            self.engine.stats.swap_seconds = self.engine.merger.stats.swap_seconds
            log.info("merged %s in %.3f s", adapter.adapter_id if adapter else "nothing (base)", seconds)

    # ------------------------------------------------------------------ preemption

    def preempt_until_rows_fit(self) -> None:
        """Free KV memory for the next decode step by preempting the newest rows (recomputed later)."""
        while self.engine._rows and not self.engine.runner.can_decode([r.seq_id for r in self.engine._rows]):
            if self.engine._prefilling:
                self.preempt(self.engine._prefilling[-1])
            elif len(self.engine._rows) > 1:
                self.preempt(self.engine._rows[-1])
            else:
                break  # one row always fits: requests larger than the KV memory are refused

    def preempt(self, row: Row) -> None:
        """Take a row's KV memory back; it waits at the head of the queue and is recomputed."""
        if row in self.engine._prefilling:
            self.engine._prefilling.remove(row)
        else:
            self.engine._rows.remove(row)
        self.engine.runner.release([row.seq_id])
        self.engine._release(row)
        self.preempted[row.request.request_id] = row
        self.engine.stats.preemptions += 1
        self.waiting.appendleft(row.request)
        log.info("preempted request %d (KV memory full); it will be recomputed", row.request.request_id)
