"""The Llama-family forward pass over packed tokens, with paged KV memory and per-token adapters.

Shapes: ``N`` tokens of a step (a decode step: one per sequence), ``H`` hidden size, heads of
``D`` dimensions, ``G`` query heads per KV head (grouped-query attention).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from server.engine import gemv_cpu
from server.engine.lora import LoraBackend, LoraBatchContext
from server.engine.lora.vocab import VocabAdapters
from server.engine.native import fused_cpu, onednn, quant_cpu, quantized
from server.engine.native.config import NativeConfig
from server.engine.native.gguf_blocks import GGUF_EMBED, GGUF_HEAD
from server.engine.native.kv_cache import PagedKVCache
from server.engine.native.layers import (
    FusedLinear,
    LoraPart,
    PackedEdits,
    rms_norm,
    rope_cos_sin,
    rope_inv_freq,
    rope_rotated,
    rope_signed_sin,
    rotate_in_place,
)
from server.engine.native.layouts import BlockedLayout, OneDnnLayout, PackedLayout
from server.engine.native.quantized import Int8Weight, Q4Weight, Quantization, QuantizedWeight


@dataclass(frozen=True)
class WeightNames:
    """Where a family's checkpoint keeps each tensor (Llama's names by default). The projections'
    module names are also the PEFT module names its adapters target."""

    embed: str = "model.embed_tokens.weight"
    lm_head: str = "lm_head.weight"
    final_norm: str = "model.norm.weight"
    layer: str = "model.layers.{i}"  # every name below is under it
    input_norm: str = "input_layernorm.weight"
    post_norm: str = "post_attention_layernorm.weight"
    attention: str = "self_attn"  # the q, k, v, o projections' module
    mlp: str = "mlp"  # the gate, up, down projections' module
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


# one entry per projection, in ``LlamaModel.projections()`` order; None: no adapter in the step
StepLora = tuple[tuple[LoraPart | None, ...] | None, ...] | None


@dataclass
class Layer:
    input_norm: torch.Tensor  # [H]
    qkv: FusedLinear  # [q + 2 kv, H]
    o_proj: FusedLinear  # [H, q]
    post_norm: torch.Tensor  # [H]
    gate_up: FusedLinear  # [2 I, H]
    down: FusedLinear  # [H, I]


@dataclass
class AttentionPlan:
    """Where a step's tokens go in the KV memory and what each attends to."""

    write_blocks: torch.Tensor  # [N] block of each new token
    write_offsets: torch.Tensor  # [N] offset in that block
    decode: bool  # one token per sequence (batched attention) or prompt chunks (per sequence)
    block_table: torch.Tensor | None = None  # decode: [B, max blocks]
    attend: torch.Tensor | None = None  # decode: [B, 1, Q, T] True where query q of row b may look
    # verify rows (several tokens per row, Q the longest): token j's place in the [B * Q] padded
    # queries; None: one token per row (Q = 1)
    query_index: torch.Tensor | None = None
    chunks: list[tuple[int, int, torch.Tensor]] | None = None  # prefill: (start, count, block ids)


def _checkpoint_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{model_dir} has no *.safetensors checkpoint (the native runner reads those)"
        )
    return files


class _TensorIndex(Mapping[str, torch.Tensor]):
    """A mapping whose keys are the tensor names in ``self._where`` (set by the subclass)."""

    _where: dict[str, object]

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


class Checkpoint(_TensorIndex):
    """The tensors of a (possibly sharded) safetensors checkpoint, each read when accessed.

    Reading lazily keeps the peak memory of loading near the model's own size, instead of the
    whole checkpoint twice (the raw tensors and their fused copies).
    """

    def __init__(self, model_dir: Path) -> None:
        files = _checkpoint_files(model_dir)
        self._files = [safe_open(str(path), "pt") for path in files]
        self._where = {name: f for f in self._files for name in f.keys()}  # noqa: SIM118 - no __iter__

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)


_DTYPES = {  # safetensors dtype names
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


class ReadCheckpoint(_TensorIndex):
    """The tensors of a (possibly sharded) safetensors checkpoint, each read from the file into
    a fresh buffer when accessed (no memory map).

    For quantized loads: a memory-mapped checkpoint keeps every page it has read resident (and
    counted in RSS) until it is closed, which is the whole float checkpoint by the end of the
    load; read this way, the peak is the quantized model plus one float tensor.
    """

    def __init__(self, model_dir: Path) -> None:
        files = _checkpoint_files(model_dir)
        self._where: dict[str, tuple[Path, str, list[int], int, int]] = {}
        for path in files:
            with path.open("rb") as f:
                size = int.from_bytes(f.read(8), "little")
                if not 2 <= size <= 100 << 20:
                    raise ValueError(f"{path}: not a safetensors file (header size {size})")
                header = json.loads(f.read(size))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                start, end = info["data_offsets"]
                self._where[name] = (path, info["dtype"], list(info["shape"]), 8 + size + start, end - start)

    def __getitem__(self, name: str) -> torch.Tensor:
        path, dtype, shape, offset, nbytes = self._where[name]
        if dtype not in _DTYPES:
            raise ValueError(
                f"{path}: tensor {name} has dtype {dtype}, which the native runner does not read"
            )
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        with path.open("rb") as f:
            f.seek(offset)
            if f.readinto(buffer.numpy()) != nbytes:
                raise ValueError(f"{path}: tensor {name} is truncated")
        return buffer.view(_DTYPES[dtype]).view(shape)


class LlamaModel:
    """Weights (fused where it pays) and the forward pass. Engine thread only."""

    def __init__(
        self,
        config: NativeConfig,
        tensors: Mapping[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device,
        ctx: LoraBatchContext,
        lora_backend: LoraBackend,
        layout: PackedLayout | None = None,
        quantization: Quantization = "none",
        blocks: MutableMapping[str, QuantizedWeight] | None = None,
        names: WeightNames = WeightNames(),
    ) -> None:
        """``layout``: keep the projections in this packed layout (CPU, float32; ``layouts.py``)
        and run them and the LM head through its kernel; None: dense matrices.

        ``quantization`` int8/int4: the projections are quantized as they are read (``quantized.py``)
        and the embedding (and LM head) kept as per-row int8; gguf: the projections are ``blocks``
        (a GGUF file's, by checkpoint name; each projection's parts are taken out of it as they are
        concatenated, so the parts are freed while the model is built), and so are the embedding
        and LM head where the file's are of a supported type (``gguf_blocks.GGUF_EMBED``/
        ``GGUF_HEAD``). Quantized projections run their own kernels: the float32 layouts do not
        apply (``layout`` is ignored).

        ``names``: the checkpoint's tensor names (the model family's; ``families/``)."""
        if quantization != "none":
            layout = None
        self.config = config
        self.ctx = ctx
        self.layout = layout
        # adapters' own embedding and LM head, per row (modules_to_save, LoRA on them)
        self.vocab = VocabAdapters(
            names.embed.removesuffix(".weight"),
            names.lm_head.removesuffix(".weight"),
            config.vocab_size,
            config.hidden_size,
            torch.float32 if quantization != "none" else dtype,
            device,
        )
        c = config

        def get(name: str, copy: bool = True) -> torch.Tensor:
            # An owned copy: a tensor left backed by the checkpoint's memory map would keep the
            # whole file's pages resident (about 280 MB more RSS on the embedded model, measured).
            return tensors[name].to(device=device, dtype=dtype, copy=copy)

        def fused(prefix: str, parts: list[tuple[str, int]], bias: bool) -> FusedLinear:
            b = torch.cat([get(f"{prefix}.{p}.bias", copy=False) for p, _ in parts]) if bias else None
            names = [(f"{prefix}.{p}", n) for p, n in parts]
            if blocks is not None:  # GGUF blocks as shipped
                try:
                    weight = quantized.cat_rows([blocks.pop(f"{prefix}.{p}.weight") for p, _ in parts])
                except ValueError as error:
                    raise ValueError(
                        f"{prefix}: {error} (the GGUF file's parts of this projection disagree)"
                    ) from error
                return FusedLinear(weight, b, names, ctx, lora_backend)
            if quantization != "none":  # quantized part by part: one float matrix resident at a time
                weight = quantized.cat_rows(
                    [quantized.quantize(tensors[f"{prefix}.{p}.weight"], quantization) for p, _ in parts]
                )
                return FusedLinear(weight, b, names, ctx, lora_backend)
            if len(parts) > 1:  # cat makes the one copy
                weight = torch.cat([get(f"{prefix}.{p}.weight", copy=False) for p, _ in parts])
            else:
                weight = get(f"{prefix}.{parts[0][0]}.weight")
            return FusedLinear(weight, b, names, ctx, lora_backend, layout=layout, edits=edits)

        edits = PackedEdits(capacity=4)  # a layer's four projections: each packed once per merge pass

        # Tied checkpoints keep one copy of the shared matrix, under either name.
        embed_name = names.embed if names.embed in tensors else names.lm_head
        untied = not c.tie_word_embeddings and names.lm_head in tensors and embed_name != names.lm_head
        # int8/int4: the embedding and LM head as per-row int8 (a real-size vocabulary in float32
        # would be most of the memory); otherwise float32 [V, H]
        self.embed_q: Int8Weight | Q4Weight | None = None
        self.head_q: QuantizedWeight | None = None
        self.embed: torch.Tensor | None
        self.lm_head: torch.Tensor | None
        # blocked: the head in the kernel's layout; a tied embedding is then read from it (one copy)
        self.head_blocks: torch.Tensor | None = None
        if quantization in ("int8", "int4"):
            # from the checkpoint's dtype: quantize widens 2048 rows at a time to float32 (exactly
            # as get() would), never the whole matrix (2.1 GB for a Llama-3 vocabulary)
            self.embed_q = quantized.quantize(tensors[embed_name], "int8")
            self.head_q = quantized.quantize(tensors[names.lm_head], "int8") if untied else self.embed_q
            self.embed = self.lm_head = torch.empty(0, c.hidden_size)
        elif blocks is not None:
            # gguf: the file's embedding and head blocks where their type is supported (the same
            # values as the checkpoint's float32 matrices at a quarter of the bytes or less: the
            # embedded model's tied embedding is Q8_0), else the float32 matrices
            self.embed_q = blocks.get(GGUF_EMBED)  # type: ignore[assignment]
            self.embed = get(embed_name) if self.embed_q is None else torch.empty(0, c.hidden_size)
            if untied:
                self.head_q = blocks.get(GGUF_HEAD)
                self.lm_head = get(names.lm_head) if self.head_q is None else None
            else:
                self.head_q = self.embed_q
                self.lm_head = self.embed if self.head_q is None else None
        else:
            self.embed = get(embed_name)  # [V, H]
            self.lm_head = get(names.lm_head) if untied else self.embed  # [V, H]
            if isinstance(layout, BlockedLayout):
                self.head_blocks = layout.pack(self.lm_head)  # [ceil(V / 16), H, 16]
                self.lm_head = None
                self.embed = self.embed if untied else None
        self.final_norm = get(names.final_norm)
        self.layers: list[Layer] = []
        for i in range(c.num_layers):
            layer = names.layer.format(i=i)
            attn, mlp = f"{layer}.{names.attention}", f"{layer}.{names.mlp}"
            n = names
            self.layers.append(
                Layer(
                    input_norm=get(f"{layer}.{n.input_norm}"),
                    qkv=fused(attn, [(n.q, c.q_size), (n.k, c.kv_size), (n.v, c.kv_size)], c.qkv_bias),
                    o_proj=fused(attn, [(n.o, c.hidden_size)], False),
                    post_norm=get(f"{layer}.{n.post_norm}"),
                    gate_up=fused(mlp, [(n.gate, c.intermediate_size), (n.up, c.intermediate_size)], False),
                    down=fused(mlp, [(n.down, c.hidden_size)], False),
                )
            )
        # the compiled non-matmul layer work for small decode steps (blocked layout or quantized)
        compiled = isinstance(layout, BlockedLayout) or quantization != "none"
        self.fused = fused_cpu.load() if compiled else None
        self._layer_table: fused_cpu.LayerTable | None = None  # its addresses of the layers' tensors
        # quantized: the one-call step with the quantized kernels (None: projections from Python)
        self.fused_parts = fused_cpu.load_parts() if quantization != "none" and self.fused else None
        self._parts_tables: dict[str, fused_cpu.PartsTable] = {}  # by the quantized kernels' dot product
        self.inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling).to(device)
        self.scale = c.head_dim**-0.5
        self.dtype, self.device = dtype, device

    def projections(self) -> list[FusedLinear]:
        return [p for layer in self.layers for p in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)]

    # ------------------------------------------------------------------ forward

    @torch.inference_mode()
    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, plan: AttentionPlan, kv: PagedKVCache
    ) -> torch.Tensor:
        """tokens, positions: [N] -> final hidden states [N, H] (before the LM head)."""
        c = self.config
        x = self.embed_tokens(tokens)  # [N, H]: the residual stream, updated in place
        slots, scales = self.ctx.rows  # rows are tokens
        if self.vocab.applies(slots):
            self.vocab.embed(tokens, x, slots, scales)
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.dtype)  # [N, 1, D]
        n = tokens.shape[0]
        if self.fused is not None and self._fused_fits(plan, n):
            return self._decode_fused(self.fused, x.contiguous(), positions, cos, sin, plan, kv)
        signed_sin = rope_signed_sin(sin)
        # The wide intermediates live in buffers made once per step and reused by every layer: on
        # the CPU a fresh multi-megabyte tensor per layer costs page faults comparable to a matmul.
        # (oneDNN's packed projections return new tensors: they have no out=.)
        buffered = not isinstance(self.layout, OneDnnLayout)
        qkv_buffer = x.new_empty(n, c.q_size + 2 * c.kv_size) if buffered else None
        gate_up_buffer = x.new_empty(n, 2 * c.intermediate_size) if buffered else None
        act = x.new_empty(n, c.intermediate_size)
        for index, layer in enumerate(self.layers):
            h = rms_norm(x, layer.input_norm, c.rms_norm_eps)
            qkv = layer.qkv(h, out=qkv_buffer)  # [N, q + 2 kv]
            # q and k are adjacent in the fused output: one rotation for both, in place
            qk = qkv[:, : c.q_size + c.kv_size].view(n, -1, c.head_dim)  # [N, heads + KVH, D]
            rotate_in_place(qk, cos, signed_sin)
            q, k = qk[:, : c.num_heads], qk[:, c.num_heads :]  # [N, heads, D], [N, KVH, D]
            v = qkv[:, c.q_size + c.kv_size :].view(n, c.num_kv_heads, c.head_dim)
            k_pool, v_pool = kv.k_pool[index], kv.v_pool[index]  # [blocks, block, KVH, D]
            k_pool[plan.write_blocks, plan.write_offsets] = k
            v_pool[plan.write_blocks, plan.write_offsets] = v
            if plan.decode:
                attn = self._decode_attention(q, k_pool, v_pool, plan)
            else:
                attn = self._prefill_attention(q, k_pool, v_pool, plan)
            layer.o_proj.add_to(attn, x)  # x += o_proj(attn)
            h = rms_norm(x, layer.post_norm, c.rms_norm_eps)
            gate_up = layer.gate_up(h, out=gate_up_buffer)  # [N, 2 I]
            gate, up = gate_up[:, : c.intermediate_size], gate_up[:, c.intermediate_size :]
            torch.mul(F.silu(gate, inplace=True), up, out=act)  # [N, I]
            layer.down.add_to(act, x)  # x += down(act)
        return rms_norm(x, self.final_norm, c.rms_norm_eps)

    @staticmethod
    def _fused_fits(plan: AttentionPlan, n: int) -> bool:
        """Whether a step of ``n`` new tokens runs the compiled small-step path: a decode step of up
        to ``gemv_cpu.ONE_THREAD_ROWS`` rows, or a verify step of up to that many rows carrying
        up to ``fused_cpu.VERIFY_TOKENS`` tokens in all (both run on the engine thread alone)."""
        if not plan.decode or plan.block_table is None:
            return False
        if plan.query_index is None:
            return n <= gemv_cpu.ONE_THREAD_ROWS
        return n <= fused_cpu.VERIFY_TOKENS and plan.block_table.shape[0] <= gemv_cpu.ONE_THREAD_ROWS

    @staticmethod
    def _token_table(plan: AttentionPlan) -> torch.Tensor:
        """Each new token's block table: a decode row's own; a verify row's, repeated for each of
        its tokens (-> [N, nb])."""
        assert plan.block_table is not None
        if plan.query_index is None:
            return plan.block_table  # [B, nb]: one token per row
        assert plan.attend is not None
        queries = plan.attend.shape[2]  # Q: the padded queries per row
        return plan.block_table.index_select(0, torch.div(plan.query_index, queries, rounding_mode="floor"))

    def _decode_fused(
        self,
        fused: fused_cpu.CompiledDecode,
        x: torch.Tensor,  # [N, H] the embedded tokens: the residual stream, updated in place
        positions: torch.Tensor,  # [N]
        cos: torch.Tensor,  # [N, 1, D]
        sin: torch.Tensor,
        plan: AttentionPlan,
        kv: PagedKVCache,
    ) -> torch.Tensor:
        """``forward`` for a decode or verify step of a few tokens, its non-matmul work compiled
        (``fused_cpu.py``): every new token is a row of its own, with its own position, KV slot
        and context (its position + 1 over its sequence's blocks), so a verify row of 1 + k
        tokens is k + 1 rows here, each attending causally to the ones before it. Rows without
        adapters run every layer in one call; otherwise each projection adds its rows' adapters
        as in ``forward``, between compiled norms, attention and SiLU*mul. -> final hidden states
        [N, H], one per new token."""
        c = self.config
        lengths = positions + 1  # a token sits at its position and sees all before it
        index = fused.step_index(
            plan.write_blocks,
            plan.write_offsets,
            self._token_table(plan),
            lengths,
            kv.k_pool[0].shape[0],
            kv.block_size,
        )  # checked once for every layer
        eps, n = c.rms_norm_eps, x.shape[0]
        if self.ctx.row_slots is None and self.fused_parts is not None:  # quantized, in one call
            table = self._quantized_table(self.fused_parts, kv)
            fused.parts_layers(table, eps, self.scale, x, cos, sin, index, gemv_cpu.small_step_threads())
            return fused.rms_norm(x, self.final_norm, eps, torch.empty_like(x))
        if self.ctx.row_slots is None and self.layout is not None:  # blocked: the whole model in one call
            table = self._blocked_table(fused, kv)
            fused.layers(table, eps, self.scale, x, cos, sin, index, gemv_cpu.small_step_threads())
            return fused.rms_norm(x, self.final_norm, eps, torch.empty_like(x))
        h = torch.empty_like(x)  # [N, H]
        qkv_buffer = x.new_empty(n, c.q_size + 2 * c.kv_size)
        attn = x.new_empty(n, c.num_heads * c.head_dim)
        gate_up_buffer = x.new_empty(n, 2 * c.intermediate_size)
        act = x.new_empty(n, c.intermediate_size)
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(fused.rms_norm(x, layer.input_norm, eps, h), out=qkv_buffer)  # [N, q + 2 kv]
            fused.attend(qkv, c.num_heads, cos, sin, kv.k_pool[i], kv.v_pool[i], index, self.scale, attn)
            layer.o_proj.add_to(attn, x)  # x += o_proj(attn)
            gate_up = layer.gate_up(fused.rms_norm(x, layer.post_norm, eps, h), out=gate_up_buffer)
            layer.down.add_to(fused.silu_mul(gate_up, act), x)  # x += down(silu(gate) * up)
        return fused.rms_norm(x, self.final_norm, eps, torch.empty_like(x))

    def _quantized_table(
        self, compiled: tuple[fused_cpu.CompiledDecode, quant_cpu.CompiledQuant], kv: PagedKVCache
    ) -> fused_cpu.PartsTable:
        """The layers as ``parts_layers`` reads them, checked once per set of weights and pools
        and per dot product of the quantized kernels (``quant_cpu.DOT``: the table holds their
        addresses)."""
        fused, quant = compiled
        layers = self._layer_entries(kv, lambda linear: linear.quantized_weight())
        dot = quant.dot()
        table = self._parts_tables.get(dot)
        if table is None or not table.holds([t for lay in layers for t in lay]):
            table = self._parts_tables[dot] = fused.parts_table(layers, self._decode_dims(kv), quant)
        return table

    def _blocked_table(self, fused: fused_cpu.CompiledDecode, kv: PagedKVCache) -> fused_cpu.LayerTable:
        """The layers as ``layers`` reads them (blocked weights), checked once per set of weights
        and pools (rebuilt when a merge packs a projection again)."""
        layers = self._layer_entries(kv, lambda linear: linear.blocked_weight())
        if self._layer_table is None or not self._layer_table.holds([t for lay in layers for t in lay]):
            self._layer_table = fused.layer_table(layers, self._decode_dims(kv))
        return self._layer_table

    def _layer_entries(
        self, kv: PagedKVCache, weight: Callable[[FusedLinear], object]
    ) -> list[tuple[object, ...]]:
        """Per layer, what the one-call decode paths read: input norm, qkv weight, qkv bias, o
        weight, post norm, gate_up weight, down weight, K pool, V pool (``weight``: a projection's
        blocked or quantized form)."""
        return [
            (layer.input_norm, weight(layer.qkv), layer.qkv.bias, weight(layer.o_proj), layer.post_norm,
             weight(layer.gate_up), weight(layer.down), kv.k_pool[i], kv.v_pool[i])
            for i, layer in enumerate(self.layers)
        ]  # fmt: skip

    def _decode_dims(self, kv: PagedKVCache) -> tuple[int, int, int, int, int, int]:
        """The sizes the one-call decode paths are built for: hidden, heads, KV heads, head
        size, intermediate size, KV block size."""
        c = self.config
        return c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, kv.block_size

    def decode_logits(
        self,
        tokens: torch.Tensor,  # [B]
        positions: torch.Tensor,  # [B]
        write_blocks: torch.Tensor,  # [B]
        write_offsets: torch.Tensor,  # [B]
        block_table: torch.Tensor,  # [B, nb]
        attend: torch.Tensor,  # [B, 1, 1, nb * block] True up to each row's length
        k_pool: list[torch.Tensor],  # per layer [blocks, block, KVH, D]
        v_pool: list[torch.Tensor],
        row_slots: torch.Tensor,  # [B] adapter slot per row, -1 for none
        row_scale: torch.Tensor,  # [B] float32, the rows' adapter_scale
        lora: StepLora,
    ) -> torch.Tensor:
        """One decode step as a pure function of tensors -> logits [B, V]: what ``torch.compile``
        (dynamic shapes) compiles and CUDA graphs capture.

        The same arithmetic as ``forward`` + ``logits`` on one token per row, written without the
        ``out=`` writes into reused buffers (which dynamo rejects) and with the step's adapters as
        arguments instead of the shared ``LoraBatchContext``. Its only side effect is the new
        tokens' K and V written into the pools.
        """
        c = self.config
        n = tokens.shape[0]
        x = self.embed_tokens(tokens)  # [B, H]
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.dtype)  # [B, 1, D]
        plan = AttentionPlan(write_blocks, write_offsets, True, block_table, attend)
        for index, layer in enumerate(self.layers):
            parts = lora[4 * index : 4 * index + 4] if lora is not None else (None,) * 4
            h = rms_norm(x, layer.input_norm, c.rms_norm_eps)
            qkv = layer.qkv.apply(h, parts[0], row_slots, row_scale)  # [B, q + 2 kv]
            qk = rope_rotated(qkv[:, : c.q_size + c.kv_size].view(n, -1, c.head_dim), cos, sin)
            q, k = qk[:, : c.num_heads], qk[:, c.num_heads :]  # [B, heads, D], [B, KVH, D]
            v = qkv[:, c.q_size + c.kv_size :].view(n, c.num_kv_heads, c.head_dim)
            k_pool[index].index_put_((write_blocks, write_offsets), k)
            v_pool[index].index_put_((write_blocks, write_offsets), v)
            attn = self._decode_attention(q, k_pool[index], v_pool[index], plan)
            x = x + layer.o_proj.apply(attn, parts[1], row_slots, row_scale)
            h = rms_norm(x, layer.post_norm, c.rms_norm_eps)
            gate_up = layer.gate_up.apply(h, parts[2], row_slots, row_scale)  # [B, 2 I]
            act = F.silu(gate_up[:, : c.intermediate_size]) * gate_up[:, c.intermediate_size :]
            x = x + layer.down.apply(act, parts[3], row_slots, row_scale)
        return self.logits(rms_norm(x, self.final_norm, c.rms_norm_eps))

    def step_lora(self, form: LoraBackend) -> StepLora:
        """The current batch's adapters (from the shared context) as ``decode_logits`` takes them,
        in ``form``'s graph layout (``LoraBackend.step_part``): segmented (sizes follow the batch's adapters) or gathered (sizes fixed
        by the slot stacks)."""
        if self.ctx.row_slots is None:
            return None
        return tuple(projection.step_lora(self.ctx, form) for projection in self.projections())

    @staticmethod
    def _gather(pool: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
        """pool: [blocks, block, KVH, D], block_table: [B, nb] -> [B, KVH, nb * block, D].

        One copy of whole blocks (``index_select``); the head-major result is a transposed view.
        """
        b, nb = block_table.shape
        _, bs, kvh, d = pool.shape
        gathered = pool.index_select(0, block_table.reshape(-1))  # [B * nb, block, KVH, D]
        return gathered.view(b, nb * bs, kvh, d).transpose(1, 2)

    def _decode_attention(
        self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan: AttentionPlan
    ) -> torch.Tensor:
        """q: [B, heads, D], one token per sequence -> [B, heads * D]; or, with
        ``plan.query_index``, q: [N, heads, D] of rows with several tokens each -> [N, heads * D]."""
        c = self.config
        assert plan.block_table is not None and plan.attend is not None
        if plan.query_index is not None:
            return self._verify_attention(q, k_pool, v_pool, plan)
        b = q.shape[0]
        keys = self._gather(k_pool, plan.block_table)  # [B, KVH, T, D]
        values = self._gather(v_pool, plan.block_table)
        out = F.scaled_dot_product_attention(
            q[:, :, None, :],  # [B, heads, 1, D]
            keys,
            values,
            attn_mask=plan.attend,  # [B, 1, 1, T] True where a context position exists
            scale=self.scale,
            enable_gqa=True,  # head h reads KV head h // G: K and V are never repeated
        )  # [B, heads, 1, D]
        return out.reshape(b, c.num_heads * c.head_dim)

    def _verify_attention(
        self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan: AttentionPlan
    ) -> torch.Tensor:
        """q: [N, heads, D], rows of up to Q tokens packed -> [N, heads * D]: the queries padded to
        [B, heads, Q, D], one batched product against each row's blocks (``plan.attend`` causal
        within the row), the padding dropped."""
        c = self.config
        assert plan.block_table is not None and plan.attend is not None and plan.query_index is not None
        b, queries = plan.attend.shape[0], plan.attend.shape[2]
        padded = q.new_zeros(b * queries, c.num_heads, c.head_dim)
        padded[plan.query_index] = q
        keys = self._gather(k_pool, plan.block_table)  # [B, KVH, T, D]
        values = self._gather(v_pool, plan.block_table)
        out = F.scaled_dot_product_attention(
            padded.view(b, queries, c.num_heads, c.head_dim).transpose(1, 2),  # [B, heads, Q, D]
            keys,
            values,
            attn_mask=plan.attend,  # [B, 1, Q, T]
            scale=self.scale,
            enable_gqa=True,
        )  # [B, heads, Q, D]
        flat = out.transpose(1, 2).reshape(b * queries, c.num_heads * c.head_dim)
        return flat.index_select(0, plan.query_index)

    def _prefill_attention(
        self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan: AttentionPlan
    ) -> torch.Tensor:
        """q: [N, heads, D] packed prompt chunks -> [N, heads * D]; causal within each sequence."""
        c = self.config
        assert plan.chunks is not None
        outputs = []
        first = 0
        for start, count, blocks in plan.chunks:
            total = start + count
            keys = self._gather(k_pool, blocks[None])[:, :, :total]  # [1, KVH, total, D]
            values = self._gather(v_pool, blocks[None])[:, :, :total]
            query = q[first : first + count].transpose(0, 1)[None]  # [1, heads, count, D]
            if start == 0:  # the chunk is the whole context so far: plain causal attention
                mask, causal = None, True
            else:  # a continued prompt: every cached token is visible, the chunk causally
                rows = torch.arange(count, device=q.device)[:, None] + start
                mask, causal = torch.arange(total, device=q.device)[None, :] <= rows, False  # [count, total]
            out = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=True
            )  # [1, heads, count, D]
            outputs.append(out[0].transpose(0, 1).reshape(count, c.num_heads * c.head_dim))
            first += count
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [N] -> [N, H] float (quantized embedding: the rows dequantized; tied and
        blocked: read from the packed head)."""
        if self.embed_q is not None:
            return self.embed_q.gather(tokens)
        if self.embed is None:
            assert self.head_blocks is not None
            return gemv_cpu.packed_rows(self.head_blocks, tokens)
        return F.embedding(tokens, self.embed)

    def logits(
        self, hidden: torch.Tensor, slots: Sequence[int] | None = None, scales: Sequence[float] | None = None
    ) -> torch.Tensor:
        """hidden: [N, H] -> [N, V]; ``slots``/``scales``: each row's adapter, whose own head (if it
        has one) replaces or changes the base's for that row (``self.vocab``)."""
        logits = self._base_logits(hidden)
        if slots is not None and self.vocab.applies(slots):
            self.vocab.head(hidden, logits, slots, scales)
        return logits

    def _base_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, H] -> [N, V]. int8/int4: the int8 head through the quantized kernel; gguf: the
        file's head blocks through it (``gguf_blocks.GGUF_HEAD``).
        Blocked: through the compiled kernel. oneDNN-packed: through oneDNN too, on the head's
        dense matrix (shared with the embedding; 14 ms against MKL's 25 ms at 16 rows, measured)."""
        if self.head_q is not None:
            return quantized.linear(hidden, self.head_q)
        if self.head_blocks is not None:
            assert isinstance(self.layout, BlockedLayout)
            return self.layout.linear(hidden, self.head_blocks, self.config.vocab_size, None)
        if isinstance(self.layout, OneDnnLayout):
            return onednn.linear(hidden, self.lm_head)
        return F.linear(hidden, self.lm_head)
