"""Graph-captured decode for the native runner (``--compile auto|on|off``).

A decode step is ``LlamaModel.decode_logits``: a pure function of tensors. This module runs it
in one of three ways:

* ``eager``: not used here; the runner keeps its own tuned eager step (``LlamaModel.forward``).
* ``compile`` (CPU, ``--compile on``): ``torch.compile(dynamic=True)``. Shapes are symbolic, so a
  graph serves every batch size and context length; rows are padded to at least 2 and the block
  table to at least 2 blocks, because dynamo specialises sizes 0 and 1 (a third graph otherwise).
  Compiled at start-up for base-only steps and for steps with adapters on every projection part.
* ``cuda_graphs`` (CUDA, ``--compile auto`` or ``on``): one captured CUDA graph per (batch bucket,
  context bucket, adapter layout). Rows are padded to the batch bucket (1→2, 3→4, … powers of two
  up to ``max_batch``) and the block table to a power-of-two number of blocks; the step's inputs
  are copied into the graph's static tensors and the graph is replayed. Base-only graphs are
  captured at start-up for every bucket pair; a graph with adapters is captured the first time a
  bucket pair meets a layout (which parts are adapted, and the slot stacks' storage), and
  re-captured when a bank's slot stacks grow (their storage moves). LoRA inside a graph uses the
  gathered (BGMV) form: every tensor it reads keeps its address while slot contents change.

Padding rows read token 0 at position 0, write their K/V into the KV memory's scratch block and
attend to that one position; their logits are dropped. They are base rows (slot -1).

Measured on the embedded model (2-core CPU, float32, same run, ``bench/results/efficiency-cpu.md``):
the compiled step is no faster than the eager one at batch 16 (128-135 vs 126-127 ms) and 64
(243 vs 251-340 ms, noisy), and slower at batch 1 (90-96 vs 52-60 ms: guards over ~700 tensor
inputs per call); matmuls are most of a step and inductor calls the same BLAS. Compiling the two
graphs took 5 to 18 minutes on two cores. So ``auto`` leaves the CPU eager; ``on`` exists to
measure it and for a CPU with cores to spare.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch.fx.experimental import _config as fx_config

from server.engine.lora import BASE_SLOT, LoraBackend
from server.engine.lora.gathered import GatheredBackend
from server.engine.lora.segmented import SegmentedBackend, SegmentedLora
from server.engine.native.kv_cache import PagedKVCache
from server.engine.native.model import LlamaModel, StepLora

log = logging.getLogger(__name__)

CompileMode = Literal["auto", "on", "off"]
DecodeKind = Literal["eager", "compile", "cuda_graphs"]
SAMPLE_RANK = 16  # rank of the stand-in adapters that compile the LoRA graph at start-up


def decode_kind(mode: CompileMode, device: torch.device) -> DecodeKind:
    """``auto``: CUDA graphs on CUDA, eager on the CPU (compiling does not pay there; see above)."""
    if mode == "off":
        return "eager"
    if device.type == "cuda":
        return "cuda_graphs"
    return "compile" if mode == "on" else "eager"


def power_of_two_bucket(n: int, limit: int) -> int:
    """The smallest power of two >= max(n, 2), but no more than max(limit, 2) (the last bucket)."""
    bucket = 2
    while bucket < n:
        bucket *= 2
    return min(bucket, max(limit, 2, n))


@dataclass
class StepRows:
    """One decode step's rows, padded to ``size`` rows and ``width`` blocks (lists: built on the host)."""

    tokens: list[int]
    positions: list[int]
    write_blocks: list[int]
    write_offsets: list[int]
    tables: list[list[int]]  # [size][width]
    lengths: list[int]  # tokens in cache per row, the new one included
    slots: list[int]
    scales: list[float]

    @classmethod
    def padded(
        cls,
        real: StepRows,
        size: int,
        width: int,
        scratch_block: int,
    ) -> StepRows:
        pad = size - len(real.tokens)
        return cls(
            tokens=real.tokens + [0] * pad,
            positions=real.positions + [0] * pad,
            write_blocks=real.write_blocks + [scratch_block] * pad,
            write_offsets=real.write_offsets + [0] * pad,
            tables=[t + [scratch_block] * (width - len(t)) for t in real.tables]
            + [[scratch_block] * width] * pad,
            lengths=real.lengths + [1] * pad,
            slots=real.slots + [BASE_SLOT] * pad,
            scales=real.scales + [1.0] * pad,
        )


@dataclass
class StepTensors:
    """The tensor inputs of ``decode_logits`` (a graph's static inputs when captured)."""

    tokens: torch.Tensor  # [B]
    positions: torch.Tensor  # [B]
    write_blocks: torch.Tensor  # [B]
    write_offsets: torch.Tensor  # [B]
    block_table: torch.Tensor  # [B, nb]
    attend: torch.Tensor  # [B, 1, 1, nb * block]
    row_slots: torch.Tensor  # [B]
    row_scale: torch.Tensor  # [B]

    @classmethod
    def build(cls, rows: StepRows, block_size: int, device: torch.device) -> StepTensors:
        def long(values: Sequence) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        lengths = long(rows.lengths)
        width = len(rows.tables[0]) * block_size
        attend = torch.arange(width, device=device)[None, :] < lengths[:, None]  # [B, T]
        return cls(
            long(rows.tokens),
            long(rows.positions),
            long(rows.write_blocks),
            long(rows.write_offsets),
            long(rows.tables),
            attend[:, None, None, :],
            long(rows.slots),
            torch.tensor(rows.scales, dtype=torch.float32, device=device),
        )

    def copy_from(self, other: StepTensors) -> None:
        for name in self.__dataclass_fields__:
            getattr(self, name).copy_(getattr(other, name))

    def model_args(self, kv: PagedKVCache) -> tuple[torch.Tensor | list[torch.Tensor], ...]:
        """``decode_logits``' tensor arguments, in order (the adapters come after)."""
        return (
            self.tokens, self.positions, self.write_blocks, self.write_offsets, self.block_table, self.attend,
            kv.k_pool, kv.v_pool, self.row_slots, self.row_scale,
        )  # fmt: skip


class ReplayedEagerly:
    """What a CUDA graph does on replay (run the captured step on its static inputs, results into
    the same output tensor), done eagerly: lets the CPU tests check the bucketing, the static-input
    copies and the re-capture rules that the CUDA path relies on."""

    def __init__(self, step: Callable[[], torch.Tensor], out: torch.Tensor) -> None:
        self.step, self.out = step, out

    def replay(self) -> None:
        self.out.copy_(self.step())


@dataclass
class CapturedStep:
    graph: torch.cuda.CUDAGraph | ReplayedEagerly
    inputs: StepTensors
    logits: torch.Tensor  # [B, V], written by every replay
    storage: tuple[int, ...]  # the slot stacks' addresses the graph reads (empty: base only)


def graph_lora_form(
    kind: DecodeKind, backend: LoraBackend | None, device: torch.device, dtype: torch.dtype
) -> LoraBackend:
    """The LoRA backend whose ``step_part`` feeds the graphs: ``compile``: segmented (its shapes
    follow the batch's adapters, which dynamic shapes take); ``cuda_graphs``: the runner's backend
    when it is ``graph_safe``, else gathered (every tensor keeps its address)."""
    if kind == "compile":
        return backend if isinstance(backend, SegmentedBackend) else SegmentedBackend(device, dtype)
    return backend if backend is not None and backend.graph_safe else GatheredBackend(device, dtype)


class GraphedDecode:
    """Runs decode steps compiled (CPU) or as captured CUDA graphs; see the module docstring."""

    def __init__(
        self,
        model: LlamaModel,
        kv: PagedKVCache,
        kind: DecodeKind,
        max_batch: int,
        max_blocks: int,
        lora_backend: LoraBackend | None = None,
    ) -> None:
        """``lora_backend``: the runner's; a captured graph uses it where it is ``graph_safe``."""
        assert kind in ("compile", "cuda_graphs")
        self.model, self.kv, self.kind = model, kv, kind
        self.lora_form = graph_lora_form(kind, lora_backend, model.device, model.dtype)
        self.max_batch, self.max_blocks = max_batch, max_blocks
        self.device = kv.k_pool[0].device
        self.warm_up_seconds = 0.0
        self.captures = 0  # graphs compiled or captured so far
        self._compiled: Callable[..., torch.Tensor] | None = None
        self._graphs: dict[tuple, CapturedStep] = {}
        self._pool = None

    # ------------------------------------------------------------------ shapes

    def batch_bucket(self, rows: int) -> int:
        return max(rows, 2) if self.kind == "compile" else power_of_two_bucket(rows, self.max_batch)

    def width_bucket(self, blocks: int) -> int:
        return max(blocks, 2) if self.kind == "compile" else power_of_two_bucket(blocks, self.max_blocks)

    def batch_buckets(self) -> list[int]:
        return sorted({power_of_two_bucket(n, self.max_batch) for n in range(1, self.max_batch + 1)})

    def width_buckets(self) -> list[int]:
        return sorted({power_of_two_bucket(n, self.max_blocks) for n in range(1, self.max_blocks + 1)})

    # ------------------------------------------------------------------ running a step

    @torch.inference_mode()
    def run(self, real: StepRows) -> torch.Tensor:
        """The rows' logits [n, V]."""
        n = len(real.tokens)
        width = self.width_bucket(max(len(t) for t in real.tables))
        rows = StepRows.padded(real, self.batch_bucket(n), width, self.kv.scratch_block)
        ctx = self.model.ctx
        ctx.set_rows(rows.slots, self.device, rows.scales)
        tensors = StepTensors.build(rows, self.kv.block_size, self.device)
        if self.kind == "compile":
            return self._compiled_step(tensors, self.model.step_lora(self.lora_form))[:n]
        return self._replay(tensors)[:n]

    def _compiled_step(self, tensors: StepTensors, lora: StepLora) -> torch.Tensor:
        if self._compiled is None:
            self._compiled = torch.compile(self.model.decode_logits, dynamic=True)
        # No duck shaping: sizes that happen to be equal when traced (2 rows, 2 blocks, a rank-2
        # stand-in part) must stay separate symbols, or a later step that differs would recompile.
        with fx_config.patch(use_duck_shape=False):
            return self._compiled(*tensors.model_args(self.kv), lora)

    def _replay(self, tensors: StepTensors) -> torch.Tensor:
        ctx = self.model.ctx
        banks = [bank for projection in self.model.projections() for bank in projection.banks.values()]
        applies = tuple(bank.applies_to(ctx) for bank in banks) if ctx.row_slots is not None else ()
        storage = tuple(
            t.data_ptr()
            for bank, adapted in zip(banks, applies, strict=False)
            if adapted
            for t in (bank.A_stack, bank.B_stack, bank.scale)
        )
        key = (tensors.tokens.shape[0], tensors.block_table.shape[1], applies)
        step = self._graphs.get(key)
        if step is None or step.storage != storage:  # new, or a slot stack grew (its storage moved)
            step = self._capture(tensors, lora=bool(applies))
            step.storage = storage
            self._graphs[key] = step
        step.inputs.copy_from(tensors)
        step.graph.replay()
        return step.logits.clone()  # the next replay overwrites the graph's output

    def _capture(self, example: StepTensors, lora: bool) -> CapturedStep:
        """Capture ``decode_logits`` on static copies of ``example``'s tensors (CUDA only)."""
        started = time.perf_counter()
        inputs = StepTensors(
            *(t.clone() for t in (getattr(example, f) for f in example.__dataclass_fields__))
        )
        step_lora = self.model.step_lora(self.lora_form) if lora else None

        def step() -> torch.Tensor:
            return self.model.decode_logits(*inputs.model_args(self.kv), step_lora)

        if self.device.type != "cuda":  # the tests' stand-in: same static inputs and bindings, eager
            logits = step()
            self.captures += 1
            return CapturedStep(ReplayedEagerly(step, logits), inputs, logits, ())
        # Warm-up on a side stream (allocator and library handles), then capture. Both write the
        # example rows' K/V again, with the same values: the capture leaves the cache as it found it.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (uploads, the event loop) may touch CUDA while this captures
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits = step()
        self.captures += 1
        log.debug(
            "captured decode graph: batch %d, %d blocks, lora=%s in %.2f s",
            example.tokens.shape[0], example.block_table.shape[1], lora, time.perf_counter() - started,
        )  # fmt: skip
        return CapturedStep(graph, inputs, logits, ())

    # ------------------------------------------------------------------ start-up

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Compile (CPU) or capture (CUDA) the start-up graphs; returns the seconds it took."""
        started = time.perf_counter()
        scratch = self.kv.scratch_block
        self.model.ctx.set_rows([BASE_SLOT, BASE_SLOT], self.device)
        if self.kind == "compile":
            idle = self._idle_rows(2, 2, scratch)
            self._compiled_step(idle, None)
            self.captures += 1
            self._compiled_step(idle, self._sample_lora())
            self.captures += 1
        else:
            for batch in self.batch_buckets():
                for width in self.width_buckets():
                    self._replay(self._idle_rows(batch, width, scratch))
        self.model.ctx.invalidate()
        self.warm_up_seconds = time.perf_counter() - started
        log.info(
            "native runner: %s decode ready, %d graphs in %.1f s",
            "compiled" if self.kind == "compile" else "CUDA-graph", self.captures, self.warm_up_seconds,
        )  # fmt: skip
        return self.warm_up_seconds

    def _idle_rows(self, batch: int, width: int, scratch: int) -> StepTensors:
        empty = StepRows([], [], [], [], [], [], [], [])
        return StepTensors.build(
            StepRows.padded(empty, batch, width, scratch), self.kv.block_size, self.device
        )

    def _sample_lora(self) -> StepLora:
        """Zero adapters of rank ``SAMPLE_RANK`` on every part: a stand-in with the shapes of a real
        batch of all-linear adapters (sizes are symbolic, so one graph serves every real batch)."""
        dtype = self.model.dtype

        def part(in_features: int, out_features: int) -> SegmentedLora:
            zeros = torch.zeros
            return SegmentedLora(
                zeros(in_features, SAMPLE_RANK, dtype=dtype, device=self.device),
                zeros(SAMPLE_RANK, out_features, dtype=dtype, device=self.device),
                torch.full((SAMPLE_RANK,), BASE_SLOT - 1, device=self.device),  # no row's slot
            )

        return tuple(
            tuple(part(bank.in_features, bank.out_features) for bank in projection.banks.values())
            for projection in self.model.projections()
        )
