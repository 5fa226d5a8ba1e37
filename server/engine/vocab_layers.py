"""The HF runner's embedding and LM head wrapped so that each row may use its adapter's own
(``modules_to_save``, LoRA on them: ``server/engine/lora/vocab.py``).

The wrappers replace the model's input-embedding and output-embedding modules; the base modules
(and a weight they share when tied) are kept as they are, inside.
"""

from __future__ import annotations

import torch
from torch import nn

from server.engine.lora import LoraBatchContext
from server.engine.lora.vocab import VocabAdapters


class _VocabWrapper(nn.Module):
    """A base embedding or head module kept inside, with the batch's rows (``ctx``) and the
    adapters' own vocabulary layers beside it."""

    def __init__(self, base: nn.Module, vocab: VocabAdapters, ctx: LoraBatchContext) -> None:
        super().__init__()
        self.base, self.vocab, self.ctx = base, vocab, ctx

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight


class VocabEmbedding(_VocabWrapper):
    """The token embedding, then each row's adapter's own (rows: the batch rows of ``ctx``)."""

    @property
    def num_embeddings(self) -> int:
        return int(self.base.num_embeddings)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.base(input_ids)  # [B, T, H], a fresh tensor
        slots, scales = self.ctx.rows
        if self.vocab.applies(slots):
            seq = input_ids.shape[1]
            self.vocab.embed(input_ids.reshape(-1), x.view(-1, x.shape[-1]), *_per_token(slots, scales, seq))
        return x


class VocabHead(_VocabWrapper):
    """The LM head, then each row's adapter's own head where it has one."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.base(hidden)  # [B, T, V]
        slots, scales = self.ctx.rows
        if self.vocab.applies(slots):
            seq = hidden.shape[1]
            flat_hidden = hidden.reshape(-1, hidden.shape[-1])
            self.vocab.head(flat_hidden, logits.view(-1, logits.shape[-1]), *_per_token(slots, scales, seq))
        return logits


def attach_vocab_layers(model: nn.Module, ctx: LoraBatchContext) -> VocabAdapters | None:
    """Wrap the model's input embedding and output head (None when it lacks either)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(embedding, nn.Embedding) or not isinstance(head, nn.Linear):
        return None
    names = {id(module): name for name, module in model.named_modules()}
    embed_name, head_name = names[id(embedding)], names[id(head)]
    weight = embedding.weight
    vocab = VocabAdapters(
        embed_name, head_name, embedding.num_embeddings, embedding.embedding_dim, weight.dtype, weight.device
    )
    for name, wrapper in (
        (embed_name, VocabEmbedding(embedding, vocab, ctx)),
        (head_name, VocabHead(head, vocab, ctx)),
    ):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapper)
    return vocab


def _per_token(
    slots: tuple[int, ...], scales: tuple[float, ...] | None, seq: int
) -> tuple[list[int], list[float] | None]:
    """Each batch row's slot and scale repeated for its ``seq`` positions (rows are [B, T] flat)."""
    token_slots = [s for s in slots for _ in range(seq)]
    return token_slots, None if scales is None else [t for t in scales for _ in range(seq)]
