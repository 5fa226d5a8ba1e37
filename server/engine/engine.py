"""The engine: one thread owns the model and runs continuous batching over many adapters.

The engine's one job is the loop. Every iteration (a *step*):

1. run admin calls (:meth:`Engine.call`) and drop rows and waiting requests whose client went away;
2. the :class:`~server.engine.scheduler.Scheduler` admits waiting requests into free batch rows
   (FIFO, skipping those whose adapter cannot get a slot yet or is still loading on the loader
   thread, ``slot_loader.py``), switches the merged adapter (serving modes), and preempts the
   newest rows when the KV memory cannot hold every running row's next token (a preempted row is
   recomputed later from its prompt and the tokens it already streamed);
3. the step plan: prompt chunks of admitted rows (within ``max_prefill_tokens``), one decode row
   per running row (or a verify row with drafts: speculative decoding), each with its own adapter
   slot and scale, run by the :class:`~server.engine.runner.ModelRunner` in one ``step`` call;
4. the output stage (``output.py``) turns each row's logits into tokens and events (and, for
   structured output, keeps each row in its grammar, ``grammar.py``);
5. finished rows leave at once: their adapter slots and KV memory are released.

Rows of the merged adapter read no LoRA slot: the weights already hold their update. The engine
knows nothing of the model's code: the runner owns the weights, the KV memory and the forward
passes.

Prefix caching (``--prefix-cache``, runners with ``supports_prefix_cache``): an admitted row's
sequence starts on the longest cached prefix of what it prefills, computed by the same identity
(``prefix_identity``: the base, or one adapter version at one scale); only the rest is prefilled,
and a preempted row usually finds its own blocks again when it is recomputed.

HTTP handlers never run the model: they call :meth:`Engine.submit` and await events; admin
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
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapters.peft_format import BaseLinearShape, LoraAdapter
from server.engine.describe import EngineSnapshot, describe
from server.engine.detokenize import IncrementalDetokenizer
from server.engine.errors import RequestRejected
from server.engine.grammar import GrammarCompiler
from server.engine.lora import BASE_SLOT
from server.engine.lora_model import AdapterSlots
from server.engine.merge import BaseWeights, MergeManager
from server.engine.outbox import Outbox
from server.engine.output import OutputStage
from server.engine.requests import ErrorEvent, Event, FinishEvent, GenerationRequest, PromptScores
from server.engine.row import Row
from server.engine.runner import ModelRunner, StepOutput, StepRow
from server.engine.sampling import RowSampler
from server.engine.scheduler import AutoPolicy, Scheduler, key_of, prefix_identity, recompute_ids
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
        # --prefix-cache: on where the runner supports it (the HF runner does not)
        self.prefix_cache = config.prefix_cache and runner.supports_prefix_cache
        self.stats = EngineStats()
        self._inbox: queue.SimpleQueue[GenerationRequest | _Control] = queue.SimpleQueue()
        # requests in the inbox, not yet in the scheduler's queue: what --max-queue counts (controls,
        # such as prefetch and expect, are also in the inbox and must not count)
        self._inbox_requests = 0
        self._inbox_lock = threading.Lock()
        self._controls: list[_Control] = []
        self._outbox = Outbox()  # events for asyncio consumers, handed over once per step
        self._rows: list[Row] = []  # the running batch, in the order the runner decodes it
        self._prefilling: list[Row] = []  # admitted, prompt not yet all in the KV cache (FIFO)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        # the waiting queue; admission, mode switching and preemption (scheduler.py)
        self.scheduler = Scheduler(self, AutoPolicy(min_uniform_steps=config.auto_min_uniform_steps))

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
        return bool(self._rows or self._prefilling or self.scheduler.waiting or self._controls)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + self._inbox_requests

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
        with self._inbox_lock:
            self._inbox_requests += 1
        self._inbox.put(request)

    def call(self, fn: Callable[[], Any], *, needs_unmerged: bool = False) -> concurrent.futures.Future:
        """Run ``fn`` on the engine thread between steps; ``fn`` may return ``RETRY`` to wait a step."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(_Control(fn, future, needs_unmerged))
        return future

    def expect(self, version: str) -> None:
        """A request for the stored adapter version ``version`` is on its way (thread-safe; the API
        calls it as soon as it knows the version, before reading the adapter from disk): auto mode
        unmerges another adapter now if the engine is idle (``Scheduler.expect``)."""
        if self.config.mode == "auto":
            self.call(lambda: self.scheduler.expect(version))

    def prefetch(self, adapter: LoraAdapter) -> None:
        """A request for ``adapter`` is on its way (thread-safe; the API calls it once the adapter is
        read, before tokenizing and submitting): its slot load starts now on the loader thread, and
        is kept for it a few seconds (``AdapterSlots.expect``)."""
        if self.config.mode == "merged":
            return

        def start() -> None:
            self.scheduler.expect(adapter.version)
            self.slots.expect(adapter)

        self.call(start)

    def verify_base(self) -> concurrent.futures.Future:
        """Unmerge as soon as no merged row runs, then compare the weights' digest with the one at load."""

        def check() -> Any:
            if self.merger.merged is not None:
                if self._rows or self._prefilling:
                    return RETRY
                self.scheduler.set_merged(None)
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
            with self._inbox_lock:  # before the append: a moment's undercount, never a spurious 429
                self._inbox_requests -= 1
            self.scheduler.waiting.append(item)

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
        admitted = self.scheduler.admit_merged() if self.config.mode == "merged" else self.scheduler.admit()
        if self.config.mode == "auto":
            self.scheduler.auto_switch(admitted)
        self._prefilling.extend(admitted)
        self.scheduler.preempt_until_rows_fit()  # every running row can take its next token
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
                self.scheduler.auto.observe_step(time.perf_counter() - start)
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
            if not row.done:
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

    # ------------------------------------------------------------------ scheduling

    def _drop_cancelled(self) -> None:
        self.scheduler.drop_cancelled()
        for row in [*self._rows, *self._prefilling]:
            if row.request.cancelled.is_set() and not row.done:
                row.finish()
                row.request.emit(ErrorEvent("request cancelled", "cancelled"))
        self._remove_finished()

    def _start_sequence(self, row: Row, first: bool) -> None:
        """Create the row's sequence in the runner's KV memory, holding the longest cached prefix
        of what it prefills; the rest is prefilled from there. A row that wants its prompt's
        log-probabilities reuses nothing (they come from one pass over the whole prompt) but its
        blocks are cached for others."""
        if not self.prefix_cache:
            return
        reuse = () if row.wants_prompt_scores else row.prefill_ids
        row.prefilled = self.runner.start_sequence(row.seq_id, prefix_identity(row.request), reuse)
        if first:
            row.cached_tokens = min(row.prefilled, len(row.request.prompt_ids))

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
        row = self.scheduler.preempted.pop(request.request_id, None)
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
        row.prefill_ids = recompute_ids(request, row)
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
            whole = not chunked or row.wants_prompt_scores
            take = remaining if whole else min(remaining, budget - total)
            if take <= 0 or (chunks and whole and total + take > budget):
                break
            if not self.runner.can_grow({**growth, row.seq_id: take}):
                break  # KV memory is short: rows finishing or preemption will make room
            chunks.append((row, take))
            growth[row.seq_id] = take
            total += take
        if not chunks and not self._rows and len(self._prefilling) > 1:
            self.scheduler.preempt(self._prefilling[-1])  # prefilling rows hold each other's room
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
                want_token_logprobs=row.wants_prompt_scores,
                top_n=_VOCAB_ALL if row.request.want_prompt_distributions else row.request.prompt_top_n,
            )
            for (row, take), slot in zip(chunks, self._slots_for(rows), strict=True)
        ]

    def _fail_prefilling(self, rows: list[Row], exc: Exception) -> None:
        """A failed step: rows being prefilled are not in the batch yet (``_fail_all`` would not
        reach them): fail and release them here."""
        for row in rows:
            row.finish()
            row.request.emit(ErrorEvent(f"generation failed: {exc}", "generation"))
            self._release(row)
        self.runner.release(r.seq_id for r in rows)
        self._prefilling = [r for r in self._prefilling if not r.done]

    def _prefilled(self, chunks: list[tuple[Row, int]], output: StepOutput) -> None:
        """Prompt chunks are in KV memory: rows whose prompt is complete choose their first token
        and join the running batch (they decode from the next step on)."""
        done: list[int] = []
        for i, (row, take) in enumerate(chunks):
            if row.wants_prompt_scores:  # asked for: the whole prompt was prefilled at once
                row.prompt = self._prompt_scores(row, output)
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

    def _prompt_scores(self, row: Row, output: StepOutput) -> PromptScores:
        """The prompt's log-probabilities from the prefill that scored it (``want_token_logprobs``),
        with its most likely tokens (``prompt_top_n``) or whole distributions when asked."""
        values = output.token_logprobs.get(row.seq_id)
        logprobs = [] if values is None else values.float().tolist()
        top = output.token_top.get(row.seq_id)  # ([n-1, k], [n-1, k])
        if top is None:
            return PromptScores(logprobs)
        if row.request.want_prompt_distributions:  # k = V: put back in id order
            return PromptScores(
                logprobs, distributions=torch.empty_like(top[0]).scatter_(1, top[1], top[0]).cpu()
            )
        top_tokens = [
            tuple(self.output.top_token(i, lp) for i, lp in zip(ids, lps, strict=True))
            for lps, ids in zip(top[0].tolist(), top[1].tolist(), strict=True)
        ]
        return PromptScores(logprobs, top_tokens=top_tokens)

    def _remove_finished(self) -> None:
        """Finished rows leave the batch at once: their slots and KV memory are released."""
        finished = [r for r in (*self._rows, *self._prefilling) if r.done]
        if not finished:
            return
        for row in finished:
            self._release(row)
        self.runner.release(r.seq_id for r in finished)
        self._rows = [r for r in self._rows if not r.done]
        self._prefilling = [r for r in self._prefilling if not r.done]

    def _release(self, row: Row) -> None:
        if row.slot != BASE_SLOT and row.request.adapter is not None:
            self.slots.release(row.request.adapter.key)

    def _fail_all(self, message: str) -> None:
        rows = [*self._rows, *self._prefilling]
        for row in rows:
            if not row.done:
                row.finish()
                row.request.emit(ErrorEvent(message, "generation"))
            self._release(row)
        self.runner.release(r.seq_id for r in rows)
        self._rows, self._prefilling = [], []


_VOCAB_ALL = 1 << 30  # a top_n above any vocabulary: the runner returns every token (min(top_n, V))


def _token_ids(value: Any) -> frozenset[int]:
    """An ``eos_token_id`` setting (an int, a list of ints or None) as a set."""
    if isinstance(value, int):
        return frozenset({value})
    if isinstance(value, (list, tuple)):
        return frozenset(int(v) for v in value)
    return frozenset()
