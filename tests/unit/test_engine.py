"""The engine on a tiny random Llama: mixed batches equal solo runs, PEFT and the dense reference."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from adapters.peft_format import load_adapter_dir
from server.engine.engine import Engine, EngineConfig, RequestRejected
from server.engine.hf_runner import HFRunner
from server.engine.lora_linear import BASE_SLOT
from server.engine.requests import GenerationRequest, TokenEvent
from server.engine.runner import KvUsage, PrefillInput
from server.engine.sampling import SamplingParams
from tests.engine_helpers import outcome, run_many, run_one, submit
from tests.lora_backends import LORA_BACKENDS

PROMPTS = [
    "Hello there, how are",
    "The quick brown fox",
    "A",
    "Once upon a time in a land far away there lived",
]
ADAPTER_CONFIGS = {
    "qv": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "all_rslora": dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True),
    "patterns": dict(
        r=8,
        lora_alpha=16,
        target_modules=["k_proj", "o_proj", "down_proj", "up_proj"],
        rank_pattern={"o_proj": 2, "layers.1.mlp.down_proj": 12},
        alpha_pattern={"up_proj": 5.0},
    ),
    "layers": dict(r=6, lora_alpha=3, target_modules=["gate_proj", "q_proj"], layers_to_transform=[1]),
}


def _engine(model, tokenizer, **config) -> Engine:
    config.setdefault("mode", "unmerged")
    return Engine.for_hf_model(model, tokenizer, EngineConfig(**config))


@pytest.fixture
def lora_backend() -> str:
    """The LoRA backend of the ``setup`` engine; tests parametrize it to run each."""
    return "auto"


@pytest.fixture
def setup(tiny_base, tokenizer, peft_adapter_factory, lora_backend):
    """An engine on a copy of the tiny model, its adapters, and PEFT's models for the same adapters."""
    engine = _engine(copy.deepcopy(tiny_base), tokenizer, lora_backend=lora_backend)
    adapters, peft_models = {}, {}
    for seed, (name, kwargs) in enumerate(ADAPTER_CONFIGS.items()):
        path, peft_models[name] = peft_adapter_factory(tiny_base, name, seed=seed, **kwargs)
        adapters[name] = load_adapter_dir(path, name, engine.base_shapes)
    return engine, adapters, peft_models


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


@pytest.mark.parametrize("lora_backend", LORA_BACKENDS)
def test_mixed_batch_rows_equal_solo_and_peft_generate(setup, tiny_base, tokenizer, lora_backend) -> None:
    engine, adapters, peft_models = setup
    jobs = [(p, name) for p in PROMPTS for name in [None, *adapters]]
    mixed = run_many(engine, [(_ids(tokenizer, p), adapters.get(n)) for p, n in jobs], max_new_tokens=10)
    for (prompt, name), got in zip(jobs, mixed, strict=True):
        solo = run_one(engine, _ids(tokenizer, prompt), adapters.get(name), max_new_tokens=10)
        assert got.tokens == solo.tokens, (prompt, name)
        model = tiny_base if name is None else peft_models[name]
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            ref = model.generate(
                **inputs, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=2
            )
        assert got.tokens == ref[0, inputs["input_ids"].shape[1] :].tolist(), (prompt, name)


def _dense_merged(base, adapter):
    """The dense reference: a copy of the base model with W <- W + s·B·A in float64 then cast."""
    model = copy.deepcopy(base)
    for name, w in adapter.layers.items():
        linear = model.get_submodule(name)
        delta = w.scale * (w.B.double() @ w.A.double())
        linear.weight.data = (linear.weight.double() + delta).to(linear.weight.dtype)
    return model


def test_prefill_logits_equal_peft_and_dense_reference(setup, tiny_base, tokenizer) -> None:
    engine, adapters, peft_models = setup
    prompts = [_ids(tokenizer, p) for p in PROMPTS]
    names = list(adapters)
    slots = {n: engine.slots.acquire(adapters[n]) for n in names}
    row_names = [names[i % len(names)] for i in range(len(prompts))] + [None]
    row_prompts = [*prompts, prompts[0]]
    row_slots = [BASE_SLOT if n is None else slots[n] for n in row_names]
    inputs = [PrefillInput(i, p, 0, s) for i, (p, s) in enumerate(zip(row_prompts, row_slots, strict=True))]
    logits = engine.runner.prefill(inputs).logits
    for i, name in enumerate(row_names):
        ids = torch.tensor([row_prompts[i]])
        with torch.no_grad():
            if name is None:
                ref = tiny_base(ids).logits[0, -1]
                dense = ref
            else:
                ref = peft_models[name](input_ids=ids).logits[0, -1]
                dense = _dense_merged(tiny_base, adapters[name])(ids).logits[0, -1]
        torch.testing.assert_close(logits[i], ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits[i], dense, rtol=1e-4, atol=1e-4)


def test_adapters_change_the_output(setup, tokenizer) -> None:
    engine, adapters, _ = setup
    base = run_one(engine, _ids(tokenizer, PROMPTS[0]), None, max_new_tokens=12).tokens
    assert all(
        run_one(engine, _ids(tokenizer, PROMPTS[0]), a, max_new_tokens=12).tokens != base
        for a in adapters.values()
    )


def test_requests_join_a_running_batch_and_match_solo(setup, tokenizer) -> None:
    engine, adapters, _ = setup
    names = [None, "qv", "patterns", "all_rslora", "layers", None]
    solo = [run_one(engine, _ids(tokenizer, PROMPTS[i % 4]), adapters.get(n), max_new_tokens=9).tokens
            for i, n in enumerate(names)]  # fmt: skip
    pending = []
    for i, name in enumerate(names):  # one newcomer every two steps, while others decode
        pending.append(
            submit(engine, _ids(tokenizer, PROMPTS[i % 4]), adapters.get(name), max_new_tokens=9)[1]
        )
        engine._drain_inbox(block=False)
        engine.step()
        engine.step()
        assert engine.num_running <= len(names)
    engine.run_until_idle()
    assert [outcome(e).tokens for e in pending] == solo


def test_finished_rows_leave_at_once(setup, tokenizer) -> None:
    engine, adapters, _ = setup
    short = submit(engine, _ids(tokenizer, PROMPTS[0]), adapters["qv"], max_new_tokens=2)[1]
    long = submit(engine, _ids(tokenizer, PROMPTS[1]), None, max_new_tokens=6)[1]
    engine._drain_inbox(block=False)
    engine.step()  # the step plan prefills both prompts: token 1 of each
    assert len(outcome(short).tokens) == 1 and engine.num_running == 2
    engine.step()  # one decode row each (token 2): the short one is done
    assert outcome(short).finish is not None and outcome(short).finish.finish_reason == "length"
    assert engine.num_running == 1
    assert engine.slots._resident[adapters["qv"].key].in_use == 0
    engine.run_until_idle()
    assert len(outcome(long).tokens) == 6


def test_cancel_frees_the_row_and_the_slot(setup, tokenizer) -> None:
    engine, adapters, _ = setup
    request, events = submit(engine, _ids(tokenizer, PROMPTS[0]), adapters["qv"], max_new_tokens=50)
    other = submit(engine, _ids(tokenizer, PROMPTS[1]), None, max_new_tokens=5)[1]
    engine._drain_inbox(block=False)
    engine.step()
    request.cancel()
    engine.step()
    assert engine.num_running == 1
    assert outcome(events).error is not None and outcome(events).error.error_type == "cancelled"
    assert engine.slots._resident[adapters["qv"].key].in_use == 0
    engine.run_until_idle()
    assert len(outcome(other).tokens) == 5


def test_max_batch_is_respected(setup, tokenizer) -> None:
    engine, _, _ = setup
    engine.config = EngineConfig(max_batch=3)
    pending = [submit(engine, _ids(tokenizer, PROMPTS[i % 4]), None, max_new_tokens=4)[1] for i in range(7)]
    engine._drain_inbox(block=False)
    while engine.num_running or engine.num_waiting:
        engine.step()
        assert engine.num_running <= 3
    assert all(len(outcome(e).tokens) == 4 for e in pending)


def test_queued_requests_count_for_max_queue_and_controls_do_not(setup, tokenizer) -> None:
    """``num_waiting`` (what --max-queue counts) is the requests queued, in the inbox or the
    scheduler's queue; calls waiting in the same inbox (the API's prefetch and expect hints,
    one or two a request) never count, or sequential requests met a 429 at --max-queue 2."""
    engine, adapters, _ = setup
    hints = [engine.call(lambda: None) for _ in range(3)]
    engine.prefetch(adapters["qv"])
    assert engine.num_waiting == 0
    pending = [submit(engine, _ids(tokenizer, PROMPTS[i]), None, max_new_tokens=2)[1] for i in range(2)]
    assert engine.num_waiting == 2
    engine._drain_inbox(block=False)
    assert engine.num_waiting == 2  # now in the scheduler's queue
    engine.run_until_idle()
    assert engine.num_waiting == 0 and all(h.done() for h in hints)
    assert all(len(outcome(e).tokens) == 2 for e in pending)


def test_slot_lru_eviction_never_evicts_in_use(tiny_base, tokenizer, peft_adapter_factory) -> None:
    engine = _engine(copy.deepcopy(tiny_base), tokenizer, max_loaded_adapters=2)
    adapters = [
        load_adapter_dir(peft_adapter_factory(tiny_base, f"a{i}", seed=i)[0], f"a{i}", engine.base_shapes)
        for i in range(3)
    ]
    solo = [run_one(engine, _ids(tokenizer, PROMPTS[0]), a, max_new_tokens=6).tokens for a in adapters]
    assert engine.slots.evictions >= 1 and len(engine.slots.resident_keys) == 2
    # three adapters at once with two slots: the third waits for a slot, then runs correctly
    outs = run_many(engine, [(_ids(tokenizer, PROMPTS[0]), a) for a in adapters], max_new_tokens=6)
    assert [o.tokens for o in outs] == solo


def test_stop_sequence_and_eos(setup, tokenizer) -> None:
    engine, _, _ = setup
    free = run_one(engine, _ids(tokenizer, PROMPTS[0]), None, max_new_tokens=12)
    text = tokenizer.decode(free.tokens)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    stopped = run_one(engine, _ids(tokenizer, PROMPTS[0]), None, max_new_tokens=12, stop=(stop,))
    assert stopped.finish.finish_reason == "stop_sequence"
    assert stopped.finish.generated_text.endswith(stop)
    assert stop not in stopped.finish.generated_text[: -len(stop)]
    # EOS: make token 2 (eos) the only possible token by a huge repetition penalty on everything else? simpler:
    engine.eos_ids = frozenset({free.tokens[3]})
    eos = run_one(engine, _ids(tokenizer, PROMPTS[0]), None, max_new_tokens=12)
    assert eos.finish.finish_reason == "eos_token" and eos.tokens == free.tokens[:4]
    ignored = run_one(engine, _ids(tokenizer, PROMPTS[0]), None, max_new_tokens=12, ignore_eos=True)
    assert ignored.tokens == free.tokens and ignored.finish.finish_reason == "length"


def test_seeded_sampling_is_reproducible(setup, tokenizer) -> None:
    engine, adapters, _ = setup
    ids = _ids(tokenizer, PROMPTS[2])
    params = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=50, top_p=0.95)
    a = run_one(engine, ids, adapters["qv"], seed=7, **params)
    b = run_one(engine, ids, adapters["qv"], seed=7, **params)
    c = run_one(engine, ids, adapters["qv"], seed=8, **params)
    assert a.tokens == b.tokens and a.finish.seed == 7
    assert a.tokens != c.tokens
    unseeded = run_one(engine, ids, None, **params)
    assert unseeded.finish.seed is not None  # the drawn seed is reported, so the run can be repeated
    again = run_one(engine, ids, None, seed=unseeded.finish.seed, **params)
    assert again.tokens == unseeded.tokens


def test_top_k_one_is_greedy(setup, tokenizer) -> None:
    engine, adapters, _ = setup
    ids = _ids(tokenizer, PROMPTS[3])
    greedy = run_one(engine, ids, adapters["patterns"], max_new_tokens=8).tokens
    assert (
        run_one(engine, ids, adapters["patterns"], max_new_tokens=8, do_sample=True, top_k=1, seed=3).tokens
        == greedy
    )


def test_repetition_penalty_matches_hf(setup, tiny_base, tokenizer) -> None:
    engine, _, _ = setup
    inputs = tokenizer(PROMPTS[1], return_tensors="pt")
    got = run_one(
        engine, inputs["input_ids"][0].tolist(), None, max_new_tokens=10, repetition_penalty=1.8
    ).tokens
    with torch.no_grad():
        ref = tiny_base.generate(**inputs, max_new_tokens=10, do_sample=False, repetition_penalty=1.8,
                                 eos_token_id=None, pad_token_id=2)  # fmt: skip
    assert got == ref[0, inputs["input_ids"].shape[1] :].tolist()


def test_limits_are_enforced(setup, tokenizer) -> None:
    engine, _, _ = setup
    engine.config = EngineConfig(max_input_tokens=4, max_total_tokens=10)
    with pytest.raises(RequestRejected, match="max-input-tokens"):
        submit(engine, list(range(3, 9)), None)
    with pytest.raises(RequestRejected, match="at most 7"):
        submit(engine, [5, 6, 7], None, max_new_tokens=8)
    with pytest.raises(RequestRejected, match="empty"):
        submit(engine, [], None)


def test_gpt2_conv1d_fan_in_fan_out_matches_peft(tokenizer, peft_adapter_factory) -> None:
    """Any HF causal LM: GPT-2 keeps its linear weights transposed (Conv1D, fan_in_fan_out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(5)
    base = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=128)
    )
    base.eval()
    path, peft_model = peft_adapter_factory(
        base, "gpt2", r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True
    )
    engine = _engine(copy.deepcopy(base), tokenizer)
    adapter = load_adapter_dir(path, "gpt2", engine.base_shapes)
    assert adapter.config.fan_in_fan_out
    for prompt in PROMPTS[:2]:
        inputs = tokenizer(prompt, return_tensors="pt")
        got = run_one(engine, inputs["input_ids"][0].tolist(), adapter, max_new_tokens=8).tokens
        with torch.no_grad():
            ref = peft_model.generate(
                **inputs, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=2
            )
        assert got == ref[0, inputs["input_ids"].shape[1] :].tolist()


def test_a_failing_forward_fails_its_requests_and_the_engine_goes_on(setup, tokenizer, monkeypatch) -> None:
    engine, adapters, _ = setup
    running = submit(engine, _ids(tokenizer, PROMPTS[0]), adapters["qv"], max_new_tokens=30)[1]
    engine._drain_inbox(block=False)
    engine.step()

    def broken_prefill(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(engine.runner, "prefill", broken_prefill)
    newcomer = submit(engine, _ids(tokenizer, PROMPTS[1]), adapters["patterns"], max_new_tokens=5)[1]
    engine._drain_inbox(block=False)
    for _ in range(200):  # the newcomer's adapter loads on the loader thread; its prefill then fails
        engine.step_safely()
        if outcome(newcomer).error is not None:
            break
        time.sleep(0.005)
    for events in (running, newcomer):
        error = outcome(events).error
        assert error is not None and "out of memory" in error.message
    assert all(r.in_use == 0 for r in engine.slots._resident.values())
    monkeypatch.undo()
    assert len(run_one(engine, _ids(tokenizer, PROMPTS[2]), adapters["qv"], max_new_tokens=4).tokens) == 4


class BoundedRunner(HFRunner):
    """An HFRunner with a KV budget in tokens, to exercise the engine's admission and preemption."""

    def __init__(self, model, capacity: int) -> None:
        super().__init__(model)
        self.capacity = capacity
        self.lengths: dict[int, int] = {}
        self.peak = 0

    def _account(self) -> None:
        self.peak = max(self.peak, sum(self.lengths.values()))
        assert self.peak <= self.capacity, "the engine let the KV memory overflow"

    def prefill(self, inputs):
        for item in inputs:
            self.lengths[item.seq_id] = len(item.token_ids)
        self._account()
        return super().prefill(inputs)

    def decode(self, inputs):
        for item in inputs:
            self.lengths[item.seq_id] += 1
        self._account()
        return super().decode(inputs)

    def release(self, seq_ids) -> None:
        seq_ids = list(seq_ids)
        for seq_id in seq_ids:
            self.lengths.pop(seq_id, None)
        super().release(seq_ids)

    def kv_usage(self) -> KvUsage:
        return KvUsage(used_tokens=sum(self.lengths.values()), capacity=self.capacity)

    def can_admit(self, num_tokens: int, num_sequences: int = 1) -> bool:
        return sum(self.lengths.values()) + num_tokens <= self.capacity

    def can_decode(self, seq_ids) -> bool:
        return sum(self.lengths.values()) + len(seq_ids) <= self.capacity


def test_requests_beyond_the_kv_memory_wait_or_are_preempted_and_still_equal_solo(
    setup, tiny_base, tokenizer
) -> None:
    engine, adapters, _ = setup
    jobs = [(PROMPTS[i], [None, "qv", "patterns", "layers"][i]) for i in range(4)]
    params = [dict(max_new_tokens=24), dict(max_new_tokens=24, do_sample=True, seed=7, temperature=0.9)]
    solo = [
        run_one(engine, _ids(tokenizer, p), adapters.get(n), **params[i % 2]).tokens
        for i, (p, n) in enumerate(jobs)
    ]
    bounded = Engine(
        BoundedRunner(copy.deepcopy(tiny_base), capacity=64), tokenizer, EngineConfig(mode="unmerged")
    )
    pending = [
        submit(bounded, _ids(tokenizer, p), adapters.get(n), **params[i % 2])[1]
        for i, (p, n) in enumerate(jobs)
    ]
    bounded.run_until_idle()
    assert [outcome(events).tokens for events in pending] == solo
    assert bounded.stats.preemptions >= 1
    assert bounded.runner.peak <= 64 and bounded.runner.lengths == {}
    with pytest.raises(RequestRejected, match="KV memory of 64 tokens"):
        submit(bounded, _ids(tokenizer, PROMPTS[0]), None, max_new_tokens=70)


def _scored(engine: Engine, prompt_ids: list[int], adapter) -> list:
    """Submit a request that asks for its prompt's log-probabilities; its events."""
    events: list = []
    engine.submit(
        GenerationRequest(
            list(prompt_ids),
            SamplingParams(max_new_tokens=24),
            adapter,
            want_prompt_logprobs=True,
            sink=events.append,
        )
    )
    return events


def test_prompt_logprobs_are_computed_once_and_survive_preemption(setup, tiny_base, tokenizer) -> None:
    """The prompt's log-probabilities come from a row's first prefill and stay with the row: a
    preempted row recomputed over prompt + streamed tokens is not scored again. They reach the
    client on the first TokenEvent (a stream that echoes the prompt) and on the FinishEvent, equal
    to a solo run's."""
    engine, adapters, _ = setup
    jobs = [
        (_ids(tokenizer, PROMPTS[i]), adapters.get([None, "qv", "patterns", "layers"][i])) for i in range(4)
    ]
    solo = []
    for ids, adapter in jobs:
        solo.append(_scored(engine, ids, adapter))
        engine.run_until_idle()
    bounded = Engine(
        BoundedRunner(copy.deepcopy(tiny_base), capacity=64), tokenizer, EngineConfig(mode="unmerged")
    )
    pending = [_scored(bounded, ids, adapter) for ids, adapter in jobs]
    bounded.run_until_idle()
    assert bounded.stats.preemptions >= 1
    for (ids, _), events, alone in zip(jobs, pending, solo, strict=True):
        finish, tokens = outcome(events).finish, [e for e in events if isinstance(e, TokenEvent)]
        assert [t.id for t in tokens] == outcome(alone).tokens
        assert len(finish.prompt_logprobs) == len(ids) - 1
        assert finish.prompt_logprobs == pytest.approx(outcome(alone).finish.prompt_logprobs, abs=1e-4)
        assert tokens[0].prompt is not None and tokens[0].prompt.logprobs == finish.prompt_logprobs
        assert all(t.prompt is None for t in tokens[1:])


class ChunkingRunner(BoundedRunner):
    """Takes prompts in chunks (the engine's chunked-prefill path) by re-running the prefix so far."""

    supports_chunked_prefill = True

    def __init__(self, model, capacity: int) -> None:
        super().__init__(model, capacity)
        self.prefixes: dict[int, list[int]] = {}
        self.calls: list[tuple[str, int]] = []  # ("prefill", tokens) or ("decode", rows)

    def prefill(self, inputs):
        fresh = []
        for item in inputs:
            prefix = self.prefixes.get(item.seq_id, [])
            assert item.start == len(prefix), "a chunk must continue its sequence"
            self.prefixes[item.seq_id] = [*prefix, *item.token_ids]
            HFRunner.release(self, [item.seq_id])
            fresh.append(PrefillInput(item.seq_id, self.prefixes[item.seq_id], 0, item.slot))
        self.calls.append(("prefill", sum(len(i.token_ids) for i in inputs)))
        for item in inputs:
            self.lengths[item.seq_id] = self.lengths.get(item.seq_id, 0) + len(item.token_ids)
        self._account()
        return HFRunner.prefill(self, fresh)

    def decode(self, inputs):
        self.calls.append(("decode", len(inputs)))
        decoding = {i.seq_id for i in inputs}
        partial = [s for s in self._batch.seq_ids if s not in decoding]  # re-run with their next chunk
        HFRunner.release(self, partial)
        return super().decode(inputs)

    def release(self, seq_ids) -> None:
        seq_ids = list(seq_ids)
        for seq_id in seq_ids:
            self.prefixes.pop(seq_id, None)
        super().release(seq_ids)


def test_long_prompts_are_prefilled_in_chunks_while_running_rows_decode(setup, tiny_base, tokenizer) -> None:
    engine, adapters, _ = setup
    long_prompt = _ids(tokenizer, " ".join(PROMPTS * 3))
    assert len(long_prompt) > 40
    jobs = [(_ids(tokenizer, PROMPTS[0]), adapters["qv"]), (_ids(tokenizer, PROMPTS[1]), None)]
    solo = [
        run_one(engine, ids, a, max_new_tokens=16).tokens
        for ids, a in [*jobs, (long_prompt, adapters["layers"])]
    ]
    runner = ChunkingRunner(copy.deepcopy(tiny_base), capacity=4096)
    chunked = Engine(runner, tokenizer, EngineConfig(mode="unmerged", max_prefill_tokens=8))
    pending = [submit(chunked, ids, a, max_new_tokens=16)[1] for ids, a in jobs]
    chunked._drain_inbox(block=False)
    chunked.step()  # the short prompts start decoding before the long one arrives
    pending.append(submit(chunked, long_prompt, adapters["layers"], max_new_tokens=16)[1])
    chunked.run_until_idle()
    assert [outcome(events).tokens for events in pending] == solo
    prefills = [n for kind, n in runner.calls if kind == "prefill"]
    assert max(prefills) <= 8 and sum(prefills) >= len(long_prompt)
    # decode steps ran between the long prompt's chunks: no step waited for the whole prompt
    kinds = [kind for kind, _ in runner.calls]
    first, last = kinds.index("prefill"), len(kinds) - 1 - kinds[::-1].index("prefill")
    assert kinds[first:last].count("decode") >= len(long_prompt) // 8 - 1


def test_an_adapter_that_fails_admission_fails_only_its_own_request(setup, tokenizer) -> None:
    """Issue 31, finding 4: an adapter whose numbers the engine cannot hold (a scale of 1e300 made
    past validation) fails its own request at admission; the running stream and the request
    admitted in the same pass finish as if alone, and no slot count leaks."""
    import dataclasses

    from adapters.peft_format import LoraAdapter

    engine, adapters, _ = setup
    good = adapters["qv"]
    poisoned_layers = {m: dataclasses.replace(w, scale=1e300) for m, w in adapters["patterns"].layers.items()}
    poisoned = LoraAdapter("poisoned", adapters["patterns"].config, poisoned_layers, version="bad")
    alone = run_one(engine, _ids(tokenizer, PROMPTS[0]), good, max_new_tokens=12).tokens
    neighbour = run_one(engine, _ids(tokenizer, PROMPTS[1]), None, max_new_tokens=6).tokens

    running = submit(engine, _ids(tokenizer, PROMPTS[0]), good, max_new_tokens=12)[1]
    engine._drain_inbox(block=False)
    engine.step_safely()
    bad = submit(engine, _ids(tokenizer, PROMPTS[2]), poisoned, max_new_tokens=6)[1]
    same_pass = submit(engine, _ids(tokenizer, PROMPTS[1]), None, max_new_tokens=6)[1]
    for _ in range(100):
        engine._drain_inbox(block=False)
        if not engine.busy:
            break
        engine.step_safely()
    error = outcome(bad).error
    assert error is not None and "could not be admitted" in error.message
    assert outcome(running).error is None and outcome(running).tokens == alone
    assert outcome(same_pass).error is None and outcome(same_pass).tokens == neighbour
    assert all(r.in_use == 0 for r in engine.slots._resident.values())
    assert poisoned.key not in engine.slots._resident
