"""The running batch: its rows and a left-padded KV cache that rows join and leave between steps.

Layout (``P`` = cache length, left padding marked ``.``)::

    row 0   . . . p p p p g g      attention_mask 0 0 0 1 1 1 1 1 1
    row 1   p p p p p p g g g                     1 1 1 1 1 1 1 1 1

* newcomers are prefilled as their own small batch, then :meth:`RunningBatch.extend` pads the
  shorter cache on the left and concatenates along the batch dimension;
* finished rows leave with :meth:`RunningBatch.keep` (index select);
* :meth:`RunningBatch.trim` drops the left columns that are padding in every row.

This works with any Hugging Face causal LM whose cache is a ``DynamicCache``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from server.engine.detokenize import IncrementalDetokenizer
from server.engine.sampling import RowSampler

if TYPE_CHECKING:
    from server.engine.requests import GenerationRequest


@dataclass
class Row:
    """One request while it is in the running batch."""

    request: GenerationRequest
    slot: int  # adapter slot, BASE_SLOT for the bare base
    sampler: RowSampler
    detokenizer: IncrementalDetokenizer
    seen: torch.Tensor  # [n] prompt + generated ids (for the repetition penalty)
    length: int  # real (non-padding) tokens in the cache for this row
    next_input: int = -1  # the token to feed at the next decode step
    generated: int = 0
    tokens: list[dict[str, Any]] = field(default_factory=list)  # details, when asked for


def _layers(cache: DynamicCache) -> list[Any]:
    return cache.layers


@dataclass
class RunningBatch:
    rows: list[Row]
    cache: DynamicCache
    attention_mask: torch.Tensor  # [B, P] 1 for real tokens, 0 for left padding

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def cache_length(self) -> int:
        return int(self.attention_mask.shape[1])

    def extend(self, other: RunningBatch) -> None:
        """Append ``other``'s rows, left-padding whichever cache is shorter."""
        length = max(self.cache_length, other.cache_length)
        for mine, theirs in zip(_layers(self.cache), _layers(other.cache), strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, length), _pad_left(theirs.keys, length)], dim=0)
            mine.values = torch.cat([_pad_left(mine.values, length), _pad_left(theirs.values, length)], dim=0)
        self.attention_mask = torch.cat(
            [_pad_left_mask(self.attention_mask, length), _pad_left_mask(other.attention_mask, length)], dim=0
        )
        self.rows.extend(other.rows)

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows (in this order)."""
        if len(indices) == len(self.rows):
            return
        index = torch.tensor(indices, dtype=torch.long, device=self.attention_mask.device)
        for layer in _layers(self.cache):
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        self.attention_mask = self.attention_mask.index_select(0, index)
        self.rows = [self.rows[i] for i in indices]
        self.trim()

    def trim(self) -> None:
        """Drop the leading columns that are padding in every row."""
        if not self.rows:
            return
        real = self.attention_mask.any(dim=0)  # [P]
        first = int(real.float().argmax())
        if first == 0:
            return
        for layer in _layers(self.cache):
            layer.keys = layer.keys[:, :, first:].contiguous()
            layer.values = layer.values[:, :, first:].contiguous()
        self.attention_mask = self.attention_mask[:, first:]


def _pad_left(x: torch.Tensor, length: int) -> torch.Tensor:
    """x: [B, H, T, D] -> [B, H, length, D] with zeros in front."""
    missing = length - x.shape[2]
    return x if missing == 0 else F.pad(x, (0, 0, missing, 0))


def _pad_left_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - mask.shape[1]
    return mask if missing == 0 else F.pad(mask, (missing, 0))
