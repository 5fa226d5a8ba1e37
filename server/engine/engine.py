"""The engine: one thread owns the model and runs continuous batching over many adapters.

Every iteration (a *step*):

1. drop rows and waiting requests whose client went away;
2. admit waiting requests into free batch rows (FIFO, skipping those whose adapter cannot get
   a slot yet or is still loading on the loader thread, ``slot_loader.py``), prefill them as one
   small batch, sample their first token, join the batch;
3. decode one token for every running row, each row with its own adapter slot (and, for
   structured output, its own grammar: the tokens it may emit next, see ``grammar.py``);
4. finished rows leave at once and their adapter slots are released.

The serving mode (unmerged, merged, auto; see ``scheduler.py``) decides which requests may join
and which adapter, if any, is folded into the weights (``merge.py``). Rows of the merged adapter
read no LoRA slot: the weights already hold their update.

The engine knows nothing of the model's code: a :class:`~server.engine.runner.ModelRunner` owns
the weights, the KV memory and the forward passes. When the runner's KV memory is full, new
requests wait; when a running row cannot grow, the newest row is preempted (its KV memory freed)
and recomputed later from its prompt and the tokens it already streamed.

Prefix caching (``--prefix-cache``, runners with ``supports_prefix_cache``): an admitted row's
sequence starts on the longest cached prefix of what it prefills, computed by the same identity
(``prefix_identity``: the base, or one adapter version at one scale); only the rest is prefilled,
and a preempted row usually finds its own blocks again when it is recomputed.

HTTP handlers never touch the model: they call :meth:`Engine.submit` and await events; admin
operations run on the engine thread between steps through :meth:`Engine.call`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapters.peft_format import BaseLinearShape
from server.engine.describe import EngineSnapshot, describe
from server.engine.detokenize import IncrementalDetokenizer
from server.engine.errors import RequestRejected
from server.engine.grammar import GrammarCompiler
from server.engine.lora import BASE_SLOT
from server.engine.lora_model import LOADING, AdapterSlots
from server.engine.merge import BaseWeights, MergeManager
from server.engine.outbox import Outbox
from server.engine.output import OutputStage
from server.engine.requests import ErrorEvent, Event, FinishEvent, GenerationRequest
from server.engine.row import Row
from server.engine.runner import ModelRunner, StepOutput, StepRow
from server.engine.sampling import RowSampler
from server.engine.scheduler import AdapterKey, AutoPolicy, key_of, plan_merged
from server.engine.speculative import PromptLookup

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 32
    max_input_tokens: int = 2048
    max_total_tokens: int = 4096
    max_loaded_adapters: int = 64
    max_prefill_tokens: int = 4096  # prompt tokens prefilled in one step (at least one request)
    lora_backend: str = "auto"  # --lora-backend (server/engine/lora/choose.py); the HF runner's
    mode: Literal["unmerged", "merged", "auto"] = "auto"
    switch_wait: float = 0.5  # merged mode: seconds another adapter's request waits before a switch
    auto_min_uniform_steps: int = 8  # auto mode: fewest uniform steps before merging
    checkpoint_dir: Path | None = None  # safetensors checkpoint to restore base weights from
    max_prompt_chars: int = 262144  # longest prompt text, checked before tokenizing (server.api.generation)
    prefix_cache: bool = True  # reuse cached KV blocks of equal prompt prefixes (runners that support it)
    # --speculate: tokens proposed per row and step at most (prompt lookup); 0: off. The server's
    # default (4) is Settings'; an engine built directly (tests, benchmarks) chooses its own.
    speculate: int = 0
    # --speculate-max-batch: no drafts in a step with more running rows (vLLM's
    # speculative_disable_by_batch_size): a large batch is no longer bound by the weights' stream,
    # so verifying drafts costs about what they save
    speculate_max_batch: int = 4


BASE_LABEL = "__base__"


@dataclass
class SpeculationStats:
    """Speculative decoding since start: draft tokens proposed and accepted, in all and by adapter
    (the adapter id a request named; ``__base__`` for none, as the request metrics label it)."""

    drafted: int = 0
    accepted: int = 0
    steps: int = 0  # verify rows run (a row with drafts in a step)
    by_adapter: dict[str, list[int]] = field(default_factory=dict)  # id -> [drafted, accepted]

    def count(self, request: GenerationRequest, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        self.steps += 1
        name = request.adapter.adapter_id if request.adapter is not None else BASE_LABEL
        counts = self.by_adapter.setdefault(name, [0, 0])
        counts[0] += drafted
        counts[1] += accepted

    def acceptance_rate(self, drafted: int | None = None, accepted: int | None = None) -> float | None:
        drafted = self.drafted if drafted is None else drafted
        accepted = self.accepted if accepted is None else accepted
        return accepted / drafted if drafted else None


@dataclass
class EngineStats:
    steps: int = 0
    peak_batch: int = 0  # most rows decoded together since start
    batch_sizes: Counter[int] = field(default_factory=Counter)  # decode steps by batch size
    swaps: int = 0
    swap_seconds: float = 0.0
    preemptions: int = 0  # rows whose KV memory was taken back and recomputed later
    generated_tokens: int = 0  # tokens sampled since start (all rows, prefill's first tokens too)
    speculation: SpeculationStats = field(default_factory=lambda: SpeculationStats())


@dataclass
class _Control:
    """A function to run on the engine thread; returns ``RETRY`` to be tried again next step."""

    fn: Callable[[], Any]
    future: concurrent.futures.Future
    needs_unmerged: bool = False  # stop admitting merged rows so the batch can drain


RETRY = object()


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: PreTrainedTokenizerBase,
        config: EngineConfig,
        eos_ids: frozenset[int] = frozenset(),
    ) -> None:
        """``eos_ids``: tokens that end a generation besides the tokenizer's own EOS."""
        if not runner.can_merge:  # a quantized base: adapters can only be added unmerged
            if config.mode == "merged":
                raise ValueError(
                    "--mode merged cannot be used with a quantized base (--quantization): an adapter's "
                    "s·B·A cannot be folded into quantized blocks and restored exactly; use --mode "
                    "unmerged or auto (which then stays unmerged)"
                )
            config = dataclasses.replace(config, mode="unmerged")
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = config
        self.base_shapes: dict[str, BaseLinearShape] = runner.base_shapes
        self.merger = MergeManager(
            runner.weight_targets,
            config.checkpoint_dir,
            can_merge=config.mode != "unmerged",
            vocab=runner.vocab,
        )
        self.slots = AdapterSlots(
            runner.lora_targets,
            config.max_loaded_adapters,
            runner.slots_changed,
            self.merger.original_weight,
            runner.vocab,
        )
        eos_ids = eos_ids | _token_ids(getattr(tokenizer, "eos_token_id", None))
        self.special_ids = frozenset(tokenizer.all_special_ids) | eos_ids
        self.grammars = GrammarCompiler(tokenizer, runner.vocab_size, eos_ids)  # structured output
        # sampling, stop checks and events (output.py)
        self.output = OutputStage(tokenizer, eos_ids, self.special_ids, self.grammars)
        # --speculate: drafts per row and step, where the runner verifies them (the HF runner does not)
        self.speculate = config.speculate if runner.supports_speculation else 0
        self.auto = AutoPolicy(min_uniform_steps=config.auto_min_uniform_steps)
        # --prefix-cache: on where the runner supports it (the HF runner does not)
        self.prefix_cache = config.prefix_cache and runner.supports_prefix_cache
        self.stats = EngineStats()
        self._inbox: queue.SimpleQueue[GenerationRequest | _Control] = queue.SimpleQueue()
        self._waiting: deque[GenerationRequest] = deque()
        # preempted rows waiting to be recomputed, by request id (their progress so far)
        self._preempted: dict[int, Row] = {}
        self._controls: list[_Control] = []
        self._outbox = Outbox()  # events for asyncio consumers, handed over once per step
        self._rows: list[Row] = []  # the running batch, in the order the runner decodes it
        self._prefilling: list[Row] = []  # admitted, prompt not yet all in the KV cache (FIFO)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @classmethod
    def for_hf_model(
        cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: EngineConfig
    ) -> Engine:
        """An engine on a Hugging Face model through :class:`HFRunner`."""
        from server.engine.hf_runner import HFRunner

        runner = HFRunner(model, lora_backend=config.lora_backend, own_weights=config.mode != "unmerged")
        generation_config = getattr(model, "generation_config", None)
        return cls(runner, tokenizer, config, _token_ids(getattr(generation_config, "eos_token_id", None)))

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="loraplex-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.slots.loader.shutdown()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_running(self) -> int:
        """Rows admitted: decoding, or still prefilling their prompt."""
        return len(self._rows) + len(self._prefilling)

    @property
    def busy(self) -> bool:
        return bool(self._rows or self._prefilling or self._waiting or self._controls)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + self._inbox.qsize()

    @property
    def eos_ids(self) -> frozenset[int]:
        """Tokens that end a generation (the output stage's)."""
        return self.output.eos_ids

    @eos_ids.setter
    def eos_ids(self, ids: frozenset[int]) -> None:
        self.output.eos_ids = ids

    @property
    def steps(self) -> int:
        return self.stats.steps

    @property
    def peak_batch(self) -> int:
        return self.stats.peak_batch

    @property
    def merged_adapter_id(self) -> str | None:
        return self.merger.merged.adapter_id if self.merger.merged is not None else None

    # ------------------------------------------------------------------ for readers (any thread)

    def describe(self) -> EngineSnapshot:
        """The engine in one typed snapshot (runner, KV memory, prefix cache, mode, counters, slots,
        queue): what ``/info``, ``/metrics`` and cluster replicas show. Any thread, no lock, no wait
        for a step; its fields need not all come from the same step (``server/engine/describe.py``
        says what it promises)."""
        return describe(self)

    def base_weights(self) -> BaseWeights:
        """The base model's weights as loaded, whatever adapter is merged, and their digest: for the
        analysis routes' worker threads (any thread; ``merge.BaseWeights`` says why that is safe)."""
        return self.merger.base_weights

    # ------------------------------------------------------------------ submission (any thread)

    def validate(self, request: GenerationRequest) -> None:
        """Raise :class:`RequestRejected` with a message the user can act on."""
        n = len(request.prompt_ids)
        cfg = self.config
        if n == 0:
            raise RequestRejected("`inputs` must not be empty.")
        if n > cfg.max_input_tokens:
            raise RequestRejected(
                f"`inputs` has {n} tokens, more than the server's --max-input-tokens={cfg.max_input_tokens}; "
                "shorten the prompt."
            )
        if n + request.params.max_new_tokens > cfg.max_total_tokens:
            raise RequestRejected(
                f"`inputs` tokens + `max_new_tokens` must be <= {cfg.max_total_tokens} (--max-total-tokens); "
                f"got {n} + {request.params.max_new_tokens}. Lower max_new_tokens to at most "
                f"{max(cfg.max_total_tokens - n, 0)}."
            )
        capacity = self.runner.kv_usage().capacity
        if capacity is not None and n + request.params.max_new_tokens > capacity:
            raise RequestRejected(
                f"`inputs` tokens + `max_new_tokens` ({n} + {request.params.max_new_tokens}) exceed the server's "
                f"KV memory of {capacity} tokens (--kv-cache-tokens / --kv-cache-memory); lower max_new_tokens."
            )

    def submit(self, request: GenerationRequest) -> None:
        self.validate(request)
        request.submitted_at = time.perf_counter()
        self._inbox.put(request)

    def call(self, fn: Callable[[], Any], *, needs_unmerged: bool = False) -> concurrent.futures.Future:
        """Run ``fn`` on the engine thread between steps; ``fn`` may return ``RETRY`` to wait a step."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(_Control(fn, future, needs_unmerged))
        return future

    def verify_base(self) -> concurrent.futures.Future:
        """Unmerge as soon as no merged row runs, then compare the weights' digest with the one at load."""

        def check() -> Any:
            if self.merger.merged is not None:
                if self._rows or self._prefilling:
                    return RETRY
                self._set_merged(None)
            now = self.merger.digest()
            return {
                "intact": now == self.merger.digest_at_load,
                "sha256_now": now,
                "sha256_at_load": self.merger.digest_at_load,
                "swaps_since_load": self.merger.stats.swaps,
            }

        return self.call(check, needs_unmerged=True)

    def retire(self, key: str) -> concurrent.futures.Future:
        """Drop an adapter version from its memory slot once no running row uses it."""

        def evict() -> Any:
            if key in self.slots and not self.slots.evict(key):
                return RETRY
            return key

        return self.call(evict)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Submit and yield the request's events; leaving early (client gone) cancels it."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        request.sink = self._outbox.sink(loop, events)
        self.submit(request)
        try:
            while True:
                event = await events.get()
                yield event
                if isinstance(event, (FinishEvent, ErrorEvent)):
                    return
        finally:
            request.cancel()  # no-op when finished; frees the row when the client left

    # ------------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        while not self._stopping.is_set():
            idle = not self.busy
            self._drain_inbox(block=idle)
            self.step_safely()

    def step_safely(self) -> None:
        """One step; a failure fails the requests involved, never the engine."""
        try:
            self.step()
        except Exception as exc:
            log.exception("engine step failed")
            self._fail_all(f"generation failed: {exc}")
            self._outbox.flush()

    def _drain_inbox(self, block: bool) -> None:
        try:
            if block:
                self._accept(self._inbox.get(timeout=0.05))
            while True:
                self._accept(self._inbox.get_nowait())
        except queue.Empty:
            pass

    def _accept(self, item: GenerationRequest | _Control) -> None:
        if isinstance(item, _Control):
            self._controls.append(item)
        else:
            self._waiting.append(item)

    def _run_controls(self) -> None:
        pending = []
        for control in self._controls:
            try:
                result = control.fn()
            except Exception as exc:
                control.future.set_exception(exc)
                continue
            if result is RETRY:
                pending.append(control)
            else:
                control.future.set_result(result)
        self._controls = pending

    def run_until_idle(self, max_steps: int = 100_000) -> None:
        """Run steps on the calling thread until nothing is left (tests, benchmarks, no thread)."""
        for _ in range(max_steps):
            self._drain_inbox(block=False)
            if not self.busy:
                return
            self.step()
        raise RuntimeError("engine did not go idle")

    def step(self) -> None:
        try:
            self._step()
        finally:
            self._outbox.flush()

    def _step(self) -> None:
        self._run_controls()
        self._drop_cancelled()
        admitted = self._admit_merged() if self.config.mode == "merged" else self._admit()
        if self.config.mode == "auto":
            self._auto_switch(admitted)
        self._prefilling.extend(admitted)
        self._preempt_until_rows_fit()  # every running row can take its next token
        rows = list(self._rows)
        growth = {r.seq_id: 1 for r in rows}  # KV memory the step's rows take, in tokens
        chunks = self._prefill_chunks(growth) if self._prefilling else []
        drafts = self._drafts(rows, growth)
        plan = self._prefill_plan(chunks) + self._decode_plan(rows, drafts)
        if plan:
            start = time.perf_counter()
            try:
                output = self.runner.step(plan)
            except Exception as exc:
                self._fail_prefilling([row for row, _ in chunks], exc)
                raise
            if rows and not chunks and self.merger.merged is None:
                self.auto.observe_step(time.perf_counter() - start)
            if rows:
                self._decoded(rows, output, len(chunks), drafts)
            if chunks:
                self._prefilled(chunks, output)
            self._remove_finished()
        self.stats.steps += 1

    def _decode_plan(self, rows: list[Row], drafts: list[list[int]]) -> list[StepRow]:
        """One row per running row: its last token (a decode row), or its last token and drafts (a
        verify row: speculative decoding)."""
        plan = []
        for row, slot, proposed in zip(rows, self._slots_for(rows), drafts, strict=True):
            tokens = [row.next_input, *proposed]
            start = len(row.request.prompt_ids) + row.generated - 1  # all but the last token are in KV memory
            plan.append(StepRow(row.seq_id, tokens, start, slot, row.request.adapter_scale,
                                logits=len(tokens), drafts=len(proposed), decoding=True))  # fmt: skip
        return plan

    def _decoded(self, rows: list[Row], output: StepOutput, offset: int, drafts: list[list[int]]) -> None:
        """The running rows' tokens: chosen, streamed, verified drafts kept (``runner.commit``)."""
        self.stats.peak_batch = max(self.stats.peak_batch, len(rows))
        self.stats.batch_sizes[len(rows)] += 1
        first, at = [], sum(output.counts[:offset])
        for count in output.counts[offset : offset + len(rows)]:
            first.append(at)
            at += count
        before = [r.generated for r in rows]
        accepted = self.output.advance(rows, output.logits, first, drafts)
        for row, proposed, taken, had in zip(rows, drafts, accepted, before, strict=True):
            self.stats.generated_tokens += row.generated - had
            if not proposed:
                continue
            self.stats.speculation.count(row.request, len(proposed), taken)
            row.draft_length.observe(len(proposed), taken)
            if row.request.finished_at is None:
                self.runner.commit(row.seq_id, taken)

    def _drafts(self, rows: list[Row], growth: dict[int, int]) -> list[list[int]]:
        """Speculative decoding: each row's proposed tokens (prompt lookup, ``speculative.py``), at
        most its draft length (``DraftLength``: adapted to its acceptance, up to ``--speculate``),
        never past its ``max_new_tokens`` (the bonus token counts), and only where the KV memory
        holds them now (a row left without decodes one token, as usual)."""
        if not self.speculate or len(rows) > self.config.speculate_max_batch:
            return [[] for _ in rows]
        drafts: list[list[int]] = []
        for row in rows:
            room = row.sampler.params.max_new_tokens - row.generated - 1
            limit = min(row.draft_length.limit(self.speculate), room)  # adapted to its acceptance
            proposed = row.lookup.propose(limit) if row.lookup is not None else []
            if proposed and self.runner.can_grow({**growth, row.seq_id: 1 + len(proposed)}):
                growth[row.seq_id] = 1 + len(proposed)
            else:
                proposed = []
            drafts.append(proposed)
        return drafts

    # ------------------------------------------------------------------ merged and auto modes

    def _slots_for(self, rows: list[Row]) -> list[int]:
        """The slot each row reads: none for rows of the merged adapter (the weights hold it).

        A row's key includes its ``adapter_scale`` (``scheduler.key_of``): a request for the merged
        adapter at another scale has another key, so it never runs on the merged weights (auto mode
        unmerges first; merged mode waits or swaps to the scaled adapter).
        """
        merged = self.merger.merged
        if merged is None:
            return [r.slot for r in rows]
        return [BASE_SLOT if key_of(r.request) == merged.key else r.slot for r in rows]

    def _set_merged(self, adapter) -> None:
        seconds = self.merger.merge(adapter)
        if seconds:
            self.stats.swaps = self.merger.stats.swaps
            self.stats.swap_seconds = self.merger.stats.swap_seconds
            log.info("merged %s in %.3f s", adapter.adapter_id if adapter else "nothing (base)", seconds)

    def _drain_requested(self) -> bool:
        return any(c.needs_unmerged for c in self._controls) and self.merger.merged is not None

    def _admit_merged(self) -> list[Row]:
        merged = self.merger.merged
        plan = plan_merged(
            self._waiting, merged.key if merged else None, not self.num_running, self.config.switch_wait
        )
        if plan.switch_to is not None:
            self._set_merged(plan.switch_to.served_adapter)
        if not plan.admit or self._drain_requested():
            return []
        return self._admit(only_key=plan.admit_key)

    def _auto_switch(self, admitted: list[Row]) -> None:
        """Auto mode: merge the one adapter all traffic wants, unmerge when traffic mixes."""
        merged = self.merger.merged
        rows = [*self._rows, *self._prefilling, *admitted]  # every row of the next forwards
        if self._drain_requested():
            self._set_merged(None)  # rows in auto mode hold slots: they go on unmerged seamlessly
            return
        wanted: set[AdapterKey] = {key_of(r) for r in self._waiting} | {key_of(r.request) for r in rows}
        if not wanted:
            return
        decision = self.auto.decide(
            wanted, merged.key if merged else None, self.merger.stats.last_swap_seconds
        )
        if decision == "keep":
            return
        if decision is None:
            self._set_merged(None)
            return
        candidates = [r.request for r in rows] + list(self._waiting)
        self._set_merged(next(r.served_adapter for r in candidates if key_of(r) == decision))

    # ------------------------------------------------------------------ scheduling

    def _drop_cancelled(self) -> None:
        if any(r.cancelled.is_set() for r in self._waiting):
            for request in self._waiting:
                if request.cancelled.is_set():
                    self._preempted.pop(request.request_id, None)
            self._waiting = deque(r for r in self._waiting if not r.cancelled.is_set())
        for row in [*self._rows, *self._prefilling]:
            if row.request.cancelled.is_set() and row.request.finished_at is None:
                row.request.finished_at = time.perf_counter()
                row.request.emit(ErrorEvent("request cancelled", "cancelled"))
        self._remove_finished()

    def _admit(self, only_key: AdapterKey | str = "any") -> list[Row]:
        """Take waiting requests into free rows (:meth:`_admit_pass`). A request whose adapter is
        still loading (``AdapterSlots.prepare``, on the loader thread) waits while other rows run;
        when nothing runs, the engine waits here for the load rather than spinning."""
        if not self.num_running and self.config.mode != "merged":  # no row to stall: load, then admit
            wanted = [
                r.adapter for r in list(self._waiting)[: self.config.max_batch] if r.adapter is not None
            ]
            if any(self.slots.prepare(adapter) == LOADING for adapter in wanted):
                self.slots.wait_for_loads(_IDLE_LOAD_WAIT)
        admitted = self._admit_pass(only_key)
        self.slots.retain({r.adapter.key for r in self._waiting if r.adapter is not None})
        return admitted

    def _admit_pass(self, only_key: AdapterKey | str = "any") -> list[Row]:
        """Take waiting requests into free rows, FIFO, while their prompts fit in free KV memory.

        A runner without chunked prefill prefills whole prompts in the step that admits them, so
        they must also fit the step's prefill token budget (the first one always does).
        ``only_key``: in merged mode, only requests for the merged adapter (or None: the base).
        """
        free = self.config.max_batch - self.num_running
        chunked = self.runner.supports_chunked_prefill
        budget = self.config.max_prefill_tokens
        admitted: list[Row] = []
        still_waiting: deque[GenerationRequest] = deque()
        needs_slot = self.config.mode != "merged"
        # prompt tokens promised to admitted rows but not yet in the KV cache
        kv_tokens = sum(len(r.prefill_ids) - r.prefilled for r in self._prefilling)
        kv_sequences = len(self._prefilling)
        while self._waiting:
            request = self._waiting.popleft()
            eligible = free > 0 and (only_key == "any" or key_of(request) == only_key)
            if eligible and needs_slot and request.adapter is not None:
                load = self.slots.prepare(request.adapter)  # None: resident or loaded
                if isinstance(load, BaseException):  # its load failed: this request alone fails
                    self._refuse_admission(request, load)
                    continue
                eligible = load is None and self.slots.can_acquire(request.adapter.key)
            n = self._new_kv_tokens(request) if eligible else 0  # hashes the prompt: only when eligible
            in_budget = chunked or not admitted or n <= budget
            if not (eligible and in_budget and self.runner.can_admit(kv_tokens + n, kv_sequences + 1)):
                still_waiting.append(request)
                continue
            try:
                admitted.append(self._new_row(request))
            except Exception as exc:  # this request's own data (its adapter, its sampling): fail it alone
                self._refuse_admission(request, exc)
                continue
            free -= 1
            budget -= n
            kv_tokens += n
            kv_sequences += 1
        self._waiting = still_waiting
        return admitted

    def _new_kv_tokens(self, request: GenerationRequest) -> int:
        """The KV memory a request's admission takes, in tokens: its prompt (and, when recomputed,
        what it streamed), less a cached prefix it will reuse (``_start_sequence``), plus the part of
        that prefix in blocks no one holds now (reviving them takes them from the free memory)."""
        ids = _recompute_ids(request, self._preempted.get(request.request_id))
        if not self.prefix_cache or (request.want_prompt_logprobs and request.prompt_logprobs is None):
            return len(ids)
        hit = self.runner.cached_prefix(prefix_identity(request), ids)
        return len(ids) - hit.tokens + hit.revived_tokens

    def _start_sequence(self, row: Row, first: bool) -> None:
        """Create the row's sequence in the runner's KV memory, holding the longest cached prefix
        of what it prefills; the rest is prefilled from there. A row that wants its prompt's
        log-probabilities reuses nothing (they come from one pass over the whole prompt) but its
        blocks are cached for others."""
        if not self.prefix_cache:
            return
        reuse = () if _wants_prompt(row) else row.prefill_ids
        row.prefilled = self.runner.start_sequence(row.seq_id, prefix_identity(row.request), reuse)
        if first:
            row.cached_tokens = min(row.prefilled, len(row.request.prompt_ids))

    def _refuse_admission(self, request: GenerationRequest, exc: Exception) -> None:
        """A request whose admission raised ends with an error; the engine and other rows go on."""
        log.exception("request %d failed at admission", request.request_id)
        self._preempted.pop(request.request_id, None)
        request.finished_at = time.perf_counter()
        request.emit(
            ErrorEvent(f"generation failed: this request could not be admitted: {exc}", "generation")
        )

    def _new_row(self, request: GenerationRequest) -> Row:
        uses_slot = request.adapter is not None and self.config.mode != "merged"
        slot = self.slots.acquire(request.adapter) if uses_slot else BASE_SLOT
        try:
            return self._build_row(request, slot)
        except Exception:
            if uses_slot:  # the slot's user count was taken above: give it back
                self.slots.release(request.adapter.key)
            raise

    def _build_row(self, request: GenerationRequest, slot: int) -> Row:
        row = self._preempted.pop(request.request_id, None)
        first = row is None
        if row is not None:  # recompute: the row goes on where it stopped
            row.slot = slot
        else:
            request.admitted_at = time.perf_counter()
            device = self.runner.device
            row = Row(
                request=request,
                slot=slot,
                sampler=RowSampler.create(request.params, device),
                detokenizer=IncrementalDetokenizer(self.tokenizer),
                seen=torch.tensor(request.prompt_ids, dtype=torch.long, device=device),
                grammar=self.grammars.matcher(request.grammar) if request.grammar is not None else None,
                lookup=PromptLookup(request.prompt_ids) if self.speculate else None,
            )
        row.prefill_ids = _recompute_ids(request, row)
        row.prefilled = 0
        self._start_sequence(row, first)  # last: nothing after it may fail and leak the sequence
        return row

    def _prefill_chunks(self, growth: dict[int, int]) -> list[tuple[Row, int]]:
        """The next prompt chunks, oldest rows first, within ``max_prefill_tokens`` and the KV
        memory left after the running rows' next tokens (``growth``, which the chunks join).

        A runner with chunked prefill takes part of a long prompt now and the rest in later steps,
        so running rows keep decoding meanwhile; other runners take whole prompts.
        """
        chunked = self.runner.supports_chunked_prefill
        budget = self.config.max_prefill_tokens
        chunks: list[tuple[Row, int]] = []  # (row, tokens to prefill now)
        total = 0
        for row in self._prefilling:
            remaining = len(row.prefill_ids) - row.prefilled
            # prompt log-probabilities are computed over one whole-prompt pass: such a row is not chunked
            whole = not chunked or _wants_prompt(row)
            take = remaining if whole else min(remaining, budget - total)
            if take <= 0 or (chunks and whole and total + take > budget):
                break
            if not self.runner.can_grow({**growth, row.seq_id: take}):
                break  # KV memory is short: rows finishing or preemption will make room
            chunks.append((row, take))
            growth[row.seq_id] = take
            total += take
        if not chunks and not self._rows and len(self._prefilling) > 1:
            self._preempt(self._prefilling[-1])  # prefilling rows hold each other's room
        return chunks

    def _prefill_plan(self, chunks: list[tuple[Row, int]]) -> list[StepRow]:
        rows = [row for row, _ in chunks]
        return [
            StepRow(
                row.seq_id,
                row.prefill_ids[row.prefilled : row.prefilled + take],
                row.prefilled,
                slot,
                row.request.adapter_scale,
                want_token_logprobs=_wants_prompt(row),
                top_n=_VOCAB_ALL if row.request.want_prompt_distributions else row.request.prompt_top_n,
            )
            for (row, take), slot in zip(chunks, self._slots_for(rows), strict=True)
        ]

    def _fail_prefilling(self, rows: list[Row], exc: Exception) -> None:
        """A failed step: rows being prefilled are not in the batch yet (``_fail_all`` would not
        reach them): fail and release them here."""
        for row in rows:
            row.request.finished_at = time.perf_counter()
            row.request.emit(ErrorEvent(f"generation failed: {exc}", "generation"))
            self._release(row)
        self.runner.release(r.seq_id for r in rows)
        self._prefilling = [r for r in self._prefilling if r.request.finished_at is None]

    def _prefilled(self, chunks: list[tuple[Row, int]], output: StepOutput) -> None:
        """Prompt chunks are in KV memory: rows whose prompt is complete choose their first token
        and join the running batch (they decode from the next step on)."""
        done: list[int] = []
        for i, (row, take) in enumerate(chunks):
            if _wants_prompt(row):  # asked for: the whole prompt was prefilled at once
                values = output.token_logprobs.get(row.seq_id)
                row.request.prompt_logprobs = [] if values is None else values.float().tolist()
                top = output.token_top.get(row.seq_id)  # ([n-1, k], [n-1, k])
                if top is not None and row.request.want_prompt_distributions:  # k = V: put back in id order
                    row.request.prompt_distributions = (
                        torch.empty_like(top[0]).scatter_(1, top[1], top[0]).cpu()
                    )
                elif top is not None:
                    row.request.prompt_top_tokens = [
                        tuple(self.output.top_token(i, lp) for i, lp in zip(ids, lps, strict=True))
                        for lps, ids in zip(top[0].tolist(), top[1].tolist(), strict=True)
                    ]
            row.prefilled += take
            if row.prefilled == len(row.prefill_ids):
                done.append(i)
        if not done:
            return
        joined = [chunks[i][0] for i in done]
        self._prefilling = [r for r in self._prefilling if r.prefilled < len(r.prefill_ids)]
        self._rows.extend(joined)
        counts = output.counts  # the prompt rows come first in the plan, one logit each
        first = [sum(counts[:i]) for i in done]
        self.output.advance(joined, output.logits, first)
        self.stats.generated_tokens += len(joined)

    def _preempt_until_rows_fit(self) -> None:
        """Free KV memory for the next decode step by preempting the newest rows (recomputed later)."""
        while self._rows and not self.runner.can_decode([r.seq_id for r in self._rows]):
            if self._prefilling:
                self._preempt(self._prefilling[-1])
            elif len(self._rows) > 1:
                self._preempt(self._rows[-1])
            else:
                break  # one row always fits: requests larger than the KV memory are refused

    def _preempt(self, row: Row) -> None:
        """Take a row's KV memory back; it waits at the head of the queue and is recomputed."""
        if row in self._prefilling:
            self._prefilling.remove(row)
        else:
            self._rows.remove(row)
        self.runner.release([row.seq_id])
        self._release(row)
        self._preempted[row.request.request_id] = row
        self.stats.preemptions += 1
        self._waiting.appendleft(row.request)
        log.info("preempted request %d (KV memory full); it will be recomputed", row.request.request_id)

    def _remove_finished(self) -> None:
        """Finished rows leave the batch at once: their slots and KV memory are released."""
        finished = [r for r in (*self._rows, *self._prefilling) if r.request.finished_at is not None]
        if not finished:
            return
        for row in finished:
            self._release(row)
        self.runner.release(r.seq_id for r in finished)
        self._rows = [r for r in self._rows if r.request.finished_at is None]
        self._prefilling = [r for r in self._prefilling if r.request.finished_at is None]

    def _release(self, row: Row) -> None:
        if row.slot != BASE_SLOT and row.request.adapter is not None:
            self.slots.release(row.request.adapter.key)

    def _fail_all(self, message: str) -> None:
        rows = [*self._rows, *self._prefilling]
        for row in rows:
            if row.request.finished_at is None:
                row.request.finished_at = time.perf_counter()
                row.request.emit(ErrorEvent(message, "generation"))
            self._release(row)
        self.runner.release(r.seq_id for r in rows)
        self._rows, self._prefilling = [], []


def prefix_identity(request: GenerationRequest) -> str:
    """What computes a request's K and V, as the prefix cache keys it: the bare base, or the adapter
    version it is served (``id@version``: a stored adapter's version holds its sha256 and a sequence
    number that never repeats; a composition's, its whole digest) at its ``adapter_scale``. Merged
    and unmerged serving of one adapter have the same identity: see docs/prefix-caching.md."""
    served = request.served_adapter
    return "base" if served is None else f"adapter:{served.key}"


_IDLE_LOAD_WAIT = 0.1  # seconds an idle engine waits for an adapter load before its next step
_VOCAB_ALL = 1 << 30  # a top_n above any vocabulary: the runner returns every token (min(top_n, V))


def _wants_prompt(row: Row) -> bool:
    """Prompt log-probabilities are computed at the first prefill only (not when recomputing)."""
    return row.request.want_prompt_logprobs and row.request.prompt_logprobs is None


def _recompute_ids(request: GenerationRequest, row: Row | None) -> list[int]:
    """The tokens to prefill: the prompt, plus what a preempted row (``row``) already streamed."""
    return request.prompt_ids if row is None else [*request.prompt_ids, *row.generated_ids]


def _token_ids(value: Any) -> frozenset[int]:
    """An ``eos_token_id`` setting (an int, a list of ints or None) as a set."""
    if isinstance(value, int):
        return frozenset({value})
    if isinstance(value, (list, tuple)):
        return frozenset(int(v) for v in value)
    return frozenset()
