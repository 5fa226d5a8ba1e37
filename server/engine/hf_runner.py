"""HFRunner: the model runner for any Hugging Face causal LM (eager forward, left-padded cache).

Every linear layer LoRA may target is wrapped in a :class:`LoraLinear` (the output head excluded);
newcomers are prefilled as their own left-padded batch and joined to the running batch's cache
(``batch.py``). This is the portable path: the native runner is faster where it applies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from server.engine.batch import RunningBatch, new_cache
from server.engine.lora import LoraBackend, LoraBatchContext, choose_backend
from server.engine.lora_linear import LoraLinear, linear_shape
from server.engine.runner import (
    DecodeInput,
    KvUsage,
    LoraTarget,
    ModelRunner,
    PrefillInput,
    PrefillOutput,
    WeightTarget,
    prompt_logprobs,
)
from server.engine.vocab_layers import attach_vocab_layers


def attach_lora_layers(
    model: nn.Module, ctx: LoraBatchContext, backend: LoraBackend
) -> dict[str, LoraLinear]:
    """Wrap every linear layer LoRA may target (the output head excluded) in a :class:`LoraLinear`.

    Returns the wrappers by the wrapped module's original name (``model.layers.0.self_attn.q_proj``),
    the names PEFT adapters use.
    """
    output_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets: list[tuple[str, nn.Module, tuple[int, int, bool]]] = []
    for name, module in model.named_modules():
        shape = linear_shape(module)
        if shape is not None and module is not output_head and not isinstance(module, LoraLinear):
            targets.append((name, module, shape))
    layers: dict[str, LoraLinear] = {}
    for name, module, (in_features, out_features, _) in targets:
        wrapper = LoraLinear(module, in_features, out_features, ctx, backend)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, wrapper)
        layers[name] = wrapper
    return layers


class HFRunner(ModelRunner):
    """Runs a ``PreTrainedModel``; rows of the running batch are in the order the engine sent them.

    Its step plan is the default one (``ModelRunner.step``: the decode rows, then the new prompts).
    No speculative decoding: rolling a row back in the left-padded shared cache (a
    ``DynamicCache`` whose rows all have one length) would mean re-padding every row per step."""

    name = "hf"

    def __init__(
        self, model: PreTrainedModel, *, lora_backend: str = "auto", own_weights: bool = False
    ) -> None:
        """``lora_backend``: ``--lora-backend`` (``server/engine/lora/choose.py``);
        ``own_weights``: copy the target weights into memory this process owns (see below)."""
        self.model = model
        self.ctx = LoraBatchContext()
        self.device = model.device
        self.dtype = next(model.parameters()).dtype
        self.lora_backend = choose_backend(lora_backend, self.device, self.dtype)
        self.layers = attach_lora_layers(model, self.ctx, self.lora_backend)
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        self.vocab = attach_vocab_layers(model, self.ctx)  # adapters' own embedding and head, per row
        limit = getattr(model.config, "max_position_embeddings", None)
        self.max_positions = int(limit) if limit else None
        self._batch: RunningBatch | None = None
        if own_weights:
            # Weights loaded from safetensors may still be copy-on-write pages of the mmap'd file:
            # the first merge would pay ~1-2 s of page faults (measured), and auto mode would take
            # that as the price of every swap. Merging runners own them from start-up.
            for layer in self.layers.values():
                layer.base.weight.data = layer.base.weight.data.clone()
        self._lora_targets: Mapping[str, LoraTarget] = self.layers
        self._weight_targets = {
            name: WeightTarget(layer.base.weight, f"{name}.weight", layer.fan_in_fan_out)
            for name, layer in self.layers.items()
        }

    def slots_changed(self) -> None:
        self.ctx.invalidate()

    # ------------------------------------------------------------------ forward passes

    @torch.inference_mode()
    def prefill(self, inputs: Sequence[PrefillInput]) -> PrefillOutput:
        """Run the prompts as one left-padded batch, then join them to the running batch."""
        if any(i.start != 0 for i in inputs):
            raise ValueError("HFRunner prefills whole prompts only (no chunked prefill)")
        prompts = [list(i.token_ids) for i in inputs]
        n, length = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((n, length), 0, dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, length - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, length - len(prompt) :] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [N, T]
        self.ctx.set_rows([i.slot for i in inputs], self.device, [i.scale for i in inputs])
        want_all = any(i.want_token_logprobs for i in inputs)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=new_cache(self.model.config),
            use_cache=True,
            logits_to_keep=0 if want_all else 1,
        )
        logits = out.logits  # [N, T or 1, V]
        output = PrefillOutput(logits=logits[:, -1, :])
        for row, item in enumerate(inputs):
            if item.want_token_logprobs:  # logits[row]: [T, V], left padding in front
                n = len(prompts[row])
                prompt_logprobs(output, item, logits[row, -n:-1], prompts[row])
        joined = RunningBatch(
            seq_ids=[i.seq_id for i in inputs],
            lengths=[len(p) for p in prompts],
            cache=out.past_key_values,
            attention_mask=attention_mask,
        )
        if self._batch is None:
            self._batch = joined
        else:
            self._batch.extend(joined)
        return output

    @torch.inference_mode()
    def decode(self, inputs: Sequence[DecodeInput]) -> torch.Tensor:
        """Feed every sequence its next token; returns the logits for the token after it: [B, V]."""
        batch = self._in_order([i.seq_id for i in inputs])
        device = self.device
        input_ids = torch.tensor([[i.token_id] for i in inputs], dtype=torch.long, device=device)  # [B, 1]
        position_ids = torch.tensor([[n] for n in batch.lengths], dtype=torch.long, device=device)  # [B, 1]
        ones = torch.ones((len(inputs), 1), dtype=batch.attention_mask.dtype, device=device)
        attention_mask = torch.cat([batch.attention_mask, ones], dim=1)  # [B, P+1]
        self.ctx.set_rows([i.slot for i in inputs], device, [i.scale for i in inputs])
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=batch.cache,
            use_cache=True,
        )
        batch.attention_mask = attention_mask
        batch.lengths = [n + 1 for n in batch.lengths]
        return out.logits[:, -1, :]

    def kv_usage(self) -> KvUsage:
        """The padded cache grows on demand: no capacity; used = rows x cache length (padding included)."""
        batch = self._batch
        return KvUsage(used_tokens=len(batch) * batch.cache_length if batch is not None else 0, capacity=None)

    def release(self, seq_ids: Iterable[int]) -> None:
        batch = self._batch
        if batch is None:
            return
        gone = set(seq_ids)
        keep = [i for i, s in enumerate(batch.seq_ids) if s not in gone]
        if not keep:
            self._batch = None
        else:
            batch.keep(keep)

    def _in_order(self, seq_ids: list[int]) -> RunningBatch:
        """The running batch with its rows in ``seq_ids``' order (the engine's; normally already so)."""
        batch = self._batch
        if batch is None or sorted(batch.seq_ids) != sorted(seq_ids):
            raise RuntimeError("decode asked for sequences the runner does not hold")
        if batch.seq_ids != seq_ids:
            position = {s: i for i, s in enumerate(batch.seq_ids)}
            batch.keep([position[s] for s in seq_ids])
        return batch
