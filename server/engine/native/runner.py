"""NativeLlamaRunner: the model families of ``families/`` (Llama, Mistral, Qwen2) on loraplex's own
model code and paged KV memory. One generic runner: a family brings its config reading, its
checkpoint's names and its model class; everything here is the same for all of them."""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import torch

from server.engine import gemv_cpu
from server.engine.decode_threads import DecodeThreads
from server.engine.lora import LoraBatchContext, choose_backend
from server.engine.native import onednn, quant_cpu
from server.engine.native.families import family_for
from server.engine.native.graphed import CompileMode, GraphedDecode, StepRows, StepTensors, decode_kind
from server.engine.native.kv_cache import PagedKVCache
from server.engine.native.layouts import BlockedLayout, OneDnnLayout, PackedLayout
from server.engine.native.model import AttentionPlan, Checkpoint, LlamaModel, ReadCheckpoint
from server.engine.native.quantized import QUANTIZATIONS, Quantization
from server.engine.runner import (
    DecodeInput,
    KvUsage,
    LoraTarget,
    ModelRunner,
    PrefillInput,
    PrefillOutput,
    PrefixCacheStats,
    PrefixHit,
    StepOutput,
    StepRow,
    WeightTarget,
    prompt_logprobs,
)

log = logging.getLogger(__name__)

BLOCK_SIZE = 16
DEFAULT_CPU_KV_BYTES = 384 << 20  # keeps the embedded model's server under ~1.6 GB RSS
DEFAULT_GPU_KV_FRACTION = 0.9  # of the GPU memory free after the weights

# A verify step of up to this many tokens (and ``gemv_cpu.ONE_THREAD_ROWS`` rows) is a small step
# like a small decode step (``_threads_for``): PyTorch's ops on the engine thread alone, the kernels
# on the count ``decode_threads`` chooses for its tokens. On the loaded 2-core machine a batch-1
# step of the embedded model with 5 tokens took 144-308 ms on one thread against 1.7-3.8 s with
# PyTorch's ops on two (a parallel region waiting at its barrier for a descheduled thread; one
# decode token: 92-140 ms).
VERIFY_ONE_THREAD_TOKENS = 8

WeightLayout = Literal["auto", "blocked", "packed", "dense"]
ResolvedLayout = Literal["blocked", "packed", "dense", "quantized"]


def _return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; elsewhere nothing): loading
    quantized weights frees far more float32 temporaries than it keeps (measured: the embedded
    model's int4 RSS once loaded went from about the float32 model's down to int8's)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class NativeLlamaRunner(ModelRunner):
    """Fused q/k/v and gate/up projections, paged KV memory, chunked prefill, per-token adapters."""

    name = "native"
    supports_chunked_prefill = True
    supports_prefix_cache = True
    supports_speculation = True

    def __init__(
        self,
        model_dir: Path,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        lora_backend: str = "auto",
        kv_cache_tokens: int | None = None,
        kv_cache_bytes: int | None = None,
        max_batch: int = 32,
        max_seq_len: int = 4096,
        block_size: int = BLOCK_SIZE,
        compile: CompileMode = "auto",
        weight_layout: WeightLayout = "auto",
        quantization: Quantization = "none",
        gguf_file: Path | None = None,
    ) -> None:
        """KV memory: ``kv_cache_tokens`` if given, else ``kv_cache_bytes``, else a default budget
        (384 MiB on the CPU, 90% of the free GPU memory on CUDA); never more than
        ``max_batch`` x ``max_seq_len`` tokens, since no more can be in use at once.

        ``compile``: how decode steps run (``graphed.py``): ``auto`` captures CUDA graphs on CUDA
        and stays eager on the CPU, ``on`` also compiles on the CPU, ``off`` is always eager.

        ``weight_layout`` (``layouts.py``): ``blocked`` keeps the projections and the LM head in the
        compiled linear kernel's blocks (``gemv_cpu.py``: streams the weights near the memory
        bandwidth at decode sizes), ``packed`` in oneDNN's packed layout (``onednn.py``), ``dense``
        as plain matrices; on the CPU, in float32, with eager decoding, ``auto`` picks blocked
        where the kernel builds, else packed where oneDNN is available, else dense.

        ``quantization`` (``quantized.py``): int8 / int4 quantize the projections at load time;
        gguf keeps ``gguf_file``'s blocks (``gguf_blocks.py``). Quantized weights need the CPU,
        float32 and eager decoding; adapters on them run unmerged. They run their own kernels:
        ``blocked`` and ``packed`` (float32 layouts) are refused with them."""
        self.device = torch.device(device)
        self.dtype = dtype
        self.ctx = LoraBatchContext()
        # small decode steps' kernel threads: LORAPLEX_DECODE_THREADS, auto by default (timed)
        self.decode_threads = DecodeThreads.from_env(torch.get_num_threads())
        self.lora_backend = choose_backend(lora_backend, self.device, dtype)  # server/engine/lora/
        self.decode_kind = decode_kind(compile, self.device)
        self.quantization = self._check_quantization(quantization, weight_layout)
        self.can_merge = quantization == "none"
        self.weight_layout: ResolvedLayout
        layout: PackedLayout | None = None
        if quantization != "none":
            self.weight_layout = "quantized"
        else:
            self.weight_layout, layout = self._weight_layout(weight_layout)
        raw_config = json.loads((Path(model_dir) / "config.json").read_text())
        family = family_for(raw_config)
        config = family.read_config(raw_config)
        blocks = None
        if quantization == "gguf":
            from server.engine.native.gguf_blocks import read_projection_blocks

            if gguf_file is None:
                raise ValueError(
                    "--quantization gguf needs a GGUF file (the embedded model's, or one in --model)"
                )
            blocks = read_projection_blocks(gguf_file, config)
        self.family = family
        self.model: LlamaModel = family.model(
            config, (ReadCheckpoint if quantization != "none" else Checkpoint)(Path(model_dir)), dtype, self.device,
            self.ctx, self.lora_backend,
            layout=layout, quantization=quantization, blocks=blocks, names=family.names,
        )  # fmt: skip
        del blocks
        if quantization != "none":
            _return_freed_memory()  # quantizing left freed float temporaries in the heap
        self.config = config
        self.vocab_size = config.vocab_size
        limits = [p for p in (config.max_positions, config.sliding_window) if p]
        self.max_positions = min(limits) if limits else None  # Mistral: full attention within its window
        per_token = PagedKVCache.bytes_per_token(
            config.num_layers, config.num_kv_heads, config.head_dim, dtype
        )
        tokens = kv_cache_tokens or self._default_tokens(kv_cache_bytes, per_token, block_size)
        tokens = min(tokens, max_batch * max_seq_len)
        self.kv = PagedKVCache(
            num_layers=config.num_layers,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            num_blocks=max(1, tokens // block_size),
            block_size=block_size,
            dtype=dtype,
            device=self.device,
        )
        log.info(
            "native runner: %s, KV memory %d tokens (%.0f MiB) in blocks of %d",
            config.model_type, self.kv.capacity_tokens, self.kv.bytes_reserved / 2**20, block_size,
        )  # fmt: skip
        self.graphs: GraphedDecode | None = None
        if self.decode_kind != "eager":
            max_blocks = self.kv.blocks_for(min(max_seq_len, self.kv.capacity_tokens))
            self.graphs = GraphedDecode(
                self.model, self.kv, self.decode_kind, max_batch, max_blocks, self.lora_backend
            )
            self.graphs.warm_up()
        self._drafts: dict[int, list[int]] = {}  # verify rows' drafts until commit, by sequence
        self._lora_targets: dict[str, LoraTarget] = {}
        self._weight_targets: dict[str, WeightTarget] = {}
        self._eager_slots: set[int] = set()
        self.vocab = self.model.vocab
        for projection in self.model.projections():
            self._lora_targets.update(projection.banks)
            self._weight_targets.update(projection.weight_targets())

    def _check_quantization(self, quantization: Quantization, layout: WeightLayout) -> Quantization:
        if quantization not in QUANTIZATIONS:
            raise ValueError(
                f"unknown quantization {quantization!r}: choose one of {', '.join(QUANTIZATIONS)}"
            )
        if quantization == "none":
            return quantization
        if self.device.type != "cpu" or self.dtype != torch.float32 or self.decode_kind != "eager":
            raise ValueError(
                f"--quantization {quantization} runs on the CPU kernels: it needs --device cpu, "
                "--dtype float32 (or auto) and eager decoding (--compile off or auto)"
            )
        if layout in ("blocked", "packed"):
            raise ValueError(
                f"--weight-layout {layout} keeps float32 weights: it cannot be used with --quantization {quantization}"
            )
        return quantization

    @property
    def quant_dot(self) -> str:
        """With a quantization: the quantized kernels' dot products now (``quant_cpu.describe``:
        ``int (vnni)``, ``int (avx2)`` or ``float``); "" without."""
        return "" if self.quantization == "none" else quant_cpu.describe()

    def _weight_layout(
        self, wanted: WeightLayout
    ) -> tuple[Literal["blocked", "packed", "dense"], PackedLayout | None]:
        """The layout's name and its packing (None: dense). Packed layouts need the CPU, float32,
        eager decoding (compiled graphs and CUDA graphs read dense matrices), and their kernel:
        the compiled one built here (blocked), oneDNN's ops in this PyTorch build (packed)."""
        fits = self.device.type == "cpu" and self.dtype == torch.float32 and self.decode_kind == "eager"
        if wanted == "dense" or (wanted == "auto" and not fits):
            return "dense", None
        if not fits:
            raise ValueError(
                f"{wanted} weights need --device cpu, float32 and eager decoding (--compile off/auto)"
            )
        kernel = gemv_cpu.load() if wanted in ("auto", "blocked") else None
        if kernel is not None:
            return "blocked", BlockedLayout(kernel)
        if wanted == "blocked":
            raise ValueError(
                "blocked weights need the compiled linear kernel, which cannot be built here (a C "
                "compiler, AVX2/FMA): use --weight-layout packed or dense"
            )
        if onednn.available():
            return "packed", OneDnnLayout()
        if wanted == "packed":
            raise ValueError("packed weights need oneDNN's linear ops, which this PyTorch build lacks")
        return "dense", None

    def _default_tokens(self, budget: int | None, per_token: int, block_size: int) -> int:
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * DEFAULT_GPU_KV_FRACTION)
            else:
                budget = DEFAULT_CPU_KV_BYTES
        # less one block: the scratch block of padding rows (kv_cache.py) counts in the budget too
        return max(budget // per_token - block_size, block_size)

    # ------------------------------------------------------------------ seam: targets, memory

    def slots_changed(self) -> None:
        self.ctx.invalidate()
        # graph steps have no form of DoRA's magnitude term nor of an adapter's own embedding or
        # head: steps with such rows run eagerly
        dora = {s for projection in self.model.projections() for s in projection.lora.dora_slots}
        self._eager_slots = dora | self.vocab.slots

    def kv_usage(self) -> KvUsage:
        return KvUsage(self.kv.used_tokens, self.kv.capacity_tokens, self.kv.bytes_reserved)

    def can_admit(self, num_tokens: int, num_sequences: int = 1) -> bool:
        return self.kv.can_admit(num_tokens, num_sequences)

    def can_decode(self, seq_ids: Sequence[int]) -> bool:
        return self.kv.can_grow(list(seq_ids))

    def can_grow(self, growth: dict[int, int]) -> bool:  # type: ignore[override]
        return self.kv.can_grow_by(dict(growth))

    def release(self, seq_ids: Iterable[int]) -> None:
        for seq_id in seq_ids:
            self.kv.release(seq_id)
            self._drafts.pop(seq_id, None)

    def commit(self, seq_id: int, accepted: int) -> None:
        """Keep a verify row's first ``accepted`` drafts: they are recorded (their full blocks may
        be shared from now on) and the rejected ones' places given back (``PagedKVCache.truncate``)."""
        drafts = self._drafts.pop(seq_id)
        if not 0 <= accepted <= len(drafts):
            raise ValueError(f"sequence {seq_id}: {accepted} of {len(drafts)} drafts accepted")
        self.kv.record(seq_id, drafts[:accepted])
        self.kv.truncate(seq_id, self.kv.sequences[seq_id].length - (len(drafts) - accepted))

    def cached_prefix(self, identity: str, token_ids: Sequence[int]) -> PrefixHit:
        return self.kv.cached_prefix(identity, token_ids)

    def start_sequence(self, seq_id: int, identity: str | None, token_ids: Sequence[int] = ()) -> int:
        return self.kv.start(seq_id, identity, token_ids)

    def prefix_cache_stats(self) -> PrefixCacheStats:
        return self.kv.prefix_stats()

    # ------------------------------------------------------------------ forward passes

    def prefill(self, inputs: Sequence[PrefillInput], last: Sequence[int] | None = None) -> PrefillOutput:
        """Pack every input's tokens into one pass; each chunk attends to its sequence's cache.
        ``last[i]``: logits of input i's last ``last[i]`` tokens (default 1), inputs in order."""
        tokens: list[int] = []
        positions: list[int] = []
        blocks: list[int] = []
        offsets: list[int] = []
        token_slots: list[int] = []
        token_scales: list[float] = []
        chunks: list[tuple[int, int, torch.Tensor]] = []
        for item in inputs:
            known = self.kv.sequences.get(item.seq_id)
            if (known.length if known is not None else 0) != item.start:
                raise ValueError(
                    f"sequence {item.seq_id}: chunk starts at {item.start}, cache holds {known.length if known else 0}"
                )
            count = len(item.token_ids)
            new_blocks, new_offsets = self.kv.extend(item.seq_id, count)
            tokens.extend(item.token_ids)
            positions.extend(range(item.start, item.start + count))
            blocks.extend(new_blocks)
            offsets.extend(new_offsets)
            token_slots.extend([item.slot] * count)
            token_scales.extend([item.scale] * count)
            table = torch.tensor(self.kv.sequences[item.seq_id].blocks, dtype=torch.long, device=self.device)
            chunks.append((item.start, count, table))
        plan = AttentionPlan(
            write_blocks=torch.tensor(blocks, dtype=torch.long, device=self.device),
            write_offsets=torch.tensor(offsets, dtype=torch.long, device=self.device),
            decode=False,
            chunks=chunks,
        )
        hidden = self._forward(tokens, positions, token_slots, plan, token_scales)  # [N, H]
        for item in inputs:  # their K and V are written: full blocks may now be shared
            self.kv.record(item.seq_id, item.token_ids)
        wanted: list[int] = []  # hidden rows whose logits are returned: each input's last ``last[i]``
        wanted_slots: list[int] = []
        wanted_scales: list[float] = []
        end = 0
        for i, (item, (_, count, _)) in enumerate(zip(inputs, chunks, strict=True)):
            end += count
            n = last[i] if last else 1
            wanted.extend(range(end - n, end))
            wanted_slots += [item.slot] * n
            wanted_scales += [item.scale] * n
        ends = torch.tensor(wanted, device=self.device)
        output = PrefillOutput(
            logits=self.model.logits(hidden.index_select(0, ends), wanted_slots, wanted_scales)
        )
        first = 0
        for item, (_, count, _) in zip(inputs, chunks, strict=True):
            if item.want_token_logprobs:  # position j of the chunk predicts token j + 1
                chunk = hidden[first : first + count - 1]  # [count - 1, H]
                logits = self.model.logits(chunk, [item.slot] * (count - 1), [item.scale] * (count - 1))
                prompt_logprobs(output, item, logits, item.token_ids)
            first += count
        return output

    def step(self, rows: Sequence[StepRow]) -> StepOutput:
        """Prompt chunks in one packed forward; decode rows in the decode path (sorted by slot,
        captured graphs), or, when the plan has verify rows, decode and verify rows in one forward
        whose rows may carry several tokens (``_verify``)."""
        verifying = any(r.drafts for r in rows)
        short = [i for i, r in enumerate(rows) if self._short(r, verifying)]
        chunks = [i for i in range(len(rows)) if i not in set(short)]
        parts: list[tuple[Sequence[int], torch.Tensor]] = []
        extra = None
        if chunks:
            extra = self.prefill([rows[i].as_prefill() for i in chunks], [rows[i].logits for i in chunks])
            parts.append((chunks, extra.logits))
        if short and verifying:
            parts.append((short, self._verify([rows[i] for i in short])))
        elif short:
            inputs = [
                DecodeInput(rows[i].seq_id, rows[i].token_ids[0], rows[i].slot, rows[i].scale) for i in short
            ]
            parts.append((short, self.decode(inputs)))
        output = StepOutput.join(rows, parts)
        if extra is not None:
            output.token_logprobs, output.token_top = extra.token_logprobs, extra.token_top
        return output

    def _short(self, row: StepRow, verifying: bool) -> bool:
        """A decode row (one token of a running sequence), or in a verify plan a verify row."""
        if not row.decoding or row.logits != len(row.token_ids):
            return False
        if row.seq_id not in self.kv.sequences or self.kv.sequences[row.seq_id].length != row.start:
            return False
        return len(row.token_ids) == 1 or (verifying and row.drafts > 0)

    def _verify(self, rows: Sequence[StepRow]) -> torch.Tensor:
        """Rows of one or more tokens (the last sampled token, then drafts), each attending to its
        own sequence in one batched attention (queries padded to the longest row); returns every
        new token's logits [N, V], rows in order."""
        tokens: list[int] = []
        positions: list[int] = []
        blocks: list[int] = []
        offsets: list[int] = []
        token_slots: list[int] = []
        token_scales: list[float] = []
        query_index: list[int] = []  # each token's place in the [B * Q] padded queries
        widest = max(len(r.token_ids) for r in rows)
        for b, row in enumerate(rows):
            count = len(row.token_ids)
            new_blocks, new_offsets = self.kv.extend(row.seq_id, count)
            tokens.extend(row.token_ids)
            positions.extend(range(row.start, row.start + count))
            blocks += new_blocks
            offsets += new_offsets
            token_slots.extend([row.slot] * count)
            token_scales.extend([row.scale] * count)
            query_index.extend(range(b * widest, b * widest + count))
        tables = [list(self.kv.sequences[r.seq_id].blocks) for r in rows]
        width = max(len(t) for t in tables)
        table = torch.tensor(
            [t + [self.kv.scratch_block] * (width - len(t)) for t in tables],
            dtype=torch.long,
            device=self.device,
        )  # [B, nb]
        # query q of row b sees positions <= start_b + q (padding queries repeat the row's last)
        last = torch.tensor(
            [[r.start + min(q, len(r.token_ids) - 1) for q in range(widest)] for r in rows],
            device=self.device,
        )  # [B, Q]
        attend = (
            torch.arange(width * self.kv.block_size, device=self.device)[None, None, :] <= last[:, :, None]
        )
        plan = AttentionPlan(
            write_blocks=torch.tensor(blocks, dtype=torch.long, device=self.device),
            write_offsets=torch.tensor(offsets, dtype=torch.long, device=self.device),
            decode=True,
            block_table=table,
            attend=attend[:, None],  # [B, 1, Q, T]
            query_index=torch.tensor(query_index, dtype=torch.long, device=self.device),
        )
        with self._threads_for(len(rows), len(tokens)):
            hidden = self._forward(tokens, positions, token_slots, plan, token_scales)  # [N, H]
            logits = self.model.logits(hidden, token_slots, token_scales)  # [N, V]
        for row in rows:  # K and V written; the drafts are recorded once accepted (commit)
            committed = len(row.token_ids) - row.drafts
            self.kv.record(row.seq_id, row.token_ids[:committed])
            if row.drafts:
                self._drafts[row.seq_id] = list(row.token_ids[committed:])
        return logits

    def decode(self, inputs: Sequence[DecodeInput]) -> torch.Tensor:
        with self._threads_for(len(inputs)):
            return self._decode_in_order(inputs)

    @contextlib.contextmanager
    def _threads_for(self, rows: int, tokens: int | None = None) -> Iterator[None]:
        """Blocked or quantized weights, a small step (up to ``gemv_cpu.ONE_THREAD_ROWS`` rows,
        a verify step's up to ``VERIFY_ONE_THREAD_TOKENS`` ``tokens`` in all): PyTorch's ops of
        the step on the engine thread alone, the compiled kernels on ``decode_threads``' count,
        chosen for and timed by the step's tokens (``decode_threads.py``: a verify row's 1 + k
        tokens are k + 1 rows of the kernels' products, so a 5-token verify step is timed apart
        from a 1-token decode step). The weights' stream dominates the step (``gemv_cpu.py``); its
        other ops are tiny at these sizes, and every parallel one waits at its barrier for a
        descheduled thread when the machine is loaded (a batch-1 step of the embedded model under
        load, interleaved: 66 ms median with 1 thread against 390 ms with 2). PyTorch's count is
        the calling thread's own (OpenMP), restored after the step, and so is the kernels'."""
        tokens = rows if tokens is None else tokens
        small = rows <= gemv_cpu.ONE_THREAD_ROWS and tokens <= VERIFY_ONE_THREAD_TOKENS
        if self.weight_layout not in ("blocked", "quantized") or not small:
            yield
            return
        threads, kernels = torch.get_num_threads(), gemv_cpu.SMALL_STEP_THREADS
        torch.set_num_threads(1)
        try:
            with self.decode_threads.step(tokens) as chosen:
                gemv_cpu.SMALL_STEP_THREADS = chosen
                yield
        finally:
            torch.set_num_threads(threads)
            gemv_cpu.SMALL_STEP_THREADS = kernels

    def _decode_in_order(self, inputs: Sequence[DecodeInput]) -> torch.Tensor:
        order = self._slot_order(inputs)
        if order is None:
            return self._decode(inputs)
        hidden = self._decode([inputs[i] for i in order], logits=False)  # [B, H] in slot order
        back = torch.empty(len(order), dtype=torch.long)
        back[torch.tensor(order)] = torch.arange(len(order))
        rows = ([i.slot for i in inputs], [i.scale for i in inputs])
        return self.model.logits(hidden.index_select(0, back.to(hidden.device)), *rows)

    def _slot_order(self, inputs: Sequence[DecodeInput]) -> list[int] | None:
        """The rows sorted by adapter slot (the bare base first), when an eager step reads them
        through a LoRA backend that ``wants_sorted_rows`` (grouped: each adapter's rows then lie
        side by side and it reads and writes them as views, without a gather or a scatter).
        None when the order would not change or does not matter."""
        if self.graphs is not None or not self.lora_backend.wants_sorted_rows:
            return None  # (graph steps with DoRA rows run eagerly, in the rows' order: correct too)
        slots = [i.slot for i in inputs]
        order = sorted(range(len(slots)), key=slots.__getitem__)
        return None if order == list(range(len(slots))) else order

    def _decode(self, inputs: Sequence[DecodeInput], logits: bool = True) -> torch.Tensor:
        seq_ids = [i.seq_id for i in inputs]
        positions = [self.kv.sequences[s].length for s in seq_ids]
        blocks: list[int] = []
        offsets: list[int] = []
        for seq_id in seq_ids:
            block, offset = self.kv.extend(seq_id, 1)
            blocks += block
            offsets += offset
        rows = StepRows(
            tokens=[i.token_id for i in inputs],
            positions=positions,
            write_blocks=blocks,
            write_offsets=offsets,
            tables=[list(self.kv.sequences[s].blocks) for s in seq_ids],
            lengths=[p + 1 for p in positions],
            slots=[i.slot for i in inputs],
            scales=[i.scale for i in inputs],
        )
        if self.graphs is not None and self._graph_step(rows.slots):
            logits_out = self.graphs.run(rows)
            self._record(inputs)
            return logits_out
        # eager: no padding rows; shorter block tables end in the scratch block (masked out)
        widest = max(len(t) for t in rows.tables)
        padded = StepRows.padded(rows, len(inputs), widest, self.kv.scratch_block)
        step = StepTensors.build(padded, self.kv.block_size, self.device)
        plan = AttentionPlan(
            write_blocks=step.write_blocks,
            write_offsets=step.write_offsets,
            decode=True,
            block_table=step.block_table,
            attend=step.attend,
        )
        self.ctx.set_rows(rows.slots, self.device, rows.scales)
        hidden = self.model.forward(step.tokens, step.positions, plan, self.kv)  # [B, H]
        self._record(inputs)
        return self.model.logits(hidden, rows.slots, rows.scales) if logits else hidden

    def _graph_step(self, slots: list[int]) -> bool:
        """Whether graphs may run these rows (not while a merged adapter changes the head)."""
        return self._eager_slots.isdisjoint(slots) and not self.vocab.merged_active

    def _record(self, inputs: Sequence[DecodeInput]) -> None:
        """The decoded tokens' K and V are written: a block they fill may now be shared."""
        for item in inputs:
            self.kv.record(item.seq_id, (item.token_id,))

    def _forward(
        self,
        tokens: list[int],
        positions: list[int],
        slots: list[int],
        plan: AttentionPlan,
        scales: list[float] | None = None,
    ) -> torch.Tensor:
        """Rows are tokens: ``slots[j]`` and ``scales[j]`` are token j's adapter slot and scale."""
        self.ctx.set_rows(slots, self.device, scales)
        return self.model.forward(
            torch.tensor(tokens, dtype=torch.long, device=self.device),
            torch.tensor(positions, dtype=torch.long, device=self.device),
            plan,
            self.kv,
        )
