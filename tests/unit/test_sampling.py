"""sampling.py: typical-p against HF's warper, OpenAI's penalties, top log-probabilities."""

from __future__ import annotations

import torch
from transformers.generation.logits_process import TypicalLogitsWarper

from server.engine.sampling import (
    RowSampler,
    SamplingParams,
    _typical,
    apply_output_penalties,
    choose_next_tokens,
    top_logprobs,
)


def test_typical_keeps_what_hf_keeps() -> None:
    torch.manual_seed(0)
    for mass in (0.2, 0.5, 0.9, 0.99):
        logits = torch.randn(100) * 3
        ours = torch.isfinite(_typical(logits, mass))
        theirs = torch.isfinite(TypicalLogitsWarper(mass)(None, logits[None].clone())[0])
        assert torch.equal(ours, theirs), mass


def test_output_penalties_are_openais() -> None:
    logits = torch.zeros(5)
    out = apply_output_penalties(logits, [1, 1, 3], frequency=0.5, presence=0.25)
    assert out.tolist() == [0.0, -1.25, 0.0, -0.75, 0.0]
    assert apply_output_penalties(logits, [], 1.0, 1.0) is logits


def test_frequency_penalty_changes_greedy_choice() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.9]])
    plain = SamplingParams()
    penalised = SamplingParams(frequency_penalty=1.0)
    seen = [torch.tensor([0])]
    assert (
        choose_next_tokens(logits, [RowSampler.create(plain, torch.device("cpu"))], seen, [[1]]).tokens.item()
        == 1
    )
    chosen = choose_next_tokens(logits, [RowSampler.create(penalised, torch.device("cpu"))], seen, [[1]])
    assert chosen.tokens.item() == 2
    assert chosen.logprobs.item() == torch.log_softmax(logits, -1)[0, 2].item()  # raw distribution


def test_top_logprobs_per_row() -> None:
    logprobs = torch.log_softmax(torch.tensor([[0.0, 3.0, 1.0, 2.0], [1.0, 0.0, 0.0, 0.0]]), -1)
    top = top_logprobs(logprobs, [2, 0])
    assert [i for i, _ in top[0]] == [1, 3] and top[1] == []
    assert top_logprobs(logprobs, None) == [[], []]


def test_overflowing_temperature_is_greedy() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    params = SamplingParams(do_sample=True, temperature=5e-324, seed=1)
    chosen = choose_next_tokens(logits, [RowSampler.create(params, torch.device("cpu"))], [torch.tensor([0])])
    assert chosen.tokens.item() == 1
