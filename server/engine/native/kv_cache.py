"""Paged KV memory: allocated once at start-up, handed out in fixed-size blocks.

    k_pool[layer], v_pool[layer]: [num_blocks, block_size, kv_heads, head_dim]

    sequence 7:  block table [12, 3, 40]   length 37   (block_size 16: 16 + 16 + 5 used)
    sequence 9:  block table [12, 3, 8]    length 40   (its first 32 tokens are 7's: shared blocks)

Joining or leaving copies no other sequence's cache (no left padding: each sequence has its own
positions), and a step allocates no tensor memory beyond the step's own activations. Tokens land
at ``(block_table[p // block_size], p % block_size)``.

Prefix caching (``prefix_cache.py``): a sequence started with an identity names each block it
fills by a hash chain; a later sequence with the same identity and the same leading tokens starts
with those blocks in its table (``start``) and prefills only the rest. Blocks have reference
counts: a block is written only by the sequence that allocated it, and only until it is full, so a
shared (full) block is read-only. A registered block no sequence uses stays cached until the
memory is needed, then the least recently used one is taken back; a block in use never is.
Accounting counts a shared block once.
"""

from __future__ import annotations

from collections.abc import Sequence as Tokens
from dataclasses import dataclass, field

import torch

from server.engine.native.prefix_cache import PrefixIndex, chain_key
from server.engine.runner import PrefixCacheStats, PrefixHit


@dataclass
class Sequence:
    blocks: list[int] = field(default_factory=list)
    length: int = 0  # tokens in the cache
    # prefix caching: what computes this sequence's K and V (prefix_cache.py); None: never shared
    identity: str | None = None
    keys: list[bytes] = field(default_factory=list)  # chain keys of its full blocks so far
    pending: list[int] = field(default_factory=list)  # token ids in its last, partial block
    reused: int = 0  # leading tokens that came from the prefix cache


class PagedKVCache:
    """Block allocator, prefix index and the K/V pools. Engine thread only."""

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
        self._refs = [0] * num_blocks  # sequences whose table holds each block
        self.prefix = PrefixIndex()
        self.sequences: dict[int, Sequence] = {}

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    # ------------------------------------------------------------------ accounting

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def used_blocks(self) -> int:
        """Blocks some sequence holds (a shared block once)."""
        return self.num_blocks - len(self._free) - self.prefix.evictable

    @property
    def used_tokens(self) -> int:
        """Tokens in the blocks sequences hold, a shared block counted once (shared blocks are full)."""
        held = sum(len(s.blocks) for s in self.sequences.values())
        return sum(s.length for s in self.sequences.values()) - self.block_size * (held - self.used_blocks)

    @property
    def free_blocks(self) -> int:
        """Blocks that can be handed out: never used, or cached and referenced by no sequence."""
        return len(self._free) + self.prefix.evictable

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

    def can_grow_by(self, growth: dict[int, int]) -> bool:
        """Whether each sequence (id -> new tokens; an unknown id starts empty) can take that many
        more tokens at once: the blocks they need, all together, are free."""
        needed = 0
        for seq_id, tokens in growth.items():
            seq = self.sequences.get(seq_id)
            length, held = (seq.length, len(seq.blocks)) if seq is not None else (0, 0)
            needed += max(self.blocks_for(length + tokens) - held, 0)
        return needed <= self.free_blocks

    def prefix_stats(self) -> PrefixCacheStats:
        return self.prefix.snapshot()

    # ------------------------------------------------------------------ prefix caching

    def _matched(self, identity: str, token_ids: Tokens[int]) -> list[tuple[bytes, int]]:
        """(key, block) of the longest cached prefix of ``token_ids``, whole blocks only, leaving at
        least the last token to prefill (its logits are the next token's)."""
        usable = (len(token_ids) - 1) // self.block_size * self.block_size
        matched: list[tuple[bytes, int]] = []
        parent = b""
        for start in range(0, usable, self.block_size):
            parent = chain_key(parent, identity, token_ids[start : start + self.block_size])
            block = self.prefix.lookup(parent)
            if block is None:
                break
            matched.append((parent, block))
        return matched

    def cached_prefix(self, identity: str, token_ids: Tokens[int]) -> PrefixHit:
        """What :meth:`start` would reuse now, without taking anything."""
        matched = self._matched(identity, token_ids)
        revived = sum(1 for _, block in matched if self.prefix.is_evictable(block))
        return PrefixHit(len(matched) * self.block_size, revived * self.block_size)

    def start(self, seq_id: int, identity: str | None, token_ids: Tokens[int] = ()) -> int:
        """Create a sequence whose full blocks are cached under ``identity`` (None: never shared),
        holding the longest cached prefix of ``token_ids`` already; returns that prefix's length."""
        if seq_id in self.sequences:
            raise ValueError(f"sequence {seq_id} exists already")
        seq = Sequence(identity=identity)
        self.sequences[seq_id] = seq
        if identity is None or not token_ids:
            return 0
        matched = self._matched(identity, token_ids)
        for key, block in matched:
            self._refs[block] += 1
            self.prefix.referenced(block)
            seq.blocks.append(block)
            seq.keys.append(key)
        seq.length = seq.reused = len(matched) * self.block_size
        stats = self.prefix.stats
        stats.lookups += 1
        stats.lookup_tokens += len(token_ids)
        stats.hit_tokens += seq.reused
        return seq.reused

    def record(self, seq_id: int, token_ids: Tokens[int]) -> None:
        """The tokens just written at the sequence's end (after the forward pass that wrote them):
        each block they fill gets its chain key and is offered to the prefix index."""
        seq = self.sequences[seq_id]
        if seq.identity is None:
            return
        for token in token_ids:
            seq.pending.append(token)
            if len(seq.pending) == self.block_size:
                parent = seq.keys[-1] if seq.keys else b""
                key = chain_key(parent, seq.identity, seq.pending)
                self.prefix.register(key, seq.blocks[len(seq.keys)])
                seq.keys.append(key)
                seq.pending = []

    # ------------------------------------------------------------------ sequences

    def _take_block(self) -> int:
        block = self._free.pop() if self._free else self.prefix.evict_oldest()
        assert block is not None, "callers check free_blocks first"
        self._refs[block] = 1
        return block

    def extend(self, seq_id: int, tokens: int) -> tuple[list[int], list[int]]:
        """Make room for ``tokens`` more tokens of a sequence (created if new, never shared).

        Returns (block id, offset) of each new token's place. Raises MemoryError when blocks run out
        (the engine asks ``can_admit`` / ``can_grow`` first, so this means a bug, not a full cache).
        """
        seq = self.sequences.setdefault(seq_id, Sequence())
        end = seq.length + tokens
        missing = self.blocks_for(end) - len(seq.blocks)
        if missing > self.free_blocks:
            if not seq.blocks:
                del self.sequences[seq_id]
            raise MemoryError(f"KV memory full: {missing} blocks needed, {self.free_blocks} free")
        seq.blocks.extend(self._take_block() for _ in range(missing))
        positions = range(seq.length, end)
        blocks = [seq.blocks[p // self.block_size] for p in positions]
        offsets = [p % self.block_size for p in positions]
        seq.length = end
        return blocks, offsets

    def truncate(self, seq_id: int, length: int) -> None:
        """Keep the sequence's first ``length`` tokens (speculative decoding's rejected drafts go):
        blocks past them return to the free list. Those blocks hold only tokens never recorded
        (``record``), so no prefix key names them and no other sequence holds them."""
        seq = self.sequences[seq_id]
        if not seq.reused <= length <= seq.length:
            raise ValueError(f"sequence {seq_id}: cannot truncate {seq.length} tokens to {length}")
        keep = self.blocks_for(length)
        for block in reversed(seq.blocks[keep:]):
            assert self._refs[block] == 1 and not self.prefix.holds(block), "a rolled-back block is private"
            self._refs[block] = 0
            self._free.append(block)
        del seq.blocks[keep:]
        seq.length = length

    def release(self, seq_id: int) -> None:
        seq = self.sequences.pop(seq_id, None)
        if seq is None:
            return
        for block in reversed(seq.blocks):
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            if self.prefix.holds(block):
                self.prefix.unreferenced(block)  # cached: reused or evicted later
            else:
                self._free.append(block)
