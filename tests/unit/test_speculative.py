"""Speculative decoding (issue 27): verify rows in the native runner, acceptance, rollback, sampling.

A tiny random model does not copy its prompt, so prompt lookup rarely proposes anything there; the
engine tests swap in an *oracle* draft source (``Oracle``) that proposes a job's reference
continuation with every few tokens wrong, so each step meets accepted and rejected drafts, block
boundaries crossed by rejected ones, and rows that end mid-verify. Real prompt lookup on a model
that copies runs in ``tests/integration/test_speculative_embedded.py``.
"""

from __future__ import annotations

import copy
import random
from collections import Counter
from typing import ClassVar

import pytest
import torch
from scipy.stats import chi2_contingency, chisquare
from transformers import AutoModelForCausalLM

from adapters.compose import CompositionSpec, compose
from adapters.peft_format import LoraAdapter, load_adapter_dir
from server.engine import engine as engine_module
from server.engine.engine import Engine, EngineConfig
from server.engine.native import NativeLlamaRunner
from server.engine.native.kv_cache import PagedKVCache
from server.engine.requests import FinishEvent, GenerationRequest, TokenEvent
from server.engine.sampling import RowSampler, SamplingParams, choose_next_tokens
from server.engine.speculative import DraftLength, PromptLookup
from tests.conftest import tiny_llama_config
from tests.engine_helpers import outcome, submit
from tests.prom import metric_value

ADAPTERS = {
    "all": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "qv": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "patterns": dict(
        r=8, lora_alpha=16, target_modules=["k_proj", "o_proj", "down_proj", "up_proj"],
        rank_pattern={"o_proj": 2}, alpha_pattern={"up_proj": 5.0},
    ),
}  # fmt: skip
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


class Oracle:
    """A draft source knowing each prompt's reference continuation (``answers``): it proposes it,
    with the token at every continuation index ``i % 5 == 3`` replaced by a wrong one."""

    answers: ClassVar[dict[tuple[int, ...], list[int]]] = {}

    def __init__(self, tokens) -> None:
        self.prompt = tuple(tokens)
        self.tokens = list(tokens)

    def extend(self, tokens) -> None:
        self.tokens.extend(tokens)

    def propose(self, limit: int) -> list[int]:
        reference = self.answers.get(self.prompt, [])
        done = len(self.tokens) - len(self.prompt)
        return [t if (done + j) % 5 != 3 else t + 1 for j, t in enumerate(reference[done : done + limit])]


@pytest.fixture
def oracle(monkeypatch):
    Oracle.answers = {}
    monkeypatch.setattr(engine_module, "PromptLookup", Oracle)
    return Oracle.answers


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tokenizer):
    torch.manual_seed(2718)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer))).eval()
    path = tmp_path_factory.mktemp("speculative-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, path


def _engine(path, tokenizer, speculate: int, tokens: int = 4096, **config) -> Engine:
    config.setdefault("mode", "unmerged")
    config.setdefault("speculate_max_batch", 512)  # these tests verify drafts in large batches too
    runner = NativeLlamaRunner(path, kv_cache_tokens=tokens)
    return Engine(runner, tokenizer, EngineConfig(speculate=speculate, **config))


def _prompt(seed: int, n: int = 12) -> list[int]:
    rng = random.Random(seed)
    return [1] + [rng.randrange(3, 2000) for _ in range(n - 1)]


def check_accounting(kv: PagedKVCache) -> None:
    """Every block is free, cached-unreferenced, or held; a held block's count is its holders; each
    sequence holds exactly the blocks its length needs."""
    holders: Counter[int] = Counter(b for s in kv.sequences.values() for b in s.blocks)
    for seq in kv.sequences.values():
        assert len(seq.blocks) == kv.blocks_for(seq.length), "a sequence holds blocks past its length"
    for block in range(kv.num_blocks):
        assert kv._refs[block] == holders[block], (
            f"block {block}: {kv._refs[block]} refs, {holders[block]} holders"
        )
    assert not set(kv._free) & set(holders), "a free block is held"
    assert kv.used_blocks + kv.free_blocks == kv.num_blocks
    assert kv.used_blocks == len(holders)


def _run_checked(engine: Engine) -> None:
    """Run to idle, checking the KV accounting after every step."""
    for _ in range(10_000):
        engine._drain_inbox(block=False)
        if not engine.busy:
            return
        engine.step()
        check_accounting(engine.runner.kv)
    raise AssertionError("engine did not go idle")


def _jobs(engine: Engine, jobs, **params) -> list:
    pending = [submit(engine, ids, adapter, **params)[1] for ids, adapter in jobs]
    _run_checked(engine)
    return [outcome(events) for events in pending]


# ---------------------------------------------------------------------- prompt lookup


def test_prompt_lookup_proposes_what_followed_the_latest_match() -> None:
    lookup = PromptLookup([5, 6, 7, 8, 9, 1, 5, 6, 7, 3, 4])
    assert lookup.propose(4) == []  # suffix (3, 4) never occurred before
    lookup.extend([9, 5, 6])
    # (4, 9, 5, 6) and (9, 5, 6) never occurred; (5, 6) twice, the latest followed by 7, 3, 4
    assert lookup.propose(3) == [7, 3, 4]
    assert lookup.propose(10) == [7, 3, 4, 9, 5, 6]  # up to the end of the row's tokens
    lookup.extend([7, 3])
    assert lookup.propose(2) == [4, 9]  # the 4-gram (5, 6, 7, 3) wins over shorter matches
    assert lookup.propose(0) == []
    assert PromptLookup([1, 2]).propose(3) == []  # too short to match anything


def test_draft_length_shrinks_where_drafts_miss_and_grows_back_where_they_hit() -> None:
    length = DraftLength()
    assert length.limit(4) == 4  # a new row drafts the most
    length.observe(4, 0)
    length.observe(2, 0)
    assert 1 <= length.limit(4) < 4  # two misses: shorter drafts
    for _ in range(6):
        length.observe(length.limit(4), 0)
    assert length.limit(4) == 1  # a row that keeps missing drafts one token (never none)
    for _ in range(4):
        length.observe(length.limit(4), length.limit(4))
    assert length.limit(4) == 4  # hits again: back to --speculate
    assert length.limit(2) == 2  # never past it
    length.observe(0, 0)  # a step without drafts says nothing
    assert length.limit(4) == 4


def test_engine_drafts_fewer_tokens_for_a_row_whose_drafts_miss(llama, tokenizer, monkeypatch) -> None:
    """A draft source that is always wrong: after its first verify steps the row drafts one token
    a step, not --speculate; the output is still the plain one."""

    class Wrong(Oracle):
        def propose(self, limit: int) -> list[int]:
            return [7] * limit  # token 7 never follows in these outputs (checked below)

    monkeypatch.setattr(engine_module, "PromptLookup", Wrong)
    prompt = _prompt(5)
    plain = _jobs(_engine(llama[1], tokenizer, 0), [(prompt, None)], max_new_tokens=24)
    assert 7 not in plain[0].tokens
    engine = _engine(llama[1], tokenizer, 4)
    drafted: list[int] = []
    step = engine.runner.step
    engine.runner.step = lambda rows: (drafted.extend(r.drafts for r in rows if r.decoding), step(rows))[1]
    assert [o.tokens for o in _jobs(engine, [(prompt, None)], max_new_tokens=24)] == [plain[0].tokens]
    assert drafted[:3] == [4, 2, 1]  # p: 3/4, then 1.5/3, then 0.75/2.5 (DraftLength's estimate)
    assert len(drafted) > 10 and set(drafted[3:]) <= {0, 1}  # 0: no room left at the very end


# ---------------------------------------------------------------------- greedy: exactly the same tokens


def test_greedy_with_drafts_equals_peft_and_no_speculation_solo_and_mixed(
    llama, tokenizer, peft_adapter_factory, oracle
) -> None:
    """Base, every test adapter, a composition, adapter_scale and a structured-output row, solo
    and in one mixed batch: --speculate 4 gives the tokens PEFT's greedy generate gives (base and
    adapters) and those of --speculate 0 (all rows, compositions and scales included)."""
    model, path = llama
    plain = _engine(path, tokenizer, 0)
    adapters: dict[str, LoraAdapter] = {}
    pefts = {}
    for seed, (name, kwargs) in enumerate(ADAPTERS.items()):
        adapter_dir, pefts[name] = peft_adapter_factory(model, name, seed=seed + 3, b_scale=2.0, **kwargs)
        adapters[name] = load_adapter_dir(adapter_dir, name, plain.base_shapes)
    mix = compose([adapters["all"], adapters["qv"]], [0.7, -0.5], CompositionSpec("linear"), adapter_id="mix")
    grammar = plain.grammars.compile_json_schema(SCHEMA)
    rows = [(None, 1.0, None), *[(a, 1.0, None) for a in adapters.values()], (mix, 1.0, None),
            (adapters["qv"], 0.4, None), (None, 1.0, grammar), (adapters["all"], 1.0, grammar)]  # fmt: skip
    jobs = [(_prompt(100 + i), *row) for i, row in enumerate(rows)]

    def run(engine: Engine, together: bool) -> list[list[int]]:
        pending = []
        for ids, adapter, scale, g in jobs:
            events: list = []
            request = GenerationRequest(
                prompt_ids=ids, params=SamplingParams(max_new_tokens=24), adapter=adapter,
                adapter_scale=scale, grammar=g, sink=events.append,
            )  # fmt: skip
            engine.submit(request)
            pending.append(events)
            if not together:
                _run_checked(engine)
        _run_checked(engine)
        return [outcome(events).tokens for events in pending]

    reference = run(plain, together=True)
    for (ids, adapter, scale, g), tokens in zip(jobs, reference, strict=True):
        oracle[tuple(ids)] = tokens
        if g is None and scale == 1.0 and (adapter is None or adapter.adapter_id in pefts):
            peft = model if adapter is None else pefts[adapter.adapter_id]
            with torch.no_grad():
                out = peft.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                                    pad_token_id=2)  # fmt: skip
            assert tokens == out[0, len(ids) :].tolist(), adapter

    speculative = _engine(path, tokenizer, 4)
    assert run(speculative, together=True) == reference  # one mixed batch
    assert speculative.stats.steps < plain.stats.steps  # several tokens per step
    assert run(speculative, together=False) == reference  # solo
    stats = speculative.stats.speculation
    assert stats.accepted > 0 and stats.drafted > stats.accepted  # drafts were kept and rejected
    assert set(stats.by_adapter) >= {"__base__", "all", "qv", "patterns", "mix"}
    assert not speculative.runner.kv.sequences and speculative.runner.kv.used_blocks == 0


@pytest.mark.parametrize("serving", ["merged", "int8"])
def test_greedy_with_drafts_equals_no_speculation_merged_and_quantized(
    llama, tokenizer, peft_adapter_factory, oracle, serving
) -> None:
    """The default --speculate 4 in the serving modes the test above does not run: an adapter
    merged into the weights (its rows in the base slot) and int8 weights (their own kernels, the
    adapter unmerged); equal to --speculate 0 there, rows and KV memory released."""
    model, path = llama

    def engine(speculate: int) -> Engine:
        if serving == "merged":
            return _engine(path, tokenizer, speculate, mode="merged", checkpoint_dir=path)
        runner = NativeLlamaRunner(path, quantization="int8", kv_cache_tokens=4096)
        return Engine(runner, tokenizer, EngineConfig(mode="unmerged", speculate=speculate))

    plain = engine(0)
    adapter_dir, _ = peft_adapter_factory(model, "qv", seed=9, b_scale=2.0, **ADAPTERS["qv"])
    adapter = load_adapter_dir(adapter_dir, "qv", plain.base_shapes)
    jobs = [(_prompt(300 + i), adapter) for i in range(3)]
    reference = [o.tokens for o in _jobs(plain, jobs, max_new_tokens=24)]
    for (ids, _), tokens in zip(jobs, reference, strict=True):
        oracle[tuple(ids)] = tokens
    speculative = engine(4)
    assert [o.tokens for o in _jobs(speculative, jobs, max_new_tokens=24)] == reference
    if serving == "merged":
        assert speculative.merged_adapter_id == "qv"
    stats = speculative.stats.speculation
    assert stats.accepted > 0 and stats.drafted > stats.accepted
    assert not speculative.runner.kv.sequences and speculative.runner.kv.used_blocks == 0


def test_speculation_stops_logprobs_and_details_match_plain_decoding(llama, tokenizer, oracle) -> None:
    """max_new_tokens, EOS, stop sequences, logprobs, top-n and the streamed events are those of
    plain decoding, also when the row ends inside a verified run of drafts."""
    _, path = llama
    plain, speculative = _engine(path, tokenizer, 0), _engine(path, tokenizer, 4)
    prompts = [_prompt(200 + i) for i in range(4)]
    long = [_jobs(plain, [(p, None)], max_new_tokens=30)[0] for p in prompts]
    for p, o in zip(prompts, long, strict=True):
        oracle[tuple(p)] = o.tokens
    eos = long[3].tokens[9]  # ends row 3 inside a run of drafts
    stop = tokenizer.decode(long[1].tokens[12:14])
    cases = [  # (sampling params, top_n_tokens)
        (dict(max_new_tokens=7), 0),
        (dict(max_new_tokens=30, stop=(stop,)), 0),
        (dict(max_new_tokens=17), 3),
        (dict(max_new_tokens=30), 2),
    ]
    results = {}
    for engine in (plain, speculative):
        engine.eos_ids = frozenset({eos})
        pending = []
        for p, (params, top_n) in zip(prompts, cases, strict=True):
            events: list = []
            request = GenerationRequest(prompt_ids=p, params=SamplingParams(**params), adapter=None,
                                        sink=events.append, top_n_tokens=top_n, want_details=True)  # fmt: skip
            engine.submit(request)
            pending.append(events)
        _run_checked(engine)
        results[engine is speculative] = pending
    for want, got in zip(results[False], results[True], strict=True):
        want_tokens = [e for e in want if isinstance(e, TokenEvent)]
        got_tokens = [e for e in got if isinstance(e, TokenEvent)]
        assert [(e.id, e.text, e.special) for e in got_tokens] == [
            (e.id, e.text, e.special) for e in want_tokens
        ]
        for a, b in zip(want_tokens, got_tokens, strict=True):
            assert b.logprob == pytest.approx(a.logprob, abs=1e-4)
            assert [t.id for t in b.top_tokens] == [t.id for t in a.top_tokens]
        fin_want = next(e for e in want if isinstance(e, FinishEvent))
        fin_got = next(e for e in got if isinstance(e, FinishEvent))
        assert (fin_got.generated_text, fin_got.finish_reason, fin_got.generated_tokens, fin_got.stop_at) == (
            fin_want.generated_text, fin_want.finish_reason, fin_want.generated_tokens, fin_want.stop_at,
        )  # fmt: skip
    reasons = [next(e for e in w if isinstance(e, FinishEvent)).finish_reason for w in results[True]]
    assert reasons[0] == "length" and "eos_token" in reasons
    assert speculative.stats.speculation.accepted > 0


def test_rollback_with_shared_prefix_blocks_never_leaks_or_writes_them(llama, tokenizer, oracle) -> None:
    """Rows that start on cached prefix blocks (shared, read-only) verify drafts across block
    boundaries; their tokens equal a cold engine's (no cache, no speculation), the accounting holds
    after every step, and everything is back when they are gone."""
    _, path = llama
    cold = _engine(path, tokenizer, 0, prefix_cache=False)
    shared = _prompt(300, 46)  # 2 full blocks + 14: drafts of the first verify rows cross into block 4
    prompts = [shared, [*shared, 77], [*shared[:32], 5, 6, 7]]
    want = [o.tokens for o in _jobs(cold, [(p, None) for p in prompts], max_new_tokens=40)]
    for p, tokens in zip(prompts, want, strict=True):
        oracle[tuple(p)] = tokens
    warm = _engine(path, tokenizer, 4, tokens=512)
    kv = warm.runner.kv
    assert _jobs(warm, [(prompts[0], None)], max_new_tokens=40)[0].tokens == want[0]  # fills the cache
    free_before = kv.free_blocks
    got = _jobs(warm, [(p, None) for p in prompts], max_new_tokens=40)
    assert [o.tokens for o in got] == want
    assert kv.prefix.stats.hit_tokens >= 3 * 32  # they did start on shared blocks
    assert warm.stats.speculation.drafted > warm.stats.speculation.accepted > 0
    assert not kv.sequences and kv.free_blocks == free_before == kv.num_blocks


def test_kv_memory_short_of_drafts_decodes_one_token_and_preemption_still_matches(
    llama, tokenizer, oracle
) -> None:
    """A KV memory too small for everyone's drafts: rows without room decode one token, rows are
    preempted and recomputed, and every output still equals plain decoding's."""
    _, path = llama
    plain = _engine(path, tokenizer, 0)
    prompts = [_prompt(400 + i, 20) for i in range(6)]
    want = [o.tokens for o in _jobs(plain, [(p, None) for p in prompts], max_new_tokens=30)]
    for p, tokens in zip(prompts, want, strict=True):
        oracle[tuple(p)] = tokens
    small = _engine(path, tokenizer, 4, tokens=160, max_prefill_tokens=32)  # 10 blocks for ~18 needed
    assert [o.tokens for o in _jobs(small, [(p, None) for p in prompts], max_new_tokens=30)] == want
    assert small.stats.preemptions >= 1 and small.stats.speculation.accepted > 0
    assert small.runner.kv.free_blocks == small.runner.kv.num_blocks


def test_no_drafts_in_steps_with_more_rows_than_speculate_max_batch(llama, tokenizer, oracle) -> None:
    _, path = llama
    prompts = [_prompt(600 + i) for i in range(3)]
    plain = _engine(path, tokenizer, 0)
    want = [o.tokens for o in _jobs(plain, [(p, None) for p in prompts], max_new_tokens=12)]
    for p, tokens in zip(prompts, want, strict=True):
        oracle[tuple(p)] = tokens
    capped = _engine(path, tokenizer, 4, speculate_max_batch=2)
    assert [o.tokens for o in _jobs(capped, [(p, None) for p in prompts], max_new_tokens=12)] == want
    assert capped.stats.speculation.drafted == 0  # three rows ran together to the end
    assert [o.tokens for o in _jobs(capped, [(p, None) for p in prompts[:2]], max_new_tokens=12)] == want[:2]
    assert capped.stats.speculation.accepted > 0


def test_the_hf_runner_does_not_speculate(tiny_base, tokenizer) -> None:
    engine = Engine.for_hf_model(
        copy.deepcopy(tiny_base), tokenizer, EngineConfig(mode="unmerged", speculate=4)
    )
    assert engine.speculate == 0 and not engine.runner.supports_speculation
    assert len(_jobs_hf(engine, tokenizer)) == 6


def _jobs_hf(engine: Engine, tokenizer) -> list[int]:
    events = submit(engine, tokenizer("Hello there, how are")["input_ids"], None, max_new_tokens=6)[1]
    engine.run_until_idle()
    return outcome(events).tokens


# ---------------------------------------------------------------------- sampling: the same distribution


def test_rejection_sampling_of_a_draft_leaves_the_distribution_exact() -> None:
    """choose_next_tokens with a draft: the chosen token's frequencies fit the processed
    distribution (temperature, top-k) by a chi-square test, drafts likely and unlikely."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    params = SamplingParams(do_sample=True, temperature=0.8, top_k=5)
    expected = (logits[0] / 0.8).masked_fill(torch.arange(6) == 5, float("-inf")).double().softmax(-1)
    seen = torch.tensor([1])
    for draft in (0, 3, 5):  # the likeliest, an unlikely one, one top-k removed (never accepted)
        sampler = RowSampler.create(dataclasses_replace(params, seed=draft), torch.device("cpu"))
        counts = Counter(
            int(choose_next_tokens(logits, [sampler], [seen], drafts=[draft]).tokens[0]) for _ in range(6000)
        )
        observed = [counts[i] for i in range(5)]
        assert counts[5] == 0
        frequencies = (expected[:5] / expected[:5].sum() * sum(observed)).tolist()
        assert chisquare(observed, frequencies).pvalue > 1e-3, (draft, observed)


def dataclasses_replace(params: SamplingParams, **changes) -> SamplingParams:
    import dataclasses

    return dataclasses.replace(params, **changes)


def test_sampled_tokens_with_speculation_follow_the_distribution_without(llama, tokenizer, oracle) -> None:
    """Many seeded requests sampling 4 tokens (top_k 3) with drafts (the greedy continuation) and
    without: each position's token distribution is the same (chi-square homogeneity test), drafts
    were both accepted and rejected, and a seeded request repeats itself."""
    _, path = llama
    prompt = _prompt(500, 8)
    greedy = _jobs(_engine(path, tokenizer, 0), [(prompt, None)], max_new_tokens=4)[0].tokens
    oracle[tuple(prompt)] = greedy
    params = dict(max_new_tokens=4, do_sample=True, top_k=3, ignore_eos=True)
    samples = {}
    for speculate in (0, 3):
        engine = _engine(path, tokenizer, speculate, max_batch=64)
        pending = [submit(engine, prompt, None, seed=1000 * speculate + i, **params)[1] for i in range(480)]
        _run_checked(engine)
        samples[speculate] = [outcome(events).tokens for events in pending]
        if speculate:
            stats = engine.stats.speculation
            assert stats.drafted > stats.accepted > 0
            again = [submit(engine, prompt, None, seed=3000 + i, **params)[1] for i in (0, 0)]
            engine.run_until_idle()
            assert outcome(again[0]).tokens == outcome(again[1]).tokens
    for position in range(1, 4):
        a = Counter(s[position] for s in samples[0])
        b = Counter(s[position] for s in samples[3])
        tokens = sorted(set(a) | set(b))
        table = [[a[t] for t in tokens], [b[t] for t in tokens]]
        assert chi2_contingency(table).pvalue > 1e-3, (position, table)


# ---------------------------------------------------------------------- /info and /metrics


class Repeat(Oracle):
    """Proposes the row's last token again and again (a draft source that is often wrong)."""

    def propose(self, limit: int) -> list[int]:
        return [self.tokens[-1]] * limit


@pytest.mark.parametrize("runner", ["native", "hf"])
def test_info_and_metrics_show_drafted_and_accepted_tokens(
    llama, tokenizer, tmp_path, monkeypatch, runner
) -> None:
    from tests.api_helpers import start_client

    monkeypatch.setattr(engine_module, "PromptLookup", Repeat)
    model, path = llama
    client = start_client(model, tokenizer, tmp_path, model_path=path, runner=runner, speculate=3)
    try:
        body = {"inputs": "one two three", "parameters": {"max_new_tokens": 8, "ignore_eos": True}}
        assert client.post("/generate", json=body).status_code == 200
        info = client.get("/info").json()["speculation"]
        metrics = client.get("/metrics").text
        if runner == "hf":
            assert info == {
                "enabled": False,
                "reason": "the hf runner does not verify drafts (the native runner does)",
            }
            assert "loraplex_speculative" not in metrics
            return
        assert info["enabled"] is True and info["speculate"] == 3 and info["method"] == "prompt_lookup"
        assert info["drafted_tokens"] > 0 and 0 <= info["accepted_tokens"] <= info["drafted_tokens"]
        assert info["by_adapter"]["__base__"]["drafted_tokens"] == info["drafted_tokens"]
        drafted = metric_value(metrics, "loraplex_speculative_drafted_tokens_total", adapter="__base__")
        assert drafted == info["drafted_tokens"]
        assert metric_value(metrics, "loraplex_speculative_acceptance_rate") == pytest.approx(
            info["accepted_tokens"] / info["drafted_tokens"]
        )
    finally:
        client.__exit__(None, None, None)


def test_greedy_with_drafts_equals_peft_for_dora_and_own_head_adapters(
    llama, tokenizer, peft_adapter_factory, oracle, tmp_path
) -> None:
    """Verify rows of a DoRA adapter (magnitude on every projection) and of an adapter with its own
    LM head and embedding (modules_to_save), mixed with base rows: --speculate 4 gives PEFT's tokens."""
    from tests.unit.test_dora import DORA
    from tests.unit.test_vocab_adapters import SPECS, make_vocab_adapter

    model, path = llama
    plain = _engine(path, tokenizer, 0)
    dora_dir, dora_peft = peft_adapter_factory(model, "dora", seed=11, **DORA)
    saved_peft = make_vocab_adapter(model, tmp_path / "saved", seed=12, **SPECS["saved"])
    adapters = {
        "dora": load_adapter_dir(dora_dir, "dora", plain.base_shapes),
        "saved": load_adapter_dir(tmp_path / "saved", "saved", plain.base_shapes),
    }
    pefts = {"dora": dora_peft, "saved": saved_peft}
    jobs = [(_prompt(300 + i), name) for i, name in enumerate([None, "dora", "saved", "dora", None])]
    want = []
    for ids, name in jobs:
        with torch.no_grad():
            out = (model if name is None else pefts[name]).generate(
                torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=2
            )
        want.append(out[0, len(ids) :].tolist())
        oracle[tuple(ids)] = want[-1]
    speculative = _engine(path, tokenizer, 4)
    got = _jobs(
        speculative, [(ids, adapters.get(name)) for ids, name in jobs], max_new_tokens=16, ignore_eos=True
    )
    assert [o.tokens for o in got] == want
    stats = speculative.stats.speculation
    assert stats.by_adapter["dora"][1] > 0 and stats.by_adapter["saved"][1] > 0  # drafts accepted on both
    assert not speculative.runner.kv.sequences and speculative.runner.kv.used_blocks == 0
