"""Adapter composition (adapters/compose.py) on a tiny random Llama, against PEFT's add_weighted_adapter.

linear must equal PEFT's ``cat`` (the exact ΔW = Σ wᵢ·sᵢ·BᵢAᵢ) token for token; ties must equal
PEFT's ``ties`` factor for factor; DARE is reproducible with a seed and keeps about ``density`` of
the entries; a composition served by the engine batches with other adapters and the base.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import math

import pytest
import torch
from peft import PeftModel

from adapters.archive import AdapterFiles
from adapters.compose import CompositionSpec, compose, composition_digest, dare_prune, seed_of
from adapters.compose_files import composed_files
from adapters.errors import AdapterError
from adapters.peft_format import load_adapter_dir
from adapters.store import AdapterStore, parse_adapter_files
from server.api.compose_schemas import MergedAdapters
from server.api.composition import CompositionService
from server.engine.engine import Engine, EngineConfig
from tests.adapter_files import linear_shapes, make_adapter
from tests.conftest import make_peft_adapter
from tests.engine_helpers import run_many, run_one

PROMPTS = ["Hello there, how are", "The quick brown fox", "Once upon a time"]
# a and b: the same rank (ties and DARE need it), different alphas and targets (their union is
# composed); c: another rank, rsLoRA, every linear layer
SOURCES = {
    "a": dict(seed=11, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "b": dict(seed=12, r=8, lora_alpha=8, target_modules=["v_proj", "o_proj", "down_proj"]),
    "c": dict(seed=13, r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True),
}


@pytest.fixture(scope="module")
def sources(tiny_base, tmp_path_factory):
    """The adapters' folders and their parsed forms."""
    root = tmp_path_factory.mktemp("compose")
    shapes = linear_shapes(tiny_base)
    folders, parsed = {}, {}
    for name, kwargs in SOURCES.items():
        kwargs = dict(kwargs)
        make_peft_adapter(tiny_base, root / name, seed=kwargs.pop("seed"), b_scale=0.5, **kwargs)
        folders[name] = root / name
        parsed[name] = load_adapter_dir(root / name, name, shapes)
    return folders, parsed


def _peft_mix(tiny_base, folders, names, weights, combination_type, **kwargs) -> PeftModel:
    model = PeftModel.from_pretrained(copy.deepcopy(tiny_base), folders[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(folders[name], adapter_name=name)
    model.add_weighted_adapter(names, weights, "mix", combination_type=combination_type, **kwargs)
    model.set_adapter("mix")
    return model.eval()


def _generate(model, tokenizer, prompt: str, n: int = 10) -> list[int]:
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=2)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def _engine(tiny_base, tokenizer, **config) -> Engine:
    config.setdefault("mode", "unmerged")
    return Engine.for_hf_model(copy.deepcopy(tiny_base), tokenizer, EngineConfig(**config))


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def _delta(layer) -> torch.Tensor:
    return layer.scale * (layer.B.double() @ layer.A.double())  # [d, k]


def test_linear_equals_peft_cat_token_for_token_in_a_mixed_batch(sources, tiny_base, tokenizer) -> None:
    folders, parsed = sources
    names, weights = ["a", "c"], [0.7, -0.4]
    mix = compose([parsed[n] for n in names], weights, CompositionSpec("linear"), adapter_id="mix")
    peft = _peft_mix(tiny_base, folders, names, weights, "cat")
    assert set(mix.layers) == set(parsed["a"].layers) | set(parsed["c"].layers)  # the union of targets
    for module, layer in mix.layers.items():
        exact = sum(
            w * _delta(parsed[n].layers[module])
            for n, w in zip(names, weights, strict=True)
            if module in parsed[n].layers
        )
        torch.testing.assert_close(_delta(layer), exact, rtol=0, atol=1e-6)
        peft_delta = peft.base_model.model.get_submodule(module).get_delta_weight("mix").double()
        torch.testing.assert_close(_delta(layer), peft_delta, rtol=0, atol=1e-6)
        assert layer.rank == sum(parsed[n].layers[module].rank for n in names if module in parsed[n].layers)
    engine = _engine(tiny_base, tokenizer)
    jobs = [(p, adapter) for p in PROMPTS for adapter in (mix, None, parsed["a"])]
    outcomes = run_many(engine, [(_ids(tokenizer, p), adapter) for p, adapter in jobs], max_new_tokens=10)
    for (prompt, adapter), got in zip(jobs, outcomes, strict=True):
        reference = peft if adapter is mix else tiny_base if adapter is None else None
        if reference is not None:
            assert got.tokens == _generate(reference, tokenizer, prompt), (prompt, adapter)
    base_tokens = [o.tokens for (_, a), o in zip(jobs, outcomes, strict=True) if a is None]
    mix_tokens = [o.tokens for (_, a), o in zip(jobs, outcomes, strict=True) if a is mix]
    assert mix_tokens != base_tokens  # the composition changes the output


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_ties_equals_peft_ties(sources, tiny_base, tokenizer, sign_method) -> None:
    folders, parsed = sources
    names, weights = ["a", "b"], [0.6, 0.9]
    spec = CompositionSpec("ties", density=0.5, majority_sign_method=sign_method)
    mix = compose([parsed[n] for n in names], weights, spec, adapter_id="mix")
    peft = _peft_mix(
        tiny_base, folders, names, weights, "ties", density=0.5, majority_sign_method=sign_method
    )
    for module, layer in mix.layers.items():
        target = peft.base_model.model.get_submodule(module)
        assert torch.equal(layer.A, target.lora_A["mix"].weight), module
        assert torch.equal(layer.B, target.lora_B["mix"].weight), module
        assert layer.scale == target.scaling["mix"] == 1.0
    if sign_method == "total":
        engine = _engine(tiny_base, tokenizer)
        for prompt in PROMPTS[:2]:
            assert run_one(engine, _ids(tokenizer, prompt), mix, max_new_tokens=10).tokens == _generate(
                peft, tokenizer, prompt
            )


def test_dare_is_reproducible_and_keeps_about_density(sources) -> None:
    _, parsed = sources
    pair = [parsed["a"], parsed["b"]]
    for strategy in ("dare_linear", "dare_ties"):
        spec = CompositionSpec(strategy, density=0.3, seed=7)
        first = compose(pair, [0.5, 0.5], spec, adapter_id="x")
        again = compose(pair, [0.5, 0.5], spec, adapter_id="x")
        other = compose(pair, [0.5, 0.5], dataclasses.replace(spec, seed=8), adapter_id="x")
        for module, layer in first.layers.items():
            assert torch.equal(layer.A, again.layers[module].A) and torch.equal(
                layer.B, again.layers[module].B
            )
        assert any(not torch.equal(layer.A, other.layers[m].A) for m, layer in first.layers.items())
    # modules only one source adapts (q_proj: a; o_proj, down_proj: b) keep about density of the entries,
    # rescaled by 1/density (PEFT's random_pruning)
    mix = compose(pair, [1.0, 1.0], CompositionSpec("dare_linear", density=0.3, seed=1), adapter_id="x")
    kept = total = 0
    for module, layer in mix.layers.items():
        if "v_proj" in module:
            continue
        source = (parsed["a"] if "q_proj" in module else parsed["b"]).layers[module]
        nonzero = layer.A != 0
        kept, total = kept + int(nonzero.sum()), total + layer.A.numel()
        ratio = layer.A[nonzero] / source.A[nonzero]
        torch.testing.assert_close(ratio, torch.full_like(ratio, math.sqrt(source.scale) / 0.3))
    assert abs(kept / total - 0.3) < 0.03, kept / total
    g = torch.Generator().manual_seed(3)
    pruned = dare_prune(torch.ones(100_000), 0.2, g)
    assert abs(float((pruned != 0).float().mean()) - 0.2) < 0.01 and float(pruned.max()) == pytest.approx(5.0)


def test_one_adapter_at_weight_one_and_the_same_adapter_twice_reproduce_it_exactly(
    sources, tiny_base, tokenizer
) -> None:
    _, parsed = sources
    a = parsed["a"]
    engine = _engine(tiny_base, tokenizer)
    alone = [run_one(engine, _ids(tokenizer, p), a, max_new_tokens=12).tokens for p in PROMPTS]
    for adapters, weights, strategy in (
        ([a], [1.0], "linear"),
        ([a, a], [0.5, 0.5], "linear"),
        ([a], [1.0], "ties"),  # PEFT: one adapter is always combined linearly
    ):
        mix = compose(adapters, weights, CompositionSpec(strategy, density=0.5), adapter_id="mix")
        for module, layer in a.layers.items():
            composed = mix.layers[module]
            assert torch.equal(composed.A, layer.A) and torch.equal(composed.B, layer.B)
            assert composed.scale == layer.scale
        assert [run_one(engine, _ids(tokenizer, p), mix, max_new_tokens=12).tokens for p in PROMPTS] == alone


def test_invalid_compositions_are_refused_with_what_to_change(sources) -> None:
    _, parsed = sources
    a, b, c = parsed["a"], parsed["b"], parsed["c"]
    cases = [
        (([a, b], [1.0], CompositionSpec()), "invalid_composition", "one weight per adapter"),
        (([a, b], [1.0, 1.0], CompositionSpec("svd")), "invalid_composition", "unknown"),
        (([a, b], [1.0, 1.0], CompositionSpec("ties", density=0.0)), "invalid_composition", "density"),
        (([a, b], [1.0, 1.0], CompositionSpec("ties", density=1.5)), "invalid_composition", "density"),
        (([a, b], [1.0, math.nan], CompositionSpec()), "invalid_composition", "finite"),
        (([a, c], [1.0, 1.0], CompositionSpec("dare_ties", 0.5)), "incompatible_ranks", "same rank"),
        (([], [], CompositionSpec()), "invalid_composition", "at least one"),
    ]
    for (adapters, weights, spec), error_type, words in cases:
        with pytest.raises(AdapterError) as info:
            compose(adapters, weights, spec, adapter_id="x")
        assert info.value.error_type == error_type and words in info.value.message, info.value.message
    with pytest.raises(AdapterError) as info:
        compose([a, c], [1.0, 1.0], CompositionSpec(), adapter_id="x", max_rank=10)
    assert info.value.error_type == "rank_too_large" and "rank" in info.value.message


def test_composed_files_round_trip_and_recompression_error(sources, tiny_base, tokenizer) -> None:
    """Written as PEFT files, a composition parses back to the same ΔW, and PEFT loads it; with a rank,
    each module holds the truncated SVD and reports ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F."""
    _, parsed = sources
    shapes = linear_shapes(tiny_base)
    mix = compose([parsed["a"], parsed["c"]], [0.7, 0.4], CompositionSpec(), adapter_id="mix")
    written = composed_files(mix, shapes)
    config = written.files.config.decode()
    assert '"target_modules": [' in config and "all-linear" not in config
    back = parse_adapter_files(written.files, "back", shapes, max_rank=64)
    assert set(back.layers) == set(mix.layers)
    for module, layer in mix.layers.items():
        torch.testing.assert_close(_delta(back.layers[module]), _delta(layer), rtol=0, atol=1e-6)
    low = composed_files(mix, shapes, rank=3)
    lowered = parse_adapter_files(low.files, "low", shapes, max_rank=64)
    for row in low.layers:
        module = row["module"]
        full, cut = _delta(mix.layers[module]), _delta(lowered.layers[module])
        assert row["stored_rank"] == lowered.layers[module].rank == min(3, row["rank"])
        expected = float(torch.linalg.matrix_norm(full - cut) / torch.linalg.matrix_norm(full))
        assert row["relative_error"] == pytest.approx(expected, abs=1e-5)
        assert (row["relative_error"] > 0) == (row["rank"] > 3)


def test_the_digest_names_what_matters_for_the_strategy() -> None:
    """The cache key and DARE's seed: the sources' sha256, the weights, and only the parameters the
    strategy uses."""
    sources = [("a", "1" * 64), ("b", "2" * 64)]
    linear = composition_digest(sources, [0.5, 0.5], CompositionSpec("linear", density=1.0))
    assert linear == composition_digest(sources, [0.5, 0.5], CompositionSpec("linear", 0.3, "frequency"))
    assert linear != composition_digest([("a", "3" * 64), sources[1]], [0.5, 0.5], CompositionSpec())
    assert linear != composition_digest(sources, [0.5, 0.6], CompositionSpec())
    ties = composition_digest(sources, [0.5, 0.5], CompositionSpec("ties", 0.5))
    assert ties != composition_digest(sources, [0.5, 0.5], CompositionSpec("ties", 0.5, "frequency"))
    dare = composition_digest(sources, [0.5, 0.5], CompositionSpec("dare_linear", 0.5))
    assert dare == composition_digest(sources, [0.5, 0.5], CompositionSpec("dare_linear", 0.5, "frequency"))
    assert len({linear, ties, dare}) == 3 and 0 <= seed_of(dare) < 2**63


def test_a_replaced_source_is_never_composed_stale(tiny_base, tmp_path) -> None:
    """The composition cache is keyed by the sources' content: a replace that keeps the weights but
    changes the config (``lora_alpha`` 8 -> 16: ΔW doubles) is a new composition, as is one that
    changes the weights; putting the first version back gives the first composition again."""
    store = AdapterStore(tmp_path / "store")
    store.bind_base(linear_shapes(tiny_base), 64)
    config, weights = make_adapter(tiny_base, seed=1, r=4, alpha=8)
    store.put("a", AdapterFiles(config, weights))
    store.put("b", AdapterFiles(*make_adapter(tiny_base, seed=2, r=4, targets=("o_proj",))))
    service = CompositionService(store, max_rank=64)
    merged = MergedAdapters(ids=["a", "b"], weights=[1.0, 0.5])

    def q_delta(composition) -> torch.Tensor:  # the composed ΔW of one q_proj: [d, k]
        return _delta(next(v for k, v in composition.adapter.layers.items() if k.endswith("q_proj")))

    first = asyncio.run(service.resolve(merged))
    doubled, _ = make_adapter(tiny_base, seed=1, r=4, alpha=16)
    store.put("a", AdapterFiles(doubled, weights), replace=True)  # the weights' sha256 is unchanged
    second = asyncio.run(service.resolve(merged))
    assert second.digest != first.digest and service.compositions == 2
    torch.testing.assert_close(q_delta(second), 2 * q_delta(first))
    store.put("a", AdapterFiles(*make_adapter(tiny_base, seed=3, r=4, alpha=16)), replace=True)
    third = asyncio.run(service.resolve(merged))
    assert third.digest not in (first.digest, second.digest) and service.compositions == 3
    store.put("a", AdapterFiles(config, weights), replace=True)  # the first content again
    again = asyncio.run(service.resolve(merged))
    assert again.digest == first.digest and service.compositions == 3  # a cache hit, the same seed
    torch.testing.assert_close(q_delta(again), q_delta(first))
