"""Adapters' own token embedding and LM head, per row: PEFT's ``modules_to_save`` (a whole new
matrix) and LoRA on the embedding or the head (``adapters.peft_format.VocabLayer``).

The base's embedding and head are never written: a row of an adapter that changes them gets

    embedding   x = R[token]                 or  x = E[token] + s · B A[:, token]
    head        logits = R h                 or  logits = W h + s · B (A h)

with ``adapter_scale`` t giving base + t · (adapted − base). So a tied embedding stays the base's
(PEFT's modules_to_save copies the head it wraps: the embedding keeps the base's matrix), rows of
other adapters and of the base batch with these rows, and merged mode "swaps" the head and the
embedding by making the merged adapter's changes those of every base row (merged mode runs only
the merged adapter's rows, sent as base rows): the base weights stay bit for bit what they were.

Rows are grouped by slot: one gather and one matmul (or a row copy) per adapter with such a change
in the batch. A runner calls :meth:`VocabAdapters.embed` after its embedding lookup and
:meth:`VocabAdapters.head` after its logits, with each row's slot and scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adapters.peft_format import VocabLayer
from server.engine.lora.batch import BASE_SLOT

MERGED = -2  # the key of the merged adapter's changes (applied to base rows)


class VocabAdapters:
    """The resident adapters' embedding and head changes, by slot (and the merged adapter's)."""

    def __init__(
        self,
        embed_name: str,
        head_name: str,
        vocab_size: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.embed_name, self.head_name = embed_name, head_name
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.dtype, self.device = dtype, device
        self._embed: dict[int, VocabLayer] = {}  # slot (or MERGED) -> change, tensors on the device
        self._head: dict[int, VocabLayer] = {}

    @property
    def slots(self) -> set[int]:
        """The slots whose adapter changes the embedding or the head."""
        return {s for s in (*self._embed, *self._head) if s != MERGED}

    @property
    def merged_active(self) -> bool:
        return MERGED in self._embed or MERGED in self._head

    def applies(self, slots: Sequence[int]) -> bool:
        """True when a row of these slots gets a change (a base row does while one is merged)."""
        active = self.slots | ({BASE_SLOT} if self.merged_active else set())
        return not active.isdisjoint(slots)

    def set_slot(self, slot: int, name: str, layer: VocabLayer) -> None:
        table = self._embed if name == self.embed_name else self._head
        table[slot] = self._resident(layer)

    def clear_slot(self, slot: int) -> None:
        self._embed.pop(slot, None)
        self._head.pop(slot, None)

    def set_merged(self, layers: dict[str, VocabLayer] | None) -> None:
        """The merged adapter's changes, served to every base row (None: the bare base)."""
        self.clear_slot(MERGED)
        for name, layer in (layers or {}).items():
            self.set_slot(MERGED, name, layer)

    def _resident(self, layer: VocabLayer) -> VocabLayer:
        def on_device(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(self.device, self.dtype).contiguous()

        return VocabLayer(
            layer.kind,
            on_device(layer.replacement),
            on_device(layer.A),
            on_device(layer.B),
            layer.scale,
            layer.weight,
        )

    # ------------------------------------------------------------------ forward

    def embed(
        self,
        tokens: torch.Tensor,
        x: torch.Tensor,
        slots: Sequence[int],
        scales: Sequence[float] | None = None,
    ) -> None:
        """tokens: [N]; x: [N, H] the base embedding of each token, changed in place for the rows
        (tokens) of adapters that change the embedding."""
        for key, rows, t in self._groups(self._embed, slots, scales):
            ids = tokens.index_select(0, rows)  # [n]
            layer = self._embed[key]
            if layer.replacement is not None:
                new = layer.replacement.index_select(0, ids)  # [n, H]
            else:
                assert layer.A is not None and layer.B is not None
                delta = layer.A.t().index_select(0, ids) @ layer.B.t()  # [n, r] @ [r, H]
                new = x.index_select(0, rows) + layer.scale * delta
            new = new.to(x.dtype)
            x.index_copy_(0, rows, self._blend(x.index_select(0, rows), new, t))

    def head(
        self,
        hidden: torch.Tensor,
        logits: torch.Tensor,
        slots: Sequence[int],
        scales: Sequence[float] | None = None,
    ) -> None:
        """hidden: [N, H]; logits: [N, V] the base head's, changed in place for the rows of adapters
        that change the head."""
        for key, rows, t in self._groups(self._head, slots, scales):
            h = hidden.index_select(0, rows).to(self.dtype)  # [n, H]
            layer = self._head[key]
            if layer.replacement is not None:
                new = h @ layer.replacement.t()  # [n, V]
            else:
                assert layer.A is not None and layer.B is not None
                new = logits.index_select(0, rows) + layer.scale * ((h @ layer.A.t()) @ layer.B.t())
            logits.index_copy_(0, rows, self._blend(logits.index_select(0, rows), new.to(logits.dtype), t))

    def _groups(
        self, table: dict[int, VocabLayer], slots: Sequence[int], scales: Sequence[float] | None
    ) -> list[tuple[int, torch.Tensor, torch.Tensor | float]]:
        """(key, rows [n], their factor t: the layer's weight times each row's scale) per change."""
        groups = []
        for key in table:
            wanted = BASE_SLOT if key == MERGED else key
            rows = [i for i, s in enumerate(slots) if s == wanted]
            if not rows:
                continue
            weight = table[key].weight
            row_scales = [1.0 if scales is None or key == MERGED else float(scales[i]) for i in rows]
            factors = [weight * r for r in row_scales]
            t: torch.Tensor | float = (
                factors[0]
                if len(set(factors)) == 1
                else torch.tensor(factors, dtype=self.dtype, device=self.device)[:, None]
            )
            groups.append((key, torch.tensor(rows, dtype=torch.long, device=self.device), t))
        return groups

    @staticmethod
    def _blend(base: torch.Tensor, new: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """base + t · (new − base); exactly ``new`` at t = 1."""
        if isinstance(t, float) and t == 1.0:
            return new
        return base + t * (new - base)
