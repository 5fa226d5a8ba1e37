"""Merged hot-swap: the base weights come back bit for bit after any number of swaps."""

from __future__ import annotations

import dataclasses
import random
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapters.peft_format import load_adapter_dir
from server.engine.engine import Engine, EngineConfig
from server.engine.hf_runner import HFRunner
from server.engine.merge import MergeManager, SwapStats
from server.engine.requests import GenerationRequest
from server.engine.sampling import SamplingParams
from server.engine.scheduler import AutoPolicy, plan_merged
from tests.engine_helpers import outcome, run_many, run_one, submit, verify_base_now

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PROMPTS = ["Hello there, how are", "The quick brown fox", "A", "Once upon a time in a land far away"]


@pytest.fixture(scope="module")
def saved(tiny_base, tmp_path_factory):
    """The tiny model saved as safetensors, and four all-linear adapters for it."""
    from tests.conftest import make_peft_adapter

    root = tmp_path_factory.mktemp("merge")
    tiny_base.save_pretrained(root / "model")
    paths = []
    for i in range(4):
        target = ["q_proj", "v_proj", "down_proj"] if i % 2 else "all-linear"
        make_peft_adapter(
            tiny_base, root / f"a{i}", seed=i, r=4 + 4 * i, lora_alpha=16, target_modules=target
        )
        paths.append(root / f"a{i}")
    return root / "model", paths


def _wrapped(model_dir, dtype) -> HFRunner:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    return HFRunner(model, own_weights=True)


def _adapters(paths, runner):
    return [load_adapter_dir(p, f"a{i}", runner.base_shapes) for i, p in enumerate(paths)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("source", ["checkpoint", "copy"])
def test_thousand_random_swaps_restore_the_base_bit_for_bit(saved, dtype, source) -> None:
    model_dir, paths = saved
    runner = _wrapped(model_dir, dtype)
    layers = runner.layers
    originals = {n: layer.base.weight.detach().clone() for n, layer in layers.items()}
    adapters = _adapters(paths, runner)
    manager = MergeManager(
        runner.weight_targets, model_dir if source == "checkpoint" else None, can_merge=True
    )
    if source == "checkpoint":
        assert manager.restored_from_checkpoint == len(layers) and manager.extra_bytes == 0
    else:
        assert manager.extra_bytes == sum(w.numel() * w.element_size() for w in originals.values())
    rng = random.Random(0)
    for _ in range(1000):
        manager.merge(rng.choice([*adapters, None]))
    assert manager.stats.swaps > 500
    manager.merge(None)
    assert manager.digest() == manager.digest_at_load
    for name, layer in layers.items():
        assert torch.equal(layer.base.weight, originals[name]), name


def test_naive_subtract_and_add_drifts_in_bfloat16(saved) -> None:
    """What the exact restore avoids: W - sBA + sBA is not W after rounding."""
    model_dir, paths = saved
    runner = _wrapped(model_dir, torch.bfloat16)
    layers = runner.layers
    adapter = _adapters(paths, runner)[0]
    name, w = next(iter(adapter.layers.items()))
    weight = layers[name].base.weight.detach().clone()
    original = weight.clone()
    delta = (w.scale * w.B @ w.A).to(torch.bfloat16)
    for _ in range(100):
        weight += delta
        weight -= delta
    assert (weight.float() - original.float()).abs().max() > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_merged_weight_is_the_dense_reference(saved, dtype) -> None:
    model_dir, paths = saved
    runner = _wrapped(model_dir, dtype)
    layers = runner.layers
    adapters = _adapters(paths, runner)
    originals = {n: layer.base.weight.detach().clone() for n, layer in layers.items()}
    manager = MergeManager(runner.weight_targets, model_dir, can_merge=True)
    manager.merge(adapters[1])
    manager.merge(adapters[0])  # a swap: restore a1's layers, then add a0
    for name, layer in layers.items():
        expected = originals[name]
        if name in adapters[0].layers:
            w = adapters[0].layers[name]
            expected = (expected.float() + w.scale * (w.B @ w.A)).to(dtype)
        assert torch.equal(layer.base.weight, expected), name


def test_unmerged_mode_prepares_nothing(saved) -> None:
    model_dir, _ = saved
    runner = _wrapped(model_dir, torch.float32)
    manager = MergeManager(runner.weight_targets, model_dir, can_merge=False)
    assert manager.extra_bytes == 0 and manager.restored_from_checkpoint == 0
    with pytest.raises(RuntimeError, match="merged or auto"):
        manager.merge(_adapters(saved[1], runner)[0])


@pytest.mark.parametrize("source", ["checkpoint", "copy"])
def test_base_weights_read_from_another_thread_while_adapters_swap(saved, source) -> None:
    """``BaseWeights`` (what the analysis routes read from worker threads) gives the weights as
    loaded while the engine thread keeps merging adapters into the live ones."""
    model_dir, paths = saved
    runner = _wrapped(model_dir, torch.bfloat16)
    originals = {n: layer.base.weight.detach().clone() for n, layer in runner.layers.items()}
    adapters = _adapters(paths, runner)
    manager = MergeManager(
        runner.weight_targets, model_dir if source == "checkpoint" else None, can_merge=True
    )
    weights = manager.base_weights
    assert weights.modules == set(originals) and weights.digest == manager.digest_at_load
    stop = threading.Event()
    rng = random.Random(1)

    def swap() -> None:
        while not stop.is_set():
            manager.merge(rng.choice(adapters))

    swapper = threading.Thread(target=swap)
    swapper.start()
    try:
        for _ in range(5):
            for name, original in originals.items():
                assert torch.equal(weights.weight(name), original), name
    finally:
        stop.set()
        swapper.join()
    assert manager.stats.swaps > 0 and manager.merged is not None  # the live weights did change
    name = next(iter(originals))
    weights.weight(name).zero_()  # a copy: the caller may change it
    assert torch.equal(weights.weight(name), originals[name])
    with pytest.raises(KeyError):
        weights.weight("model.layers.99.self_attn.q_proj")


# ----------------------------------------------------------------------------- engine modes


def _engine(saved, tokenizer, mode: str, **config):
    model_dir, paths = saved
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    engine = Engine.for_hf_model(
        model, tokenizer, EngineConfig(mode=mode, checkpoint_dir=model_dir, **config)
    )
    return engine, _adapters(paths, engine.runner)


@pytest.mark.parametrize("mode", ["merged", "auto"])
def test_concurrent_requests_for_four_adapters_equal_their_solo_outputs(saved, tokenizer, mode) -> None:
    reference, adapters = _engine(saved, tokenizer, "unmerged")
    jobs = [(tokenizer(PROMPTS[i % 4])["input_ids"], [None, *adapters][i % 5]) for i in range(15)]
    solo = [run_one(reference, ids, a, max_new_tokens=12).tokens for ids, a in jobs]
    engine, adapters = _engine(saved, tokenizer, mode, switch_wait=0.0)
    jobs = [(ids, None if a is None else adapters[int(a.adapter_id[1:])]) for ids, a in jobs]
    outs = run_many(engine, jobs, max_new_tokens=12)
    assert [o.tokens for o in outs] == solo
    if mode == "merged":
        assert engine.stats.swaps >= 4  # every adapter was merged in turn
    assert verify_base_now(engine)["intact"]


def test_merged_mode_solo_outputs_equal_unmerged(saved, tokenizer) -> None:
    unmerged, ua = _engine(saved, tokenizer, "unmerged")
    merged, ma = _engine(saved, tokenizer, "merged")
    for i, prompt in enumerate(PROMPTS):
        ids = tokenizer(prompt)["input_ids"]
        assert (
            run_one(merged, ids, ma[i], max_new_tokens=10).tokens
            == run_one(unmerged, ids, ua[i], max_new_tokens=10).tokens
        )
    assert merged.merged_adapter_id == "a3"


def test_auto_merges_uniform_traffic_and_unmerges_for_mixed(saved, tokenizer) -> None:
    engine, adapters = _engine(saved, tokenizer, "auto", auto_min_uniform_steps=3)
    ids = tokenizer(PROMPTS[0])["input_ids"]
    solo = run_one(engine, ids, adapters[0], max_new_tokens=20)
    assert engine.merged_adapter_id == "a0"  # 20 steps of one adapter: merged
    _, events = submit(engine, ids, adapters[0], max_new_tokens=20)
    engine._drain_inbox(block=False)
    engine.step()
    assert engine.merged_adapter_id == "a0"
    _, other = submit(engine, ids, adapters[1], max_new_tokens=5)  # mixed: unmerge at once
    engine._drain_inbox(block=False)
    engine.step()
    assert engine.merged_adapter_id is None
    engine.run_until_idle()
    assert outcome(events).tokens == solo.tokens
    assert outcome(other).tokens == run_one(engine, ids, adapters[1], max_new_tokens=5).tokens


def test_auto_unmerges_for_an_expected_adapter_before_its_request_arrives(saved, tokenizer) -> None:
    """Issue 29: a request for another adapter, announced while the engine is idle with an adapter
    merged (``Engine.expect``: the API does it before reading the adapter from disk), unmerges at
    once, so its admission finds the base and swaps nothing; announcing the merged adapter itself,
    or announcing while rows run, changes nothing. Outputs equal those without the announcement."""
    engine, adapters = _engine(saved, tokenizer, "auto", auto_min_uniform_steps=3)
    adapters = [dataclasses.replace(a, version=f"v{i}") for i, a in enumerate(adapters)]  # as a store's
    ids = tokenizer(PROMPTS[0])["input_ids"]
    run_one(engine, ids, adapters[0], max_new_tokens=20)
    assert engine.merged_adapter_id == "a0"
    engine.expect(adapters[0].version)  # the merged one: stays
    engine._drain_inbox(block=False)
    engine.step()
    assert engine.merged_adapter_id == "a0"
    _, running = submit(engine, ids, adapters[0], max_new_tokens=20)
    engine._drain_inbox(block=False)
    engine.step()
    engine.expect(adapters[1].version)  # rows run: admission decides when the request comes
    engine._drain_inbox(block=False)
    engine.step()
    assert engine.merged_adapter_id == "a0"
    engine.run_until_idle()
    swaps = engine.stats.swaps
    engine.expect(adapters[1].version)  # idle, another adapter: unmerged now
    engine._drain_inbox(block=False)
    engine.step()
    assert engine.merged_adapter_id is None and engine.stats.swaps == swaps + 1
    _, expected = submit(engine, ids, adapters[1], max_new_tokens=5)
    engine._drain_inbox(block=False)
    engine.step()
    assert engine.stats.swaps == swaps + 1  # its admission (and prefill) swapped nothing
    engine.run_until_idle()
    reference, reference_adapters = _engine(saved, tokenizer, "unmerged")
    assert outcome(expected).tokens == run_one(reference, ids, reference_adapters[1], max_new_tokens=5).tokens
    assert outcome(running).tokens == run_one(reference, ids, reference_adapters[0], max_new_tokens=20).tokens


def test_verify_base_drains_a_merged_batch_first(saved, tokenizer) -> None:
    engine, adapters = _engine(saved, tokenizer, "merged")
    ids = tokenizer(PROMPTS[1])["input_ids"]
    _, events = submit(engine, ids, adapters[2], max_new_tokens=6)
    engine._drain_inbox(block=False)
    engine.step()
    assert engine.merged_adapter_id == "a2"
    future = engine.verify_base()
    _, later = submit(engine, ids, adapters[2], max_new_tokens=3)  # not admitted until verified
    engine.run_until_idle()
    result = future.result(timeout=0)
    assert (
        result["intact"]
        and result["sha256_now"] == result["sha256_at_load"]
        and result["swaps_since_load"] >= 2
    )
    assert len(outcome(events).tokens) == 6 and len(outcome(later).tokens) == 3
    assert engine.base_weights().digest == result["sha256_at_load"]  # what the analysis caches key on


# ----------------------------------------------------------------------------- policies


def _request(adapter_key: str | None, age: float) -> GenerationRequest:
    adapter = None
    if adapter_key is not None:
        adapter = type("A", (), {"key": adapter_key, "adapter_id": adapter_key})()
    request = GenerationRequest(prompt_ids=[1], params=SamplingParams(), adapter=adapter)  # type: ignore[arg-type]
    request.submitted_at = time.perf_counter() - age
    return request


def test_plan_merged_bounded_waiting() -> None:
    # others waited less than switch_wait while matching requests exist: keep serving the merged one
    plan = plan_merged([_request("m", 0.0), _request("x", 0.1)], "m", batch_empty=False, switch_wait=1.0)
    assert plan.admit and plan.admit_key == "m" and plan.switch_to is None
    # the other waited long enough: stop admitting m so the batch drains
    plan = plan_merged([_request("m", 0.0), _request("x", 2.0)], "m", batch_empty=False, switch_wait=1.0)
    assert not plan.admit
    # drained: switch to the oldest other request's adapter
    waiting = [_request("m", 0.0), _request("y", 3.0), _request("x", 2.0)]
    plan = plan_merged(waiting, "m", batch_empty=True, switch_wait=1.0)
    assert plan.switch_to is waiting[1] and plan.admit_key == "y"
    # nothing else for m: switch as soon as the batch is empty, whatever the wait
    plan = plan_merged([_request(None, 0.0)], "m", batch_empty=True, switch_wait=10.0)
    assert plan.switch_to is not None and plan.admit_key is None


def test_auto_policy_hysteresis() -> None:
    policy = AutoPolicy(min_uniform_steps=4)
    assert [policy.decide({"a"}, None, 0.0) for _ in range(4)] == ["keep", "keep", "keep", "a"]
    assert policy.decide({"a", "b"}, "a", 0.0) is None  # mixed: unmerge at once
    assert policy.decide({"a", None}, None, 0.0) == "keep"
    assert policy.decide({None}, None, 0.0) == "keep"  # base-only traffic: nothing to merge
    policy.observe_step(0.01)
    assert policy.steps_needed(swap_seconds=0.5) == 100  # ski rental: merge + unmerge = 100 steps


def test_one_slow_swap_does_not_postpone_later_merges() -> None:
    """Auto mode prices a swap at the lower median of the recent ones: a single outlier (a busy
    neighbour, a first merge touching fresh pages) is ignored once there are other swaps, and the
    estimate still follows swaps that really are slower."""
    stats = SwapStats()
    assert stats.typical_swap_seconds() == 0.0
    stats.history = [0.02, 1.5]
    assert stats.typical_swap_seconds() == 0.02  # the last swap alone would say 1.5 s
    stats.history = [0.02, 1.5, 0.03]
    assert stats.typical_swap_seconds() == 0.03
    stats.history = [0.02, 0.9, 1.0, 1.1]  # swaps got dearer for good (a bigger adapter): follow them
    assert stats.typical_swap_seconds() == 0.9
    stats.history = [0.01] * 10 + [2.0, 2.0, 2.0]  # only the last five count
    assert stats.typical_swap_seconds() == 2.0
