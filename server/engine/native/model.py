"""The Llama-family forward pass over packed tokens, with paged KV memory and per-token adapters.

Shapes: ``N`` tokens of a step (a decode step: one per sequence), ``H`` hidden size, heads of
``D`` dimensions, ``G`` query heads per KV head (grouped-query attention).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from server.engine.lora_linear import Kernel, LoraBatchContext
from server.engine.native.config import NativeConfig
from server.engine.native.kv_cache import PagedKVCache
from server.engine.native.layers import FusedLinear, apply_rope, rms_norm, rope_cos_sin, rope_inv_freq


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
    lengths: torch.Tensor | None = None  # decode: [B] tokens in cache, the new one included
    beyond: torch.Tensor | None = None  # decode: [B, 1, 1, T] True past each sequence's length
    chunks: list[tuple[int, int, torch.Tensor]] | None = None  # prefill: (start, count, block ids)


class Checkpoint(Mapping[str, torch.Tensor]):
    """The tensors of a (possibly sharded) safetensors checkpoint, each read when accessed.

    Reading lazily keeps the peak memory of loading near the model's own size, instead of the
    whole checkpoint twice (the raw tensors and their fused copies).
    """

    def __init__(self, model_dir: Path) -> None:
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(
                f"{model_dir} has no *.safetensors checkpoint (the native runner reads those)"
            )
        self._files = [safe_open(str(path), "pt") for path in files]
        self._where = {name: f for f in self._files for name in f.keys()}  # noqa: SIM118 - no __iter__

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


class LlamaModel:
    """Weights (fused where it pays) and the forward pass. Engine thread only."""

    def __init__(
        self,
        config: NativeConfig,
        tensors: Mapping[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device,
        ctx: LoraBatchContext,
        kernel: Kernel,
    ) -> None:
        self.config = config
        self.ctx = ctx
        c = config

        def get(name: str, copy: bool = True) -> torch.Tensor:
            # An owned copy: a tensor left backed by the checkpoint's memory map would keep the
            # whole file's pages resident (about 280 MB more RSS on the embedded model, measured).
            return tensors[name].to(device=device, dtype=dtype, copy=copy)

        def fused(prefix: str, parts: list[tuple[str, int]], bias: bool) -> FusedLinear:
            if len(parts) > 1:  # cat makes the one copy
                weight = torch.cat([get(f"{prefix}.{p}.weight", copy=False) for p, _ in parts])
            else:
                weight = get(f"{prefix}.{parts[0][0]}.weight")
            b = torch.cat([get(f"{prefix}.{p}.bias", copy=False) for p, _ in parts]) if bias else None
            return FusedLinear(weight, b, [(f"{prefix}.{p}", n) for p, n in parts], ctx, kernel)

        # Tied checkpoints keep one copy of the shared matrix, under either name.
        embed_name = (
            "model.embed_tokens.weight" if "model.embed_tokens.weight" in tensors else "lm_head.weight"
        )
        self.embed = get(embed_name)  # [V, H]
        untied = not c.tie_word_embeddings and "lm_head.weight" in tensors and embed_name != "lm_head.weight"
        self.lm_head = get("lm_head.weight") if untied else self.embed  # [V, H]
        self.final_norm = get("model.norm.weight")
        self.layers: list[Layer] = []
        for i in range(c.num_layers):
            attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
            self.layers.append(
                Layer(
                    input_norm=get(f"model.layers.{i}.input_layernorm.weight"),
                    qkv=fused(
                        attn, [("q_proj", c.q_size), ("k_proj", c.kv_size), ("v_proj", c.kv_size)], c.qkv_bias
                    ),
                    o_proj=fused(attn, [("o_proj", c.hidden_size)], False),
                    post_norm=get(f"model.layers.{i}.post_attention_layernorm.weight"),
                    gate_up=fused(
                        mlp, [("gate_proj", c.intermediate_size), ("up_proj", c.intermediate_size)], False
                    ),
                    down=fused(mlp, [("down_proj", c.hidden_size)], False),
                )
            )
        self._kv_heads = torch.arange(c.num_kv_heads, device=device)
        self.inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling).to(device)
        self.scale = c.head_dim**-0.5
        self.dtype, self.device = dtype, device

    @classmethod
    def from_dir(
        cls, model_dir: Path, dtype: torch.dtype, device: torch.device, ctx: LoraBatchContext, kernel: Kernel
    ) -> LlamaModel:
        config = NativeConfig.from_dict(json.loads((model_dir / "config.json").read_text()))
        return cls(config, Checkpoint(model_dir), dtype, device, ctx, kernel)

    def projections(self) -> list[FusedLinear]:
        return [p for layer in self.layers for p in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)]

    # ------------------------------------------------------------------ forward

    @torch.inference_mode()
    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, plan: AttentionPlan, kv: PagedKVCache
    ) -> torch.Tensor:
        """tokens, positions: [N] -> final hidden states [N, H] (before the LM head)."""
        c = self.config
        x = F.embedding(tokens, self.embed)  # [N, H]
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.dtype)  # [N, 1, D]
        n = tokens.shape[0]
        for index, layer in enumerate(self.layers):
            h = rms_norm(x, layer.input_norm, c.rms_norm_eps)
            qkv = layer.qkv(h)  # [N, q + 2 kv]
            q = qkv[:, : c.q_size].view(n, c.num_heads, c.head_dim)
            k = qkv[:, c.q_size : c.q_size + c.kv_size].view(n, c.num_kv_heads, c.head_dim)
            v = qkv[:, c.q_size + c.kv_size :].view(n, c.num_kv_heads, c.head_dim)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k_pool, v_pool = kv.k_pool[index], kv.v_pool[index]  # [blocks, KVH, block, D]
            k_pool[plan.write_blocks, :, plan.write_offsets] = k
            v_pool[plan.write_blocks, :, plan.write_offsets] = v
            if plan.decode:
                attn = self._decode_attention(q, k_pool, v_pool, plan)
            else:
                attn = self._prefill_attention(q, k_pool, v_pool, plan)
            x = x + layer.o_proj(attn)
            h = rms_norm(x, layer.post_norm, c.rms_norm_eps)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)  # [N, I] each
            x = x + layer.down(F.silu(gate) * up)
        return rms_norm(x, self.final_norm, c.rms_norm_eps)

    def _gather(self, pool: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
        """pool: [blocks, KVH, block, D], block_table: [B, nb] -> [B, KVH, nb * block, D] (one copy)."""
        gathered = pool[block_table[:, None, :], self._kv_heads[None, :, None]]  # [B, KVH, nb, block, D]
        b, kvh, nb, bs, d = gathered.shape
        return gathered.view(b, kvh, nb * bs, d)

    def _decode_attention(
        self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan: AttentionPlan
    ) -> torch.Tensor:
        """q: [B, heads, D], one token per sequence -> [B, heads * D]."""
        c = self.config
        assert plan.block_table is not None and plan.beyond is not None
        b = q.shape[0]
        keys = self._gather(k_pool, plan.block_table)  # [B, KVH, T, D]
        values = self._gather(v_pool, plan.block_table)
        groups = c.num_heads // c.num_kv_heads
        query = q.view(b, c.num_kv_heads, groups, c.head_dim)  # head h reads KV head h // G
        scores = torch.matmul(query, keys.transpose(-1, -2)).mul_(self.scale)  # [B, KVH, G, T]
        scores.masked_fill_(plan.beyond, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs, values)  # [B, KVH, G, D]
        return out.reshape(b, c.num_heads * c.head_dim)

    def _prefill_attention(
        self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan: AttentionPlan
    ) -> torch.Tensor:
        """q: [N, heads, D] packed prompt chunks -> [N, heads * D]; causal within each sequence."""
        c = self.config
        assert plan.chunks is not None
        groups = c.num_heads // c.num_kv_heads
        outputs = []
        first = 0
        for start, count, blocks in plan.chunks:
            total = start + count
            keys = self._gather(k_pool, blocks[None])[0, :, :total]  # [KVH, total, D]
            values = self._gather(v_pool, blocks[None])[0, :, :total]
            query = q[first : first + count].permute(1, 0, 2)  # [heads, count, D]
            query = query.reshape(c.num_kv_heads, groups * count, c.head_dim)
            scores = torch.matmul(query, keys.transpose(-1, -2)).mul_(self.scale)  # [KVH, G*count, total]
            scores = scores.view(c.num_kv_heads, groups, count, total)
            rows = torch.arange(count, device=q.device)[:, None] + start
            future = torch.arange(total, device=q.device)[None, :] > rows  # [count, total]
            scores.masked_fill_(future, float("-inf"))
            probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            out = torch.matmul(probs.view(c.num_kv_heads, groups * count, total), values)  # [KVH, G*count, D]
            out = out.view(c.num_heads, count, c.head_dim).permute(1, 0, 2)  # [count, heads, D]
            outputs.append(out.reshape(count, c.num_heads * c.head_dim))
            first += count
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, H] -> [N, V]."""
        return F.linear(hidden, self.lm_head)
