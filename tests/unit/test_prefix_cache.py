"""Prefix caching in the native runner's paged KV memory, keyed by adapter identity (issue 26).

Every "warm" output here is compared with a "cold" one from an engine whose prefix cache is off:
reusing K and V must never change what a request generates, and no identity (base, an adapter
version, a scale) may read another's blocks.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapters.peft_format import LoraAdapter, load_adapter_dir
from server.engine.engine import Engine, EngineConfig, prefix_identity
from server.engine.lora_linear import BASE_SLOT
from server.engine.native import NativeLlamaRunner
from server.engine.native.kv_cache import PagedKVCache
from server.engine.native.prefix_cache import chain_keys
from server.engine.requests import Event, FinishEvent, GenerationRequest, TokenEvent
from server.engine.runner import PrefillInput
from server.engine.sampling import SamplingParams
from tests.conftest import tiny_llama_config

BLOCK = 16


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tokenizer):
    torch.manual_seed(4321)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer))).eval()
    path = tmp_path_factory.mktemp("prefix-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)  # the native loader reads it from the model's folder
    return model, path


@pytest.fixture
def adapters(llama, peft_adapter_factory) -> dict[str, LoraAdapter]:
    model, path = llama
    shapes = NativeLlamaRunner(path, kv_cache_tokens=64).base_shapes
    out = {}
    for seed, (name, modules) in enumerate({"a": ["q_proj", "v_proj"], "b": "all-linear"}.items()):
        adapter_dir, _ = peft_adapter_factory(model, name, seed=seed + 1, b_scale=2.0, target_modules=modules)
        out[name] = dataclasses.replace(load_adapter_dir(adapter_dir, name, shapes), version=f"v1-{name}")
    return out


def _prompt(seed: int, n: int = 100) -> list[int]:
    rng = random.Random(seed)
    return [1] + [rng.randrange(3, 2000) for _ in range(n - 1)]


@pytest.fixture
def make_engine(llama, tokenizer):
    """``make_engine(cache=True, tokens=4096, **EngineConfig fields)``: a fresh runner and engine."""
    _, path = llama

    def make(*, cache: bool = True, tokens: int = 4096, **config) -> Engine:
        config.setdefault("mode", "unmerged")
        runner = NativeLlamaRunner(path, kv_cache_tokens=tokens)
        return Engine(runner, tokenizer, EngineConfig(prefix_cache=cache, **config))

    return make


def _submit(engine: Engine, ids, adapter=None, scale: float = 1.0, n: int = 8) -> list[Event]:
    events: list[Event] = []
    request = GenerationRequest(
        prompt_ids=list(ids),
        params=SamplingParams(max_new_tokens=n, ignore_eos=True),
        adapter=adapter,
        adapter_scale=scale,
        sink=events.append,
    )
    engine.submit(request)
    return events


def _result(events: list[Event]) -> tuple[list[int], FinishEvent]:
    finish = next(e for e in events if isinstance(e, FinishEvent))
    return [e.id for e in events if isinstance(e, TokenEvent)], finish


def _run(engine: Engine, ids, adapter=None, scale: float = 1.0, n: int = 8) -> tuple[list[int], int]:
    """(generated tokens, cached prompt tokens) of one request run alone."""
    events = _submit(engine, ids, adapter, scale, n)
    engine.run_until_idle()
    tokens, finish = _result(events)
    return tokens, finish.cached_tokens


# ----------------------------------------------------------------------------- the block allocator


def _kv(blocks: int) -> PagedKVCache:
    return PagedKVCache(
        num_layers=1, num_kv_heads=1, head_dim=2, num_blocks=blocks, block_size=4,
        dtype=torch.float32, device=torch.device("cpu"),
    )  # fmt: skip


def _fill(kv: PagedKVCache, seq_id: int, identity: str | None, tokens: list[int]) -> int:
    reused = kv.start(seq_id, identity, tokens)
    kv.extend(seq_id, len(tokens) - reused)
    kv.record(seq_id, tokens[reused:])
    return reused


def test_full_blocks_are_shared_by_identity_counted_once_and_evicted_lru() -> None:
    kv = _kv(6)
    ten = list(range(10, 20))  # 2 full blocks of 4 + 2 tokens
    assert _fill(kv, 1, "base", ten) == 0
    assert kv.prefix_stats().cached_blocks == 2 and kv.used_tokens == 10
    # same identity, same leading tokens: the two full blocks are reused, not copied
    assert _fill(kv, 2, "base", [*ten[:8], 99, 98, 97]) == 8
    assert kv.sequences[2].blocks[:2] == kv.sequences[1].blocks[:2]
    assert kv.used_tokens == 10 + 3 and kv.used_blocks == 4  # shared blocks counted once
    # another identity never matches, even with the same tokens
    assert kv.cached_prefix("adapter:a@v1", ten).tokens == 0
    assert _fill(kv, 3, "adapter:a@v1", ten[:5]) == 0
    assert kv.free_blocks == 0
    # the whole prompt cached: the last block is still prefilled (its logits are needed)
    assert kv.cached_prefix("base", ten[:8]).tokens == 4
    kv.release(1)
    assert kv.free_blocks == 1 and kv.prefix_stats().evictable_blocks == 0  # 1's full blocks: 2 holds them
    kv.release(2)
    stats = kv.prefix_stats()
    assert stats.evictable_blocks == 2 and kv.free_blocks == 4 and kv.used_tokens == 5  # 3 holds 2
    hit = kv.cached_prefix("base", ten)
    assert hit.tokens == 8 and hit.revived_tokens == 8
    # memory pressure: a new sequence takes the free blocks first, then the least recently used
    # cached block (the tail of the released prefix), never a block in use
    kv.extend(4, 3 * 4)  # 2 free blocks and 1 cached one
    assert kv.prefix_stats().evictions == 1 and kv.cached_prefix("base", ten).tokens == 4
    kv.extend(5, 4)
    assert kv.prefix_stats().evictions == 2 and kv.cached_prefix("base", ten).tokens == 0
    assert kv.free_blocks == 0 and kv.used_blocks == 6
    with pytest.raises(MemoryError):
        kv.extend(6, 1)
    for seq_id in (3, 4, 5):
        kv.release(seq_id)
    assert kv.free_blocks == 6 and kv.used_tokens == 0


def test_chain_keys_name_the_whole_prefix_and_the_identity() -> None:
    tokens = list(range(32))
    a = chain_keys("base", tokens, BLOCK)
    assert len(a) == 2 and a == chain_keys("base", [*tokens, 5], BLOCK)
    assert chain_keys("base", [7, *tokens[1:]], BLOCK)[1] != a[1]  # a change upstream changes every later key
    assert chain_keys("adapter:x@v1", tokens, BLOCK)[0] != a[0]


def test_a_sequence_started_on_a_cached_prefix_prefills_the_rest_from_there(llama) -> None:
    _, path = llama
    runner = NativeLlamaRunner(path, kv_cache_tokens=1024)
    ids = _prompt(0, 70)
    cold = runner.prefill([PrefillInput(1, ids, 0, BASE_SLOT)]).logits[0]
    runner.release([1])
    assert runner.start_sequence(2, "base", ids) == 0  # nothing registered under an identity yet
    runner.prefill([PrefillInput(2, ids, 0, BASE_SLOT)])
    start = runner.start_sequence(3, "base", ids)
    assert start == 64  # 4 full blocks; the last 6 tokens are prefilled
    warm = runner.prefill([PrefillInput(3, ids[start:], start, BASE_SLOT)]).logits[0]
    torch.testing.assert_close(warm, cold, rtol=1e-4, atol=1e-4)
    assert runner.kv.sequences[3].blocks[:4] == runner.kv.sequences[2].blocks[:4]
    with pytest.raises(ValueError, match="chunk starts at 0, cache holds 64"):
        runner.start_sequence(4, "base", ids)
        runner.prefill([PrefillInput(4, ids, 0, BASE_SLOT)])


# ----------------------------------------------------------------------------- through the engine


def test_warm_outputs_equal_cold_ones_for_the_base_and_every_adapter(make_engine, adapters) -> None:
    cold, warm = make_engine(cache=False), make_engine()
    ids = _prompt(1, 120)
    for adapter in (None, *adapters.values()):
        want, cached = _run(cold, ids, adapter)
        assert cached == 0
        assert _run(warm, ids, adapter) == (want, 0)  # first under this identity: nothing cached
        tokens, cached = _run(warm, ids, adapter)
        assert tokens == want and cached == 112  # 7 full blocks; the 8th holds the last token
        longer = [*ids, *_prompt(2, 40)]  # the next turn: history + new message
        tokens, cached = _run(warm, longer, adapter)
        assert tokens == _run(cold, longer, adapter)[0] and cached >= len(ids) // 2
    assert cold.runner.prefix_cache_stats().lookups == 0  # off: never looked up


def test_one_prompt_under_a_then_the_base_then_b_gives_each_its_own_output(make_engine, adapters) -> None:
    cold, warm = make_engine(cache=False), make_engine()
    ids = _prompt(3, 150)
    outputs = []
    for adapter in (adapters["a"], None, adapters["b"]):
        tokens, cached = _run(warm, ids, adapter)
        assert cached == 0 and tokens == _run(cold, ids, adapter)[0]
        outputs.append(tokens)
    assert outputs[0] != outputs[1] != outputs[2]  # the three really differ: a shared block would show
    assert _run(warm, ids, adapters["a"]) == (outputs[0], 144)


def test_a_replaced_or_reuploaded_adapter_never_reads_its_earlier_version(make_engine, adapters) -> None:
    cold, warm = make_engine(cache=False), make_engine()
    ids = _prompt(4, 100)
    old = adapters["a"]
    _run(warm, ids, old)
    # replaced in place: the same id, other weights, a new version (the store's v<seq>-<sha256[:8]>)
    layers = {m: dataclasses.replace(w, B=-w.B) for m, w in old.layers.items()}
    new = LoraAdapter(old.adapter_id, old.config, layers, version="v2-replaced")
    tokens, cached = _run(warm, ids, new)
    assert cached == 0 and tokens == _run(cold, ids, new)[0] != _run(cold, ids, old)[0]
    # deleted and uploaded again with the very same files: a new version all the same (seq never repeats)
    again = dataclasses.replace(old, version="v3-reuploaded")
    assert _run(warm, ids, again)[1] == 0
    assert prefix_identity(GenerationRequest([1], SamplingParams(), again)) != prefix_identity(
        GenerationRequest([1], SamplingParams(), old)
    )


def test_adapter_scales_do_not_share_blocks(make_engine, adapters) -> None:
    cold, warm = make_engine(cache=False), make_engine()
    ids = _prompt(5, 100)
    a = adapters["a"]
    full, _ = _run(warm, ids, a, scale=1.0)
    half, cached = _run(warm, ids, a, scale=0.5)
    assert cached == 0 and half == _run(cold, ids, a, scale=0.5)[0] and half != full
    assert _run(warm, ids, a, scale=0.5) == (half, 96)
    assert _run(warm, ids, a, scale=1.0) == (full, 96)


def test_merged_and_unmerged_serving_of_one_adapter_share_blocks(
    llama, tokenizer, make_engine, adapters
) -> None:
    """The same identity (docs/prefix-caching.md): merged W' = W + s·B·A and unmerged W x + s·B(A x)
    differ by float rounding only, so a merged request reads unmerged K and V and vice versa;
    its greedy output still equals its cold output in both modes."""
    _, path = llama
    a = adapters["a"]
    ids = _prompt(6, 100)
    merged_cold = _run(make_engine(cache=False, mode="merged", checkpoint_dir=path), ids, a)[0]
    unmerged_cold = _run(make_engine(cache=False), ids, a)[0]
    base_cold = _run(make_engine(cache=False), ids)[0]
    assert merged_cold == unmerged_cold != base_cold
    runner = NativeLlamaRunner(path, kv_cache_tokens=4096)  # one KV memory, two serving modes
    unmerged = Engine(runner, tokenizer, EngineConfig(mode="unmerged"))
    assert _run(unmerged, ids) == (base_cold, 0)  # the base's blocks are cached too
    assert _run(unmerged, ids, a) == (unmerged_cold, 0)
    merged = Engine(runner, tokenizer, EngineConfig(mode="merged", checkpoint_dir=path))
    # the weights now hold a and its rows run in the base slot: they read a's blocks, not the base's
    tokens, cached = _run(merged, ids, a)
    assert merged.merged_adapter_id == "a" and cached == 96 and tokens == merged_cold


def test_eviction_under_pressure_with_16_concurrent_requests_keeps_every_output(
    make_engine, adapters
) -> None:
    cold = make_engine(cache=False)
    shared = [_prompt(10 + i, 64) for i in range(3)]  # three system prompts
    jobs = []
    for i in range(16):
        adapter = (None, adapters["a"], adapters["b"])[i % 3]
        jobs.append(([*shared[i % 3], *_prompt(100 + i, 8 + i)], adapter))
    want = [_run(cold, ids, adapter, n=12)[0] for ids, adapter in jobs]
    # 20 blocks of 16: 16 rows of 5-7 blocks each cannot all be held, cached blocks must go
    warm = make_engine(tokens=320, max_prefill_tokens=128)
    kv = warm.runner.kv
    for _round in range(2):  # the second round finds some of the first round's blocks
        pending = [_submit(warm, ids, adapter, n=12) for ids, adapter in jobs]
        for _ in range(10_000):
            warm._drain_inbox(block=False)
            if not warm.busy:
                break
            warm.step()
            usage = warm.runner.kv_usage()
            assert usage.used_tokens <= usage.capacity == 320 and kv.used_blocks <= kv.num_blocks
            held = {b for s in kv.sequences.values() for b in s.blocks}
            assert len(held) == kv.used_blocks  # a block in use is never on the free or evictable lists
        assert [_result(events)[0] for events in pending] == want
    stats = warm.runner.prefix_cache_stats()
    assert stats.evictions > 0 and stats.hit_tokens > 0 and warm.stats.preemptions >= 1
    assert kv.free_blocks == kv.num_blocks and kv.used_tokens == 0


def test_kv_memory_budget_is_never_exceeded(llama, tokenizer) -> None:
    _, path = llama
    budget = 200_000
    runner = NativeLlamaRunner(path, kv_cache_bytes=budget)
    engine = Engine(runner, tokenizer, EngineConfig(mode="unmerged"))
    per_token = runner.kv.bytes_reserved // (runner.kv.num_blocks + 1) // BLOCK
    ids = _prompt(20, 100)
    for _ in range(3):
        _run(engine, ids)
        assert runner.kv.bytes_reserved <= budget
        assert runner.kv_usage().used_tokens * per_token <= budget


def test_prompt_logprobs_requests_prefill_everything_and_still_feed_the_cache(make_engine) -> None:
    engine = make_engine()
    ids = _prompt(21, 50)
    events: list[Event] = []
    request = GenerationRequest(
        prompt_ids=ids, params=SamplingParams(max_new_tokens=2), adapter=None,
        want_prompt_logprobs=True, sink=events.append,
    )  # fmt: skip
    _run(engine, ids)
    engine.submit(request)
    engine.run_until_idle()
    _, finish = _result(events)
    assert finish.cached_tokens == 0 and len(finish.prompt_logprobs) == len(ids) - 1
    assert _run(engine, ids)[1] == 48


def test_the_hf_runner_has_no_prefix_cache(tiny_model, tokenizer) -> None:
    engine = Engine.for_hf_model(tiny_model, tokenizer, EngineConfig(mode="unmerged", prefix_cache=True))
    assert not engine.prefix_cache and engine.runner.prefix_cache_stats() is None
    ids = _prompt(22, 40)
    assert _run(engine, ids)[1] == 0 and _run(engine, ids)[1] == 0


# ----------------------------------------------------------------------------- settings and /info


def test_prefix_cache_setting_flag_env_and_refusal(monkeypatch) -> None:
    from pydantic import ValidationError
    from typer.testing import CliRunner

    from server.cli import app
    from server.config import Settings

    assert Settings().prefix_cache == "on"
    monkeypatch.setenv("LORAPLEX_PREFIX_CACHE", "off")
    assert Settings().prefix_cache == "off"
    with pytest.raises(ValidationError, match="prefix_cache"):
        Settings(prefix_cache="sometimes")
    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert "--prefix-cache" in result.output


def _chat_cached(client, model: str, text: str) -> int:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 2,
        "temperature": 0,
    }
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


@pytest.mark.parametrize(("runner", "setting"), [("hf", "on"), ("native", "off"), ("native", "on")])
def test_info_and_usage_say_whether_the_prefix_cache_runs(
    llama, tokenizer, tmp_path, runner, setting
) -> None:
    from tests.api_helpers import start_client

    model, path = llama
    client = start_client(model, tokenizer, tmp_path, model_path=path, runner=runner, prefix_cache=setting)
    try:
        info = client.get("/info").json()
        text = " ".join(["a long shared history"] * 20)
        first, second = (_chat_cached(client, info["model"], text) for _ in range(2))
        if runner == "native" and setting == "on":
            assert info["prefix_cache"]["enabled"] is True and info["prefix_cache"]["lookups"] == 0
            assert first == 0 and second > 0
            assert client.get("/info").json()["prefix_cache"]["hit_tokens"] == second
            assert "loraplex_prefix_cache_hit_tokens_total" in client.get("/metrics").text
        else:
            reason = "--prefix-cache off" if runner == "native" else "the hf runner has no prefix cache"
            assert info["prefix_cache"]["enabled"] is False and reason in info["prefix_cache"]["reason"]
            assert first == second == 0
            assert "loraplex_prefix_cache_lookups" not in client.get("/metrics").text
    finally:
        client.__exit__(None, None, None)
