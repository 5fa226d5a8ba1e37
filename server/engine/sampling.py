"""Per-row next-token choice: greedy, temperature, top-k, top-p, typical-p, penalties, seeds.

Follows TGI's semantics so LoRAX/TGI clients behave as they expect: sampling is on when
``do_sample`` is true *or* any warper (temperature != 1, top_k, top_p < 1, typical_p < 1) is
set; the penalties (repetition: CTRL paper, as in HF; frequency and presence: OpenAI's, over
the generated tokens) apply to greedy rows too. A row that samples owns a ``torch.Generator``
seeded with its seed, so the same seed gives the same tokens.

Reported log-probabilities (the chosen token's, and the top-n alternatives) are all taken from
one distribution: the log-softmax of the model's raw logits, before penalties and warpers. So
the chosen token's log-probability equals its entry among the alternatives, and a value does not
change with the sampling settings.

Speculative decoding (``speculative.py``) hands each row a draft token for the position, or None:
a greedy row's choice is its argmax as always (the engine accepts the draft when they agree); a
sampling row accepts the draft ``d`` with probability ``p(d)``, ``p`` its processed distribution
(penalties, mask and warpers applied), and otherwise samples from ``p`` with ``d`` removed. For a
deterministic draft this is speculative sampling's rule (Leviathan et al. 2023, Chen et al. 2023:
accept with min(1, p(d)/q(d)), q = 1 at d; on rejection sample from (p - q)+ normalised) and the
token is distributed exactly as ``p``: P(d) = p(d), P(x != d) = (1 - p(d)) p(x) / (1 - p(d)).

Structured output (``grammar.py``) hands a mask of the tokens each row's grammar allows; it
applies to the row's logits first, before penalties, warpers and the choice (so top-k and top-p
choose among allowed tokens). Reported log-probabilities stay the model's, unmasked.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from server.engine.grammar import TokenMask


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
    typical_p: float | None = None  # typical decoding mass (Meister et al. 2022), as HF's warper
    frequency_penalty: float | None = None  # logit -= f * count(token in the output so far)
    presence_penalty: float | None = None  # logit -= p if the token is in the output so far

    @property
    def samples(self) -> bool:
        warped = (
            (self.temperature is not None and self.temperature != 1.0)
            or (self.top_k is not None and self.top_k > 0)
            or (self.top_p is not None and self.top_p < 1.0)
            or (self.typical_p is not None and self.typical_p < 1.0)
        )
        return self.do_sample or warped

    @property
    def penalises_output(self) -> bool:
        """Frequency or presence penalty: the row's generated tokens change its logits."""
        return bool(self.frequency_penalty) or bool(self.presence_penalty)


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


def apply_output_penalties(
    logits: torch.Tensor, generated: Sequence[int], frequency: float | None, presence: float | None
) -> torch.Tensor:
    """OpenAI's frequency and presence penalties over the tokens generated so far. logits: [V]."""
    if not generated:
        return logits
    counts = torch.zeros_like(logits)
    counts.scatter_add_(0, torch.tensor(list(generated), device=logits.device), torch.ones(len(generated),
                        device=logits.device))  # fmt: skip
    return logits - (frequency or 0.0) * counts - (presence or 0.0) * (counts > 0).to(logits.dtype)


def _typical(logits: torch.Tensor, mass: float) -> torch.Tensor:
    """Keep the tokens whose surprisal is closest to the entropy, up to ``mass`` (at least one). [V]"""
    logp = logits.log_softmax(-1)
    p = logp.exp()
    entropy = -(logp * p).nansum()
    distance = (-logp - entropy).abs()
    sorted_distance, order = torch.sort(distance)
    cumulative = p[order].cumsum(-1)
    last = int((cumulative < mass).sum().clamp(max=logits.shape[-1] - 1))
    drop_sorted = sorted_distance > sorted_distance[last]
    return logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))


def _warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p, then typical-p (HF's order), on one row's logits [V]."""
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
    if params.typical_p is not None and params.typical_p < 1.0:
        logits = _typical(logits, params.typical_p)
    return logits


class NextTokens(NamedTuple):
    tokens: torch.Tensor  # [B] chosen ids
    logprobs: torch.Tensor  # [B] their log-probabilities (raw distribution, see the module docstring)
    top: list[list[tuple[int, float]]]  # per row: its top_n (id, log-probability), most likely first


def choose_next_tokens(
    logits: torch.Tensor,
    samplers: list[RowSampler],
    seen_tokens: list[torch.Tensor],
    generated: Sequence[Sequence[int]] | None = None,
    top_n: Sequence[int] | None = None,
    mask: TokenMask | None = None,
    drafts: Sequence[int | None] | None = None,
) -> NextTokens:
    """Pick one token per row.

    logits: [B, V] (last position); seen_tokens[i]: [n_i] prompt + generated ids of row i (for the
    repetition penalty); generated[i]: the ids row i generated so far (frequency and presence
    penalties; needed only by rows that use them); top_n[i]: how many most likely tokens to report
    for row i (0: none); mask: the tokens the grammar of each constrained row allows (structured
    output); the other rows' logits are not touched; drafts[i]: a proposed token for row i
    (speculative decoding; see the module docstring), chosen back exactly when it is accepted.
    """
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)  # [B, V]
    chosen = logits.argmax(dim=-1)  # [B]; greedy rows without penalty are done
    masked: dict[int, torch.Tensor] = {}  # constrained row -> its logits, disallowed tokens at -inf [V]
    if mask is not None:
        rows = torch.tensor(mask.rows, device=logits.device)
        constrained = logits[rows].masked_fill(~mask.allowed.to(logits.device), float("-inf"))  # [b, V]
        chosen[rows] = constrained.argmax(dim=-1)
        masked = dict(zip(mask.rows, constrained, strict=True))
    for i, sampler in enumerate(samplers):
        params = sampler.params
        penalised = params.repetition_penalty is not None and params.repetition_penalty != 1.0
        if not penalised and not params.samples and not params.penalises_output:
            continue
        row = masked.get(i, logits[i])
        if penalised:
            row = apply_repetition_penalty(row, seen_tokens[i], params.repetition_penalty)  # type: ignore[arg-type]
        if params.penalises_output and generated is not None:
            row = apply_output_penalties(row, generated[i], params.frequency_penalty, params.presence_penalty)
        if params.samples:
            warped = _warp(row, params)
            probs = warped.softmax(-1)
            draft = drafts[i] if drafts is not None else None
            if torch.isfinite(probs).all() and draft is not None:
                chosen[i] = _speculative_sample(probs, draft, sampler.generator)
            elif torch.isfinite(probs).all():
                chosen[i] = torch.multinomial(probs, 1, generator=sampler.generator)[0]
            else:  # extreme settings (a temperature near 0) overflow: their limit is greedy
                chosen[i] = warped.nan_to_num(nan=float("-inf")).argmax()
        else:
            chosen[i] = row.argmax()
    picked_logprobs = logprobs.gather(1, chosen[:, None])[:, 0]
    return NextTokens(chosen, picked_logprobs, top_logprobs(logprobs, top_n))


def _speculative_sample(probs: torch.Tensor, draft: int, generator: torch.Generator | None) -> int:
    """probs: [V] the processed distribution -> ``draft`` with probability probs[draft], else a
    token drawn from probs without ``draft`` (renormalised): distributed exactly as probs."""
    accept = float(probs[draft])
    u = float(torch.rand((), generator=generator, device=probs.device))
    if u < accept:
        return draft
    rest = probs.clone()
    rest[draft] = 0.0
    if not float(rest.sum()) > 0.0:  # p(draft) == 1 up to rounding: nothing else can be drawn
        return draft
    return int(torch.multinomial(rest, 1, generator=generator)[0])


def top_logprobs(logprobs: torch.Tensor, top_n: Sequence[int] | None) -> list[list[tuple[int, float]]]:
    """logprobs: [B, V] -> per row the ``top_n[i]`` most likely (id, log-probability); [] for 0."""
    rows = logprobs.shape[0]
    if not top_n or not any(top_n):
        return [[] for _ in range(rows)]
    k = min(max(top_n), logprobs.shape[-1])
    values, ids = torch.topk(logprobs, k, dim=-1)  # [B, k], sorted, most likely first
    values, ids = values.tolist(), ids.tolist()
    return [list(zip(ids[i][: top_n[i]], values[i][: top_n[i]], strict=True)) for i in range(rows)]
