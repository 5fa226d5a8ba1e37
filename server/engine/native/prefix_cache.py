"""Prefix caching: which full KV blocks hold which tokens, under which adapter identity.

A full block is named by a hash chain::

    key(block i) = sha256(key(block i-1) ‖ identity ‖ the block's token ids)

so a key names the whole prefix up to the block's end, computed by one identity: the bare base
(``base``), or an adapter *version* at a scale (``adapter:<id>@<version>[*<scale>]``; a stored
adapter's version carries its sha256 and a sequence number that never repeats, a composition's
version its digest). Two requests share a block only when they have the same tokens from the first
position on *and* the same identity: a replaced, deleted and re-uploaded, or rescaled adapter has
another identity, so it never reads its earlier version's K and V (the isolation bugs of vLLM
#30931 / #42125). sha256 rather than Python's ``hash``: a 64-bit hash can be made to collide on
purpose, and a collision here would hand one prompt's K and V to another.

:class:`PrefixIndex` maps keys to block ids and keeps the *unreferenced* cached blocks in LRU
order; :class:`~server.engine.native.kv_cache.PagedKVCache` owns the reference counts and takes
those blocks back (oldest first) when it runs out of free ones.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

from server.engine.runner import PrefixCacheStats

BASE_IDENTITY = "base"


def chain_key(parent: bytes, identity: str, tokens: Sequence[int]) -> bytes:
    """The key of a full block whose predecessor's key is ``parent`` (``b""`` for the first block)."""
    h = hashlib.sha256(parent)
    h.update(identity.encode())
    h.update(b"\0")
    h.update(array("q", tokens).tobytes())
    return h.digest()


def chain_keys(identity: str, tokens: Sequence[int], block_size: int) -> list[bytes]:
    """The keys of the full blocks of ``tokens`` (a trailing partial block has none)."""
    keys: list[bytes] = []
    parent = b""
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = chain_key(parent, identity, tokens[start : start + block_size])
        keys.append(parent)
    return keys


class PrefixIndex:
    """Chain key -> block id for full blocks, and the LRU order of unreferenced ones."""

    def __init__(self) -> None:
        self._block_of: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._unreferenced: OrderedDict[int, None] = OrderedDict()  # oldest first
        self.stats = PrefixCacheStats()

    def __len__(self) -> int:
        return len(self._block_of)

    @property
    def evictable(self) -> int:
        return len(self._unreferenced)

    def lookup(self, key: bytes) -> int | None:
        return self._block_of.get(key)

    def is_evictable(self, block: int) -> bool:
        return block in self._unreferenced

    def register(self, key: bytes, block: int) -> bool:
        """Name a block just filled by its sequence; False when another block has the key already
        (two sequences computed the same prefix at once: the first one's block stays the cached one)."""
        if key in self._block_of or block in self._key_of:
            return False
        self._block_of[key] = block
        self._key_of[block] = key
        return True

    def holds(self, block: int) -> bool:
        return block in self._key_of

    def unreferenced(self, block: int) -> None:
        """The last sequence using a registered block left: keep it, most recently used last."""
        self._unreferenced[block] = None
        self._unreferenced.move_to_end(block)

    def referenced(self, block: int) -> None:
        """A sequence reuses a cached block: it can no longer be evicted."""
        self._unreferenced.pop(block, None)

    def evict_oldest(self) -> int | None:
        """Forget the least recently used unreferenced block; its id (None: none to evict)."""
        if not self._unreferenced:
            return None
        block, _ = self._unreferenced.popitem(last=False)
        del self._block_of[self._key_of.pop(block)]
        self.stats.evictions += 1
        return block

    def snapshot(self) -> PrefixCacheStats:
        s = self.stats
        return PrefixCacheStats(
            s.lookups,
            s.lookup_tokens,
            s.hit_tokens,
            s.evictions,
            len(self._block_of),
            len(self._unreferenced),
        )
