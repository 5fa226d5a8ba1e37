"""``GET /adapters/{id}/probe``: does the adapter change what the model does, and how much?

For a few built-in prompts (and up to ``MAX_CALLER_PROMPTS`` of the caller's, ``?prompt=``), the
engine reads each prompt once with the adapter and once without (one token generated, greedy),
and keeps the full next-token distribution at every prompt position (``want_prompt_distributions``).
Per position j (predicting token j + 1), with p the adapter's and q the base's distribution:

    KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)         top-1 agreement: argmax p == argmax q

The answer gives their means over every position of every prompt (``mean_kl``, nats per token;
``top1_agreement``, a fraction), ``tokens`` (the positions counted) and the same per prompt. An
adapter whose every lora_B is zero gives KL 0 and agreement 1 exactly (its rows compute the
base's logits). The rows run through the engine like any request (they batch with others, and the
merged mode's switches apply), so a probe never touches the model outside the engine thread.

Results are kept per adapter version (``id@version``) and prompt list: a replaced adapter is
probed anew; ``cached`` says whether this answer was computed before.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Path, Query, Request
from pydantic import StringConstraints

from adapters.peft_format import LoraAdapter
from server.api.adapters import stored_record
from server.api.deps import EngineDep, StoreDep
from server.api.errors import ApiError, adapter_not_found
from server.api.generation import run_many, tokenize_off_loop
from server.api.openapi_errors import DESCRIPTIONS
from server.api.schemas import ErrorResponse
from server.engine.engine import Engine
from server.engine.requests import GenerationRequest
from server.engine.sampling import SamplingParams

router = APIRouter(tags=["analysis"])

BUILTIN_PROMPTS = (
    "The capital of France is Paris, and the capital of Italy is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Once upon a time, in a small village at the edge of a forest, there lived",
    "Question: What is 12 times 7?\nAnswer: 12 times 7 is",
)
MAX_CALLER_PROMPTS = 4
MAX_PROMPT_CHARS = 2000
# per prompt (and at most what the server reads): each position keeps a [V] float32 distribution per
# run (64 x 49152 x 4 B = 12.6 MB on the embedded model), all prompts at once
MAX_PROMPT_TOKENS = 64
MEMO_ENTRIES = 64
AdapterIdPath = Annotated[str, Path(description="Adapter id.")]


class ProbeMemo:
    """Finished probes by (adapter key, prompts), LRU. Thread-safe."""

    def __init__(self, capacity: int = MEMO_ENTRIES) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, tuple[str, ...]], dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, tuple[str, ...]]) -> dict[str, Any] | None:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def put(self, key: tuple[str, tuple[str, ...]], value: dict[str, Any]) -> None:
        with self._lock:
            self._entries[key] = value
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)


def compare_distributions(
    adapter_logp: torch.Tensor, base_logp: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: KL(adapter ‖ base) in nats, clamped at 0 (rounding), and top-1 agreement.

    adapter_logp, base_logp: [n, V] log-probabilities -> ([n] float64, [n] bool).
    """
    p_log = adapter_logp.to(torch.float64)  # [n, V]
    q_log = base_logp.to(torch.float64)  # [n, V]
    p = p_log.exp()
    # 0 · log 0 = 0: positions where p is 0 (log p = -inf) contribute nothing
    terms = torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p))  # [n, V]
    kl = terms.sum(-1).clamp_min(0.0)  # [n]
    agree = adapter_logp.argmax(-1) == base_logp.argmax(-1)  # [n]
    return kl, agree


def _probe_request(engine: Engine, prompt_ids: list[int], adapter: LoraAdapter | None) -> GenerationRequest:
    request = GenerationRequest(
        prompt_ids=prompt_ids,
        params=SamplingParams(max_new_tokens=1),
        adapter=adapter,
        want_prompt_logprobs=True,
        want_prompt_distributions=True,
    )
    engine.validate(request)
    return request


def _summary(kls: list[torch.Tensor], agrees: list[torch.Tensor]) -> dict[str, Any]:
    """Means over every position; None where no position was counted (a one-token prompt)."""
    kl, agree = torch.cat(kls), torch.cat(agrees)
    tokens = int(kl.numel())
    return {
        "mean_kl": float(kl.mean()) if tokens else None,
        "max_kl": float(kl.max()) if tokens else None,
        "top1_agreement": float(agree.double().mean()) if tokens else None,
        "tokens": tokens,
    }


async def run_probe(
    engine: Engine, adapter: LoraAdapter, prompts: list[str], http_request: Request, track: Any
) -> dict[str, Any]:
    """Run the base and the adapter on every prompt (all in one go: they batch) and compare."""
    cfg = engine.config
    keep = max(1, min(MAX_PROMPT_TOKENS, cfg.max_input_tokens, cfg.max_total_tokens - 1))
    capacity = engine.describe().kv.capacity_tokens
    if capacity is not None:
        keep = max(1, min(keep, capacity - 1))
    prompt_ids = []
    for text in prompts:  # a prompt is cut to what the server reads; one token gives no position
        ids = (await tokenize_off_loop(engine, text))[:keep]
        prompt_ids.append(ids or [engine.tokenizer.eos_token_id or 0])
    requests: list[GenerationRequest] = []
    for ids in prompt_ids:
        requests += [_probe_request(engine, ids, adapter), _probe_request(engine, ids, None)]
    track(requests[0], adapter)  # keep the version's files while the probe runs
    finishes = await run_many(engine, requests, http_request)
    kls, agrees, per_prompt = [], [], []
    for i, text in enumerate(prompts):
        mine, base = finishes[2 * i].prompt_distributions, finishes[2 * i + 1].prompt_distributions
        if len(prompt_ids[i]) < 2:  # no position predicts a prompt token
            kl, agree = torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool)
        elif mine is None or base is None:
            raise ApiError(500, "the engine returned no prompt distributions for the probe", "internal")
        else:
            kl, agree = await asyncio.to_thread(compare_distributions, mine, base)
        kls.append(kl)
        agrees.append(agree)
        per_prompt.append({"prompt": text, **_summary([kl], [agree])})
    return {**_summary(kls, agrees), "prompts": per_prompt}


def _memo(request: Request) -> ProbeMemo:
    state = request.app.state
    memo = getattr(state, "probe_memo", None)
    if memo is None:
        memo = state.probe_memo = ProbeMemo()
    return memo


@router.get(
    "/adapters/{adapter_id}/probe",
    # its rows run like generation requests: a failed step fails them (424), as on /generate
    responses={424: {"description": DESCRIPTIONS[424], "model": ErrorResponse}},
)
async def probe_adapter(
    adapter_id: AdapterIdPath,
    request: Request,
    store: StoreDep,
    engine: EngineDep,
    prompt: Annotated[
        list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_PROMPT_CHARS)]] | None,
        Query(
            max_length=MAX_CALLER_PROMPTS,
            description=f"Your own prompts (up to {MAX_CALLER_PROMPTS}, each up to {MAX_PROMPT_CHARS} "
            "characters), probed after the built-in ones.",
        ),
    ] = None,
) -> dict:
    """Mean per-token KL(adapter ‖ base) and top-1 agreement with the base over a few built-in prompts
    (and yours), with the tokens used; cached per adapter version."""
    stored_record(store, adapter_id)
    adapter = await store.aget(adapter_id)
    if adapter is None:  # deleted meanwhile
        raise adapter_not_found(adapter_id)
    prompts = [*BUILTIN_PROMPTS, *(prompt or [])]
    key = (adapter.key, tuple(prompts))
    memo = _memo(request)
    found = memo.get(key)
    cached = found is not None
    if found is None:
        found = await run_probe(engine, adapter, prompts, request, store.track)
        memo.put(key, found)
    return {"adapter_id": adapter_id, "version": adapter.version, "cached": cached, **found}
