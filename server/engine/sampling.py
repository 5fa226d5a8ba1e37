"""Per-row next-token choice: greedy, temperature, top-k, top-p, repetition penalty, seeds.

Follows TGI's semantics so LoRAX/TGI clients behave as they expect: sampling is on when
``do_sample`` is true *or* any warper (temperature != 1, top_k, top_p < 1) is set; the
repetition penalty (CTRL paper, as in HF) applies to greedy rows too. A row that samples
owns a ``torch.Generator`` seeded with its seed, so the same seed gives the same tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks), as vLLM's ignore_eos

    @property
    def samples(self) -> bool:
        warped = (
            (self.temperature is not None and self.temperature != 1.0)
            or (self.top_k is not None and self.top_k > 0)
            or (self.top_p is not None and self.top_p < 1.0)
        )
        return self.do_sample or warped


@dataclass
class RowSampler:
    """Sampling state of one running row."""

    params: SamplingParams
    seed: int | None = None  # the seed actually used (drawn when sampling without one)
    generator: torch.Generator | None = field(default=None, repr=False)

    @classmethod
    def create(cls, params: SamplingParams, device: torch.device) -> RowSampler:
        if not params.samples:
            return cls(params=params)
        seed = params.seed if params.seed is not None else random.randrange(2**63)
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        return cls(params=params, seed=seed, generator=generator)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already in the prompt or output. logits: [V], seen: [n]."""
    picked = logits.gather(0, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(0, seen, picked)


def _warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p, on one row's logits [V]."""
    if params.temperature is not None and params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k is not None and 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= params.top_p  # keep the token that crosses p
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    return logits


def choose_next_tokens(
    logits: torch.Tensor,
    samplers: list[RowSampler],
    seen_tokens: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row.

    logits: [B, V] (last position); seen_tokens[i]: [n_i] prompt + generated ids of row i.
    Returns (token ids [B], log-probabilities [B] of those tokens under the model's own
    distribution, before any penalty or warper).
    """
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)  # [B, V]
    chosen = logits.argmax(dim=-1)  # [B]; greedy rows without penalty are done
    for i, sampler in enumerate(samplers):
        params = sampler.params
        penalised = params.repetition_penalty is not None and params.repetition_penalty != 1.0
        if not penalised and not params.samples:
            continue
        row = logits[i]
        if penalised:
            row = apply_repetition_penalty(row, seen_tokens[i], params.repetition_penalty)  # type: ignore[arg-type]
        if params.samples:
            probs = _warp(row, params).softmax(-1)
            chosen[i] = torch.multinomial(probs, 1, generator=sampler.generator)[0]
        else:
            chosen[i] = row.argmax()
    picked_logprobs = logprobs.gather(1, chosen[:, None])[:, 0]
    return chosen, picked_logprobs
