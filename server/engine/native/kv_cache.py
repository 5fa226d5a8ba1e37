"""Paged KV memory: allocated once at start-up, handed out in fixed-size blocks.

    k_pool[layer], v_pool[layer]: [num_blocks, block_size, kv_heads, head_dim]

    sequence 7:  block table [12, 3, 40]   length 37   (block_size 16: 16 + 16 + 5 used)
    sequence 9:  block table [5]           length 9

A sequence owns the blocks in its table; joining or leaving copies no other sequence's cache
(no left padding: each sequence has its own positions), and a step allocates no tensor memory
beyond the step's own activations. Tokens land at ``(block_table[p // block_size], p % block_size)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Sequence:
    blocks: list[int] = field(default_factory=list)
    length: int = 0  # tokens in the cache


class PagedKVCache:
    """Block allocator and the K/V pools. Engine thread only."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if num_blocks < 1:
            raise ValueError("the KV memory must hold at least one block")
        # Token-major blocks: a block is one contiguous [block_size, kv_heads, D] piece, so a
        # sequence's context is gathered with one index_select over whole blocks and read as
        # [kv_heads, T, D] through a transposed view (no per-head indexing, no second copy).
        # One block more than is handed out: the scratch block, where the padding rows of a
        # graph-captured decode step write their K and V (and read them back), so padding never
        # touches a sequence's cache.
        # One tensor per layer, not one for all: a compiled step that writes into a view of a
        # graph input copies the whole input back (measured: ~0.9 s a step on the CPU), while a
        # whole per-layer input is updated in place.
        shape = (num_blocks + 1, block_size, num_kv_heads, head_dim)
        self.scratch_block = num_blocks
        self.k_pool = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_pool = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: low ids first
        self.sequences: dict[int, Sequence] = {}

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    # ------------------------------------------------------------------ accounting

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def used_tokens(self) -> int:
        return sum(s.length for s in self.sequences.values())

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def bytes_reserved(self) -> int:
        return 2 * sum(pool.numel() * pool.element_size() for pool in self.k_pool)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def can_admit(self, num_tokens: int, num_sequences: int = 1) -> bool:
        """Whether ``num_tokens`` more tokens over ``num_sequences`` sequences fit (each may waste a block)."""
        return self.blocks_for(num_tokens) + num_sequences - 1 <= self.free_blocks

    def can_grow(self, seq_ids: list[int]) -> bool:
        """Whether each sequence can take one more token."""
        needed = sum(1 for s in seq_ids if self.sequences[s].length % self.block_size == 0)
        return needed <= self.free_blocks

    # ------------------------------------------------------------------ sequences

    def extend(self, seq_id: int, tokens: int) -> tuple[list[int], list[int]]:
        """Make room for ``tokens`` more tokens of a sequence (created if new).

        Returns (block id, offset) of each new token's place. Raises MemoryError when blocks run out
        (the engine asks ``can_admit`` / ``can_grow`` first, so this means a bug, not a full cache).
        """
        seq = self.sequences.setdefault(seq_id, Sequence())
        end = seq.length + tokens
        missing = self.blocks_for(end) - len(seq.blocks)
        if missing > len(self._free):
            if not seq.blocks:
                del self.sequences[seq_id]
            raise MemoryError(f"KV memory full: {missing} blocks needed, {len(self._free)} free")
        seq.blocks.extend(self._free.pop() for _ in range(missing))
        positions = range(seq.length, end)
        blocks = [seq.blocks[p // self.block_size] for p in positions]
        offsets = [p % self.block_size for p in positions]
        seq.length = end
        return blocks, offsets

    def release(self, seq_id: int) -> None:
        seq = self.sequences.pop(seq_id, None)
        if seq is not None:
            self._free.extend(reversed(seq.blocks))
