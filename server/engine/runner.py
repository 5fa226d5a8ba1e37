"""The model-runner seam: what the engine asks of a model implementation.

    Engine (scheduling, sampling, streaming, modes; knows nothing of Hugging Face)
      │  step([StepRow]) -> StepOutput                 the step plan: prompt chunks, decode rows
      │                                                (one token) and verify rows (last token +
      │                                                drafts) in one call; logits where asked
      │  commit(seq_id, accepted)                      a verify row's accepted drafts stay in KV
      │                                                memory, the rejected ones are rolled back
      │  release(seq_ids)                              finished / cancelled / preempted rows leave
      │  (prefill([PrefillInput]) / decode([DecodeInput]): the two plain forms, kept for callers
      │  that drive a runner directly)
      ▼
    ModelRunner (owns the weights, the KV memory and the forward passes)
      ├─ HFRunner          any Hugging Face causal LM (left-padded growable cache)
      └─ NativeLlamaRunner Llama / Mistral / Qwen2: fused projections, paged KV memory

A runner knows sequences by the engine's ``seq_id`` and keeps each one's KV state between calls.
Every input names the adapter slot its row reads (``BASE_SLOT``: none), so the merged mode can
send the merged adapter's rows as base rows, and the factor on that slot's update (``scale``, the
request's ``adapter_scale``), which the runner hands to its LoRA layers with the slots.

Adapters reach the runner's LoRA layers through :attr:`ModelRunner.lora_targets` (one
:class:`LoraTarget` per PEFT module name, ``model.layers.0.self_attn.q_proj``), which
:class:`~server.engine.lora_model.AdapterSlots` fills; the merge manager folds adapters into the
weights named by :attr:`ModelRunner.weight_targets`. A fused projection (q/k/v in one matrix)
exposes one target per PEFT name, each writing its own slice: the scheduler and the merge manager
never learn how a runner lays its weights out.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from adapters.peft_format import BaseLinearShape
from server.engine.lora import LoraBackend
from server.engine.lora.vocab import VocabAdapters


@dataclass(frozen=True)
class PrefillInput:
    """Tokens to add to a sequence's cache before it decodes.

    A runner whose ``supports_chunked_prefill`` is False gets whole prompts only (``start == 0``);
    one whose ``supports_prefix_cache`` is False never starts a sequence with a cached prefix.
    """

    seq_id: int
    token_ids: Sequence[int]  # the new tokens: a whole prompt, or the next chunk of one
    # the length of the prefix already in KV memory: earlier chunks, and the cached blocks the
    # sequence started with (ModelRunner.start_sequence); the new tokens take positions start, start+1, ...
    start: int
    slot: int  # adapter slot, BASE_SLOT for none
    want_token_logprobs: bool = False  # also return log p(token_ids[j] | everything before), j >= 1
    scale: float = 1.0  # factor on the slot's update for this row (the request's adapter_scale)
    top_n: int = 0  # with want_token_logprobs: also the top_n most likely tokens at each position


@dataclass
class PrefillOutput:
    logits: torch.Tensor  # [N, V] next-token logits after each input's last token, in input order
    # seq_id -> [len(token_ids) - 1] log-probabilities of token_ids[1:], for inputs that asked
    token_logprobs: dict[int, torch.Tensor] = field(default_factory=dict)
    # seq_id -> (logprobs [len - 1, top_n], token ids [len - 1, top_n]), for inputs with top_n > 0
    token_top: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def prompt_logprobs(
    output: PrefillOutput, item: PrefillInput, logits: torch.Tensor, tokens: Sequence[int]
) -> None:
    """Record log p(tokens[j+1] | tokens[:j+1]) (and the top ``item.top_n``) into ``output``.

    logits: [len(tokens) - 1, V], position j predicting tokens[j + 1].
    """
    if len(tokens) < 2:
        output.token_logprobs[item.seq_id] = logits.new_zeros(0, dtype=torch.float32)
        return
    logprobs = logits.float().log_softmax(-1)  # [n-1, V]
    targets = torch.tensor(list(tokens[1:]), device=logits.device)[:, None]  # [n-1, 1]
    output.token_logprobs[item.seq_id] = logprobs.gather(1, targets)[:, 0]  # [n-1]
    if item.top_n > 0:
        values, ids = logprobs.topk(min(item.top_n, logprobs.shape[-1]), dim=-1)  # [n-1, k] each
        output.token_top[item.seq_id] = (values, ids)


@dataclass(frozen=True)
class DecodeInput:
    seq_id: int
    token_id: int  # the token to append (the last one sampled)
    slot: int
    scale: float = 1.0  # factor on the slot's update for this row (the request's adapter_scale)


@dataclass(frozen=True)
class StepRow:
    """One row of a step plan: new tokens for one sequence, and which of them want logits.

    A prompt chunk (``want_token_logprobs``/``top_n`` as in :class:`PrefillInput`), a decode row
    (the last sampled token) or a verify row (the last sampled token + ``drafts`` proposed ones,
    speculative decoding): the runner treats them alike, writing every new token's K and V at
    positions ``start, start + 1, ...``. The last ``drafts`` tokens are provisional: the runner
    keeps them in KV memory only once :meth:`ModelRunner.commit` says how many were accepted.
    """

    seq_id: int
    token_ids: Sequence[int]  # the new tokens (at least one)
    start: int  # the length of the prefix already in KV memory
    slot: int  # adapter slot, BASE_SLOT for none
    scale: float = 1.0  # factor on the slot's update for this row (the request's adapter_scale)
    logits: int = 1  # logits for the last ``logits`` new tokens (prompt chunk, decode: 1; verify: all)
    drafts: int = 0  # trailing tokens that are proposals (verify rows), rolled back unless accepted
    decoding: bool = False  # a running row's last sampled token (+ drafts); False: a prompt chunk
    want_token_logprobs: bool = False  # a whole prompt: also log p(token_ids[j] | before), j >= 1
    top_n: int = 0  # with want_token_logprobs: also the top_n most likely tokens at each position

    def as_prefill(self) -> PrefillInput:
        return PrefillInput(
            self.seq_id,
            self.token_ids,
            self.start,
            self.slot,
            self.want_token_logprobs,
            self.scale,
            self.top_n,
        )


@dataclass
class StepOutput:
    """What a step returns: every row's asked-for logits, rows concatenated in plan order."""

    logits: torch.Tensor  # [sum of rows' ``logits``, V]
    counts: list[int]  # rows' ``logits``, in plan order
    # as in PrefillOutput, for prompt rows that asked
    token_logprobs: dict[int, torch.Tensor] = field(default_factory=dict)
    token_top: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def of(self, index: int) -> torch.Tensor:
        """Row ``index``'s logits: [its ``logits``, V], position order."""
        first = sum(self.counts[:index])
        return self.logits[first : first + self.counts[index]]

    @classmethod
    def join(cls, rows: Sequence[StepRow], parts: Sequence[tuple[Sequence[int], torch.Tensor]]) -> StepOutput:
        """Assemble from forwards over subsets: ``parts`` = (row indices, their logits concatenated)."""
        counts = [r.logits for r in rows]
        if (
            len(parts) == 1
            and list(parts[0][0]) == list(range(len(rows)))
            and len(parts[0][1]) == sum(counts)
        ):
            return cls(parts[0][1], counts)  # one forward, rows in order: no copy (a decode step)
        by_row: dict[int, torch.Tensor] = {}
        for indices, logits in parts:
            first = 0
            for i in indices:
                by_row[i] = logits[first : first + rows[i].logits]
                first += rows[i].logits
        return cls(torch.cat([by_row[i] for i in range(len(rows))]), counts)


@dataclass(frozen=True)
class PrefixHit:
    """A cached prefix a new sequence would start with: ``tokens`` long, of which ``revived_tokens``
    sit in blocks no sequence references now (reusing those takes them out of the memory that can
    be handed out, as allocating would: admission counts them like new tokens)."""

    tokens: int = 0
    revived_tokens: int = 0


@dataclass
class PrefixCacheStats:
    """Prefix-cache counters since start (/info, /metrics)."""

    lookups: int = 0  # sequences that looked for a cached prefix
    lookup_tokens: int = 0  # tokens they looked up (their prompts)
    hit_tokens: int = 0  # tokens found cached (not prefilled again)
    evictions: int = 0  # cached blocks taken back for other tokens
    cached_blocks: int = 0  # blocks registered now (in use or not)
    evictable_blocks: int = 0  # of those, referenced by no sequence (kept until memory is needed)


@dataclass(frozen=True)
class KvUsage:
    """The runner's KV memory, in tokens. ``capacity`` None: grows on demand (no budget)."""

    used_tokens: int
    capacity: int | None
    bytes_reserved: int = 0


class LoraTarget(Protocol):
    """One adaptable linear layer as PEFT names it: where an adapter's factors are placed."""

    in_features: int
    out_features: int
    fan_in_fan_out: bool  # the base weight is stored [in, out] (GPT-2 Conv1D)

    def set_slot(
        self,
        slot: int,
        A: torch.Tensor,
        B: torch.Tensor,
        scale: float,
        dora_factor: torch.Tensor | None = None,
    ) -> None:
        """Place an adapter's A: [r, in] and B: [out, r] with its scale in ``slot``; a DoRA
        adapter's g = m / ‖W + s·B·A‖_row ([out], ``server/engine/dora.py``) too."""

    def clear_slot(self, slot: int) -> None: ...


class WeightTarget:
    """A base weight the merge manager may fold an adapter into, and restore bit for bit.

    Laid out as in the checkpoint: ``[out, in]``, or ``[in, out]`` when ``fan_in_fan_out``. This
    class holds the live tensor the forward reads (for a fused projection: a view of its rows),
    which the merge manager updates in place. A runner that keeps a weight in another layout (the
    native runner's oneDNN-packed CPU weights) subclasses it: ``read`` and ``write`` convert, and
    ``live`` is None.
    """

    def __init__(self, weight: torch.Tensor, checkpoint_key: str, fan_in_fan_out: bool = False) -> None:
        # the tensor the forward reads, when it is dense in the checkpoint's layout (else None)
        self.live: torch.Tensor | None = weight
        self.checkpoint_key = checkpoint_key  # the tensor's name in the model's safetensors checkpoint
        self.fan_in_fan_out = fan_in_fan_out  # the base weight is stored [in, out] (GPT-2 Conv1D)
        self.shape, self.dtype, self.device = weight.shape, weight.dtype, weight.device

    def read(self) -> torch.Tensor:
        """The weight's values now; may be the live tensor itself (do not write into it)."""
        assert self.live is not None
        return self.live.detach()

    def write(self, values: torch.Tensor) -> None:
        """Set the weight to ``values`` (same shape); the forward reads them after ``flush``."""
        assert self.live is not None
        self.live.data.copy_(values)

    def flush(self) -> None:
        """Finish the writes (a runner that stages them, e.g. to repack once, applies them now)."""


class ModelRunner(ABC):
    """Owns a base model's weights, KV memory and forward passes. Engine thread only.

    A subclass sets ``_lora_targets`` and ``_weight_targets`` (and the attributes below) in its
    constructor.
    """

    name: str  # "hf" or "native": shown in /info
    lora_backend: LoraBackend  # applies unmerged adapters (server/engine/lora/): shown in /info
    device: torch.device
    dtype: torch.dtype
    vocab_size: int
    max_positions: int | None  # the model's context length, None when unknown
    supports_chunked_prefill: bool = False
    # prefix caching (native runner): full KV blocks shared between sequences of one identity
    supports_prefix_cache: bool = False
    # False where adapters cannot be folded into the weights (quantized bases): merged mode is
    # refused and auto mode stays unmerged
    can_merge: bool = True
    # verify rows (StepRow.drafts > 0) and commit(): speculative decoding can run on this runner
    supports_speculation: bool = False
    _lora_targets: Mapping[str, LoraTarget]
    _weight_targets: Mapping[str, WeightTarget]
    # adapters' own token embedding and LM head per row (modules_to_save, LoRA on them); None:
    # the runner serves none (such adapters are refused at upload)
    vocab: VocabAdapters | None = None

    @property
    def lora_targets(self) -> Mapping[str, LoraTarget]:
        """Adaptable layers by PEFT module name (output head excluded)."""
        return self._lora_targets

    @property
    def weight_targets(self) -> Mapping[str, WeightTarget]:
        """The base weight behind each of :attr:`lora_targets`, for merging."""
        return self._weight_targets

    @property
    def base_shapes(self) -> dict[str, BaseLinearShape]:
        """What adapters are validated against: each target's shape and layout, and the embedding
        and head when the runner serves adapters' own (``vocab``)."""
        shapes = {
            name: BaseLinearShape(
                out_features=t.out_features, in_features=t.in_features, fan_in_fan_out=t.fan_in_fan_out
            )
            for name, t in self.lora_targets.items()
        }
        if self.vocab is not None:
            v, h = self.vocab.vocab_size, self.vocab.hidden_size
            shapes[self.vocab.embed_name] = BaseLinearShape(out_features=h, in_features=v, kind="embedding")
            shapes[self.vocab.head_name] = BaseLinearShape(out_features=v, in_features=h, kind="head")
        return shapes

    def slots_changed(self) -> None:  # noqa: B027 - optional hook
        """Called after adapters were placed in or removed from slots (drop cached batch data)."""

    @abstractmethod
    def prefill(self, inputs: Sequence[PrefillInput]) -> PrefillOutput:
        """Add tokens to sequences' caches (new sequences are created); return their next-token logits."""

    @abstractmethod
    def decode(self, inputs: Sequence[DecodeInput]) -> torch.Tensor:
        """Append one token to each running sequence; return next-token logits [B, V] in input order."""

    def step(self, rows: Sequence[StepRow]) -> StepOutput:
        """Run one step plan: every row's new tokens join its sequence's KV memory (a sequence
        unknown to the runner is created by its first prompt chunk); returns the logits each row
        asked for. This form runs the decode rows, then the prompt rows, as two forwards; a runner
        that can do better (one forward, verify rows) overrides it."""
        if any(r.drafts for r in rows):
            raise ValueError(f"the {self.name} runner does not verify drafts (speculative decoding)")
        decoding = [i for i, r in enumerate(rows) if r.decoding]
        prompts = [i for i, r in enumerate(rows) if not r.decoding]
        parts: list[tuple[Sequence[int], torch.Tensor]] = []
        if decoding:
            inputs = [
                DecodeInput(rows[i].seq_id, rows[i].token_ids[0], rows[i].slot, rows[i].scale)
                for i in decoding
            ]
            parts.append((decoding, self.decode(inputs)))
        extra = PrefillOutput(logits=torch.empty(0))
        if prompts:
            extra = self.prefill([rows[i].as_prefill() for i in prompts])
            parts.append((prompts, extra.logits))
        output = StepOutput.join(rows, parts)
        output.token_logprobs, output.token_top = extra.token_logprobs, extra.token_top
        return output

    def commit(self, seq_id: int, accepted: int) -> None:
        """After a verify row: keep its first ``accepted`` drafts in KV memory, roll back the rest."""
        raise NotImplementedError(f"the {self.name} runner has no speculative decoding")

    def can_grow(self, growth: Mapping[int, int]) -> bool:
        """True when each sequence (seq_id -> new tokens; unknown ids start empty) can take that
        many more tokens at once without preempting anyone."""
        return True

    @abstractmethod
    def release(self, seq_ids: Iterable[int]) -> None:
        """Forget these sequences and free their KV memory (unknown ids are ignored)."""

    def kv_usage(self) -> KvUsage:
        return KvUsage(used_tokens=0, capacity=None)

    def can_admit(self, num_tokens: int, num_sequences: int = 1) -> bool:
        """True when ``num_tokens`` more prompt tokens, over ``num_sequences`` sequences, fit in free
        KV memory now."""
        return True

    def can_decode(self, seq_ids: Sequence[int]) -> bool:
        """True when each of these sequences can grow by one token without preempting anyone."""
        return True

    # ------------------------------------------------------------------ prefix caching (optional)

    def cached_prefix(self, identity: str, token_ids: Sequence[int]) -> PrefixHit:
        """The cached prefix ``start_sequence`` would reuse now for these tokens (nothing taken)."""
        return PrefixHit()

    def start_sequence(self, seq_id: int, identity: str | None, token_ids: Sequence[int] = ()) -> int:
        """Create a sequence whose K and V are computed by ``identity`` (what may share them: the
        base, or one adapter version at one scale; None: never shared), already holding the longest
        cached prefix of ``token_ids`` (never all of them: the last token is prefilled for its
        logits). Returns that prefix's length: the sequence's first ``PrefillInput.start``.
        A runner without prefix caching creates sequences at their first prefill and returns 0."""
        return 0

    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        """Counters of the prefix cache; None when the runner has none."""
        return None
