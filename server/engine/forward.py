"""The two forward passes of the engine: prefill newcomers, decode one token for the batch."""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

from server.engine.batch import RunningBatch, new_cache
from server.engine.lora_linear import LoraBatchContext


@torch.inference_mode()
def prefill(
    model: PreTrainedModel,
    ctx: LoraBatchContext,
    prompts: list[list[int]],
    slots: list[int],
    pad_id: int,
) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
    """Run the prompts as one left-padded batch.

    Returns (last-position logits [N, V], the filled cache, attention mask [N, T]).
    """
    device = model.device
    n, length = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, length - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[i, length - len(prompt) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [N, T]
    ctx.set_rows(slots, device)
    cache = new_cache(model.config)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1, :], out.past_key_values, attention_mask


@torch.inference_mode()
def decode_one_token(
    model: PreTrainedModel, ctx: LoraBatchContext, batch: RunningBatch, slots: list[int]
) -> torch.Tensor:
    """Feed every row its next input token (row i reads adapter slot ``slots[i]``).

    Returns the logits for the token after it: [B, V].
    """
    device = model.device
    rows = batch.rows
    input_ids = torch.tensor([[r.next_input] for r in rows], dtype=torch.long, device=device)  # [B, 1]
    position_ids = torch.tensor([[r.length] for r in rows], dtype=torch.long, device=device)  # [B, 1]
    ones = torch.ones((len(rows), 1), dtype=batch.attention_mask.dtype, device=device)
    attention_mask = torch.cat([batch.attention_mask, ones], dim=1)  # [B, P+1]
    ctx.set_rows(slots, device)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=batch.cache,
        use_cache=True,
    )
    batch.attention_mask = attention_mask
    for row in rows:
        row.length += 1
    return out.logits[:, -1, :]
