"""DoRA adapters (PEFT's ``use_dora``) against PEFT itself: parsing, unmerged rows mixed with plain
LoRA and base rows (every LoRA backend, both runners, graph steps), merged mode and its exact
restore, ``adapter_scale``, the engine's three modes, and what compose/shrink/analysis do."""

from __future__ import annotations

import copy
import json
import random
import re

import pytest
import torch

from adapters.analysis import ShrinkError, check_shrink_request
from adapters.compose import CompositionSpec, compose
from adapters.errors import AdapterError
from adapters.peft_format import build_adapter, load_adapter_dir, load_safetensors_bytes, parse_adapter_config
from adapters.screening import screen
from server.engine.engine import Engine, EngineConfig
from server.engine.hf_runner import HFRunner
from server.engine.lora_linear import BASE_SLOT
from server.engine.lora_model import AdapterSlots
from server.engine.merge import MergeManager
from server.engine.runner import DecodeInput, PrefillInput
from tests.engine_helpers import run_many, run_one
from tests.lora_backends import LORA_BACKENDS
from tests.unit.test_graphed_decode import _cuda_graph_stand_in
from tests.unit.test_native_runner import PROMPTS, _runner, _saved

DORA = dict(r=8, lora_alpha=16, target_modules="all-linear", use_dora=True)  # o_proj, down: add_to
DORA_QV = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
PLAIN = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.fixture(scope="module", params=["llama", "qwen2"])  # qwen2: q/k/v biases (not scaled by g)
def base(request, tmp_path_factory):
    return (request.param, *_saved(tmp_path_factory, request.param))


def _load(model, runner, factory, specs: dict[str, dict]) -> tuple[dict, dict]:
    adapters, pefts = {}, {}
    for seed, (name, kwargs) in enumerate(specs.items()):
        adapter_dir, pefts[name] = factory(model, f"dora-{name}-{random.random()}", seed=seed + 3, **kwargs)
        adapters[name] = load_adapter_dir(adapter_dir, name, runner.base_shapes)
    return adapters, pefts


def _reference(model, pefts, name, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return (model if name is None else pefts[name])(input_ids=torch.tensor([ids])).logits[0, -1]


SPECS = {"dora": DORA, "dora_qv": DORA_QV, "plain": PLAIN}
ROWS = [None, "dora", "plain", "dora_qv", None, "dora"]


def _check_mixed(runner, model, adapters, pefts, slots) -> None:
    """One mixed prefill and one decode step of ROWS, each row against PEFT (or the base)."""
    inputs = [
        PrefillInput(i, PROMPTS[i % 3], 0, BASE_SLOT if a is None else slots.acquire(adapters[a]))
        for i, a in enumerate(ROWS)
    ]
    logits = runner.prefill(inputs).logits
    for i, name in enumerate(ROWS):
        torch.testing.assert_close(
            logits[i], _reference(model, pefts, name, PROMPTS[i % 3]), rtol=1e-4, atol=1e-4
        )
    decoded = runner.decode([DecodeInput(i.seq_id, 5, i.slot) for i in inputs])
    for i, name in enumerate(ROWS):
        ref = _reference(model, pefts, name, [*PROMPTS[i % 3], 5])
        torch.testing.assert_close(decoded[i], ref, rtol=1e-4, atol=1e-4)


def test_dora_adapter_parses_with_its_magnitudes_and_bad_ones_are_refused(base, peft_adapter_factory) -> None:
    _, model, path = base
    runner = _runner(path)
    adapter_dir, _ = peft_adapter_factory(model, "parse", **DORA)
    adapter = load_adapter_dir(adapter_dir, "d", runner.base_shapes)
    assert adapter.is_dora and adapter.config.use_dora and len(adapter.layers) == 14
    for name, layer in adapter.layers.items():
        assert layer.magnitude is not None and layer.magnitude.shape == (
            runner.base_shapes[name].out_features,
        )
    config = (adapter_dir / "adapter_config.json").read_bytes()
    tensors = load_safetensors_bytes((adapter_dir / "adapter_model.safetensors").read_bytes())
    key = next(k for k in tensors if k.endswith("q_proj.lora_magnitude_vector"))
    cases = {
        "has no use_dora=true": (parse_adapter_config({**json.loads(config), "use_dora": False}), tensors),
        f"has no '{key.removeprefix('base_model.model.')}'": (
            parse_adapter_config(config),
            {k: v for k, v in tensors.items() if k != key},
        ),
        "needs [64]": (parse_adapter_config(config), {**tensors, key: torch.ones(3)}),
        "NaN, Inf": (parse_adapter_config(config), {**tensors, key: torch.full((64,), float("nan"))}),
    }
    for message, (spec, weights) in cases.items():
        with pytest.raises(AdapterError, match=re.escape(message)):
            build_adapter("d", spec, weights, runner.base_shapes)


@pytest.mark.parametrize("backend", LORA_BACKENDS)
def test_dora_rows_equal_peft_mixed_with_plain_lora_and_base_rows(
    base, backend, peft_adapter_factory
) -> None:
    _, model, path = base
    runner = _runner(path, lora_backend=backend)
    merger = MergeManager(runner.weight_targets, path, can_merge=False)
    slots = AdapterSlots(runner.lora_targets, 8, runner.slots_changed, merger.original_weight)
    adapters, pefts = _load(model, runner, peft_adapter_factory, SPECS)
    _check_mixed(runner, model, adapters, pefts, slots)


def test_dora_rows_equal_peft_on_the_hf_runner(base, peft_adapter_factory) -> None:
    _, model, _ = base
    runner = HFRunner(copy.deepcopy(model))
    merger = MergeManager(runner.weight_targets, None, can_merge=False)
    slots = AdapterSlots(runner.lora_targets, 8, runner.slots_changed, merger.original_weight)
    adapters, pefts = _load(model, runner, peft_adapter_factory, SPECS)
    _check_mixed(runner, model, adapters, pefts, slots)


def test_graph_steps_with_dora_rows_run_eagerly_and_equal_peft(
    tmp_path_factory, peft_adapter_factory
) -> None:
    """Graph steps (the CUDA-graph path, replayed eagerly on the CPU) have no DoRA term: a step with
    a DoRA row runs the eager forward instead; steps without one still replay graphs."""
    model, path = _saved(tmp_path_factory, "llama")
    runner = _runner(path, compile="off")
    graphs = _cuda_graph_stand_in(runner)
    merger = MergeManager(runner.weight_targets, path, can_merge=False)
    slots = AdapterSlots(runner.lora_targets, 8, runner.slots_changed, merger.original_weight)
    adapters, pefts = _load(model, runner, peft_adapter_factory, SPECS)
    plain, dora = slots.acquire(adapters["plain"]), slots.acquire(adapters["dora"])
    runner.prefill([PrefillInput(0, PROMPTS[0], 0, plain), PrefillInput(1, PROMPTS[1], 0, dora)])
    captures = graphs.captures
    logits = runner.decode([DecodeInput(0, 5, plain)])  # plain LoRA only: a graph
    assert graphs.captures == captures + 1
    torch.testing.assert_close(
        logits[0], _reference(model, pefts, "plain", [*PROMPTS[0], 5]), rtol=1e-4, atol=1e-4
    )
    logits = runner.decode([DecodeInput(0, 6, plain), DecodeInput(1, 5, dora)])  # a DoRA row: eager
    assert graphs.captures == captures + 1
    for row, (name, ids) in enumerate((("plain", [*PROMPTS[0], 5, 6]), ("dora", [*PROMPTS[1], 5]))):
        torch.testing.assert_close(logits[row], _reference(model, pefts, name, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["blocked", "packed", "dense"])
def test_merged_dora_equals_peft_and_the_base_is_restored_bit_for_bit(
    tmp_path_factory, layout, peft_adapter_factory
) -> None:
    model, path = _saved(tmp_path_factory, "qwen2")
    runner = _runner(path, weight_layout=layout)
    before = [p.weight.clone() for p in runner.model.projections()]
    merger = MergeManager(runner.weight_targets, path, can_merge=True)
    adapters, pefts = _load(model, runner, peft_adapter_factory, SPECS)
    for seq, name in enumerate(("dora", "plain", "dora_qv")):
        merger.merge(adapters[name])
        got = runner.prefill([PrefillInput(seq, PROMPTS[0], 0, BASE_SLOT)]).logits[0]
        torch.testing.assert_close(got, _reference(model, pefts, name, PROMPTS[0]), rtol=1e-4, atol=1e-4)
    rng = random.Random(0)
    for _ in range(100):
        merger.merge(rng.choice([*adapters.values(), None]))
    merger.merge(None)
    assert merger.digest() == merger.digest_at_load
    for weight, projection in zip(before, runner.model.projections(), strict=True):
        assert torch.equal(weight, projection.weight)


def test_adapter_scale_multiplies_the_whole_dora_update(tmp_path_factory, peft_adapter_factory) -> None:
    """adapter_scale t serves W + t·(W' − W): 0 is the base, unmerged rows equal the merged
    ``adapter.scaled(t)``, and the output moves linearly in t."""
    model, path = _saved(tmp_path_factory, "qwen2")
    runner = _runner(path)
    merger = MergeManager(runner.weight_targets, path, can_merge=True)
    slots = AdapterSlots(runner.lora_targets, 4, runner.slots_changed, merger.original_weight)
    adapters, pefts = _load(model, runner, peft_adapter_factory, {"dora": DORA})
    slot = slots.acquire(adapters["dora"])
    scales = [0.0, 0.5, 1.0, 1.5]
    inputs = [PrefillInput(i, PROMPTS[0], 0, slot, scale=t) for i, t in enumerate(scales)]
    logits = runner.prefill(inputs).logits
    base_ref, full = _reference(model, pefts, None, PROMPTS[0]), _reference(model, pefts, "dora", PROMPTS[0])
    torch.testing.assert_close(logits[0], base_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[2], full, rtol=1e-4, atol=1e-4)
    for i, t in enumerate(scales):
        merger.merge(adapters["dora"].scaled(t))
        merged = runner.prefill([PrefillInput(10 + i, PROMPTS[0], 0, BASE_SLOT)]).logits[0]
        torch.testing.assert_close(logits[i], merged, rtol=1e-4, atol=1e-4)
    merger.merge(None)
    assert merger.digest() == merger.digest_at_load


@pytest.mark.parametrize("mode", ["unmerged", "merged", "auto"])
def test_engine_serves_dora_like_peft_in_every_mode(llama, tokenizer, mode, peft_adapter_factory) -> None:
    model, path = llama
    engine = Engine(
        _runner(path, kv_cache_tokens=4096),
        tokenizer,
        EngineConfig(mode=mode, checkpoint_dir=path, auto_min_uniform_steps=1),
    )
    adapters, pefts = _load(model, engine.runner, peft_adapter_factory, {"dora": DORA, "plain": PLAIN})
    texts = ["Hello there, how are", "The quick brown fox", "Once upon a time"]
    jobs = [
        (tokenizer(texts[i % 3])["input_ids"], adapters.get(n))
        for i, n in enumerate([None, "dora", "plain", "dora"])
    ]
    outcomes = run_many(engine, jobs, max_new_tokens=8)
    solo = run_one(engine, jobs[1][0], adapters["dora"], max_new_tokens=8)
    for (ids, adapter), got in zip(jobs, outcomes, strict=True):
        reference = model if adapter is None else pefts[adapter.adapter_id]
        with torch.no_grad():
            ref = reference.generate(
                torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=2
            )
        assert got.tokens == ref[0, len(ids) :].tolist()
    assert solo.tokens == outcomes[1].tokens
    assert (engine.merger.stats.swaps > 0) == (mode != "unmerged")  # auto merged for the solo run
    if mode != "unmerged":
        engine.merger.merge(None)
    assert engine.merger.digest() == engine.merger.digest_at_load


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tokenizer):
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_llama_config

    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer))).eval()
    path = tmp_path_factory.mktemp("dora-engine-llama")
    model.save_pretrained(path)
    return model, path


def test_compose_and_shrink_refuse_dora_and_screening_reads_its_lora_part(base, peft_adapter_factory) -> None:
    _, model, path = base
    runner = _runner(path)
    adapters, _ = _load(model, runner, peft_adapter_factory, {"dora": DORA, "plain": PLAIN})
    with pytest.raises(AdapterError, match="'dora' is DoRA") as refused:
        compose([adapters["plain"], adapters["dora"]], [0.5, 0.5], CompositionSpec(), adapter_id="c")
    assert refused.value.error_type == "unsupported"
    with pytest.raises(ShrinkError, match="is DoRA") as refused_shrink:
        check_shrink_request(adapters["dora"], "rank", 2)
    assert refused_shrink.value.error_type == "unsupported"
    report = screen(adapters["dora"], runner.base_shapes)
    assert report["coverage"]["modules"] == 14 and report["warnings"] == []
    zero_b = {
        m: type(w)(w.A, torch.zeros_like(w.B), w.scale, w.magnitude)
        for m, w in adapters["dora"].layers.items()
    }
    zeroed = type(adapters["dora"])("z", adapters["dora"].config, zero_b)
    assert screen(zeroed, runner.base_shapes)["warnings"] == []  # the magnitude still rescales W
