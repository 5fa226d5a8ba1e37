"""grammar.py and its use by the sampler and the engine: JSON-schema masks per row (real tokenizer,
tiny random model)."""

from __future__ import annotations

import copy
import json

import jsonschema
import numpy as np
import pytest
import torch

from server.engine.engine import Engine, EngineConfig
from server.engine.grammar import GrammarCompiler, GrammarError, TokenMask, unpack_bitmask
from server.engine.requests import GenerationRequest
from server.engine.sampling import RowSampler, SamplingParams, choose_next_tokens
from tests.engine_helpers import outcome, run_one
from tests.unit.test_engine import BoundedRunner

EOS = 2  # the embedded tokenizer's <|im_end|>, the tiny model's eos_token_id
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "viewer"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}
PROMPTS = ["Hello there, how are", "The quick brown fox", "A", "Once upon a time", "JSON:", "{"]


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, len(tokenizer), [EOS])


def _allowed(compiler: GrammarCompiler, row) -> torch.Tensor:
    mask = compiler.mask([row], compiler.vocab_size)
    assert mask is not None and mask.rows == [0]
    return mask.allowed[0]  # [V] bool


def test_the_mask_follows_a_valid_document_and_allows_eos_only_at_its_end(compiler, tokenizer) -> None:
    row = compiler.matcher(compiler.compile_json_schema(SCHEMA))
    text = '{"name": "Ada", "age": 36, "role": "admin", "tags": [true, false]}'
    path = tokenizer(text, add_special_tokens=False)["input_ids"]
    first = _allowed(compiler, row).nonzero().flatten().tolist()
    assert [tokenizer.decode([t]) for t in first] == ['{"']  # '{"name": "' is forced: its first token
    for token in path:
        allowed = _allowed(compiler, row)
        assert allowed[token], tokenizer.decode([token])
        assert not allowed[EOS] and not row.accepting
        assert row.consume(token) is None
    assert row.accepting
    assert _allowed(compiler, row).nonzero().flatten().tolist() == [EOS]  # nothing may follow "}"


def test_a_token_the_grammar_refuses_is_reported(compiler, tokenizer) -> None:
    row = compiler.matcher(compiler.compile_json_schema(SCHEMA))
    letter = tokenizer("x", add_special_tokens=False)["input_ids"][0]
    assert not _allowed(compiler, row)[letter]
    assert row.consume(letter)  # an error message, not an exception
    assert row.consume(EOS) is None  # EOS never advances the grammar (it ends the row)


def test_json_object_without_a_schema_is_any_object(compiler, tokenizer) -> None:
    row = compiler.matcher(compiler.compile_json_schema(None))
    text = '{"a": [1, {"b": null}], "c": "d"}'
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        assert _allowed(compiler, row)[token] and row.consume(token) is None
    assert row.accepting
    start = compiler.matcher(compiler.compile_json_schema(None))
    first = _allowed(compiler, start).nonzero().flatten().tolist()
    assert sorted(tokenizer.decode([t]) for t in first) == ["{", '{"', "{}"]  # an object, nothing else


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "strin"}, "Invalid type: strin"),
        ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength (5) is greater than maxLength (2)"),
        ({"properties": {"a": {"$ref": "#/$defs/missing"}}}, "/$defs/missing"),
        ({"type": "string", "pattern": "(("}, "unclosed group"),
        ({"type": 3}, "type must be"),
    ],
)
def test_an_invalid_schema_raises_with_the_engines_message(compiler, schema, message) -> None:
    with pytest.raises(GrammarError, match="invalid JSON schema") as info:
        compiler.compile_json_schema(schema)
    assert message in str(info.value)


def test_unpack_bitmask_matches_the_bit_layout() -> None:
    rng = np.random.default_rng(0)
    words = rng.integers(-(2**31), 2**31, size=(3, 5), dtype=np.int64).astype(np.int32)  # [b, W]
    vocab = 150  # not a multiple of 32: the tail is cut
    got = unpack_bitmask(words, vocab)
    expected = torch.tensor(
        [[bool((int(words[r, t // 32]) >> (t % 32)) & 1) for t in range(vocab)] for r in range(3)]
    )
    assert got.shape == (3, vocab) and torch.equal(got, expected)


def test_the_sampler_applies_a_rows_mask_to_that_row_only() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 10)  # [B, V]
    cpu = torch.device("cpu")
    greedy = [RowSampler.create(SamplingParams(), cpu) for _ in range(3)]
    free = choose_next_tokens(logits, greedy, [torch.tensor([0])] * 3)
    allowed = torch.zeros(1, 10, dtype=torch.bool)
    allowed[0, [3, 7]] = True
    masked = choose_next_tokens(logits, greedy, [torch.tensor([0])] * 3, mask=TokenMask([1], allowed))
    assert masked.tokens[[0, 2]].tolist() == free.tokens[[0, 2]].tolist()  # free rows: unchanged
    assert masked.tokens[1].item() == max((3, 7), key=lambda t: logits[1, t].item())
    assert masked.logprobs[1].item() == torch.log_softmax(logits[1], -1)[masked.tokens[1]].item()  # unmasked
    for seed in range(30):  # sampling with warpers and penalties picks among the allowed tokens only
        params = SamplingParams(do_sample=True, temperature=1.5, top_k=5, repetition_penalty=1.3, seed=seed)
        sampler = [RowSampler.create(params, cpu)]
        chosen = choose_next_tokens(logits[1:2], sampler, [torch.tensor([3])], mask=TokenMask([0], allowed))
        assert chosen.tokens.item() in (3, 7)


def _engine(model, tokenizer, runner=None) -> Engine:
    if runner is not None:
        return Engine(runner, tokenizer, EngineConfig(mode="unmerged"))
    return Engine.for_hf_model(model, tokenizer, EngineConfig(mode="unmerged"))


def _constrained(engine: Engine, tokenizer, prompt: str, grammar, **params) -> tuple[GenerationRequest, list]:
    events: list = []
    request = GenerationRequest(
        prompt_ids=tokenizer(prompt)["input_ids"],
        params=SamplingParams(**params),
        adapter=None,
        sink=events.append,
        grammar=grammar,
    )
    engine.submit(request)
    return request, events


def test_constrained_and_free_rows_share_a_batch(tiny_base, tokenizer) -> None:
    """Every constrained row validates against the schema and ends with EOS; the free rows of the
    same batch produce what they produce alone."""
    engine = _engine(copy.deepcopy(tiny_base), tokenizer)
    grammar = engine.grammars.compile_json_schema(SCHEMA)
    free_alone = [run_one(engine, tokenizer(p)["input_ids"], max_new_tokens=12).tokens for p in PROMPTS]
    constrained = [
        _constrained(engine, tokenizer, p, grammar, max_new_tokens=80, do_sample=i % 2 == 1, seed=i)[1]
        for i, p in enumerate(PROMPTS)
    ]
    free = [_constrained(engine, tokenizer, p, None, max_new_tokens=12)[1] for p in PROMPTS]
    engine.run_until_idle()
    assert engine.stats.peak_batch == 2 * len(PROMPTS)  # all in one batch
    assert [outcome(events).tokens for events in free] == free_alone
    for events in constrained:
        finish = outcome(events).finish
        assert finish is not None and finish.finish_reason == "eos_token", finish
        jsonschema.validate(json.loads(finish.generated_text), SCHEMA)
    texts = {outcome(events).finish.generated_text for events in constrained}
    assert len(texts) > 1  # each row has its own grammar state (and its own output)


def test_the_length_limit_cuts_a_constrained_row(tiny_base, tokenizer) -> None:
    engine = _engine(copy.deepcopy(tiny_base), tokenizer)
    grammar = engine.grammars.compile_json_schema(SCHEMA)
    _, events = _constrained(engine, tokenizer, PROMPTS[0], grammar, max_new_tokens=4)
    engine.run_until_idle()
    finish = outcome(events).finish
    assert finish.finish_reason == "length" and finish.generated_text.startswith('{"')
    with pytest.raises(json.JSONDecodeError):
        json.loads(finish.generated_text)


def test_preempted_constrained_rows_keep_their_grammar_state(tiny_base, tokenizer) -> None:
    """A row preempted (KV memory full) and recomputed goes on in its grammar where it stopped."""
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
              "name": {"type": "string", "maxLength": 4}}, "required": ["n", "name"],
              "additionalProperties": False}  # fmt: skip
    engine = _engine(copy.deepcopy(tiny_base), tokenizer)
    grammar = engine.grammars.compile_json_schema(schema)
    params = [dict(max_new_tokens=24), dict(max_new_tokens=24, do_sample=True, seed=7, temperature=0.9)]
    solo = []
    for i, prompt in enumerate(PROMPTS[:3]):
        _, events = _constrained(engine, tokenizer, prompt, grammar, **params[i % 2])
        engine.run_until_idle()
        solo.append(outcome(events).tokens)
    bounded = _engine(None, tokenizer, BoundedRunner(copy.deepcopy(tiny_base), capacity=40))
    pending = [
        _constrained(bounded, tokenizer, p, grammar, **params[i % 2])[1] for i, p in enumerate(PROMPTS[:3])
    ]
    bounded.run_until_idle()
    assert bounded.stats.preemptions >= 1
    assert [outcome(events).tokens for events in pending] == solo
    for events in pending:
        finish = outcome(events).finish
        assert finish.finish_reason == "eos_token"
        jsonschema.validate(json.loads(finish.generated_text), schema)
