"""Screening at upload (adapters.screening): coverage, each warning, and the no-match refusal."""

from __future__ import annotations

import pytest
import torch

from adapters.errors import AdapterError
from adapters.peft_format import BaseLinearShape, build_adapter, linear_shapes, parse_adapter_config
from adapters.screening import coverage, screen, spectral_norm_estimate
from server.engine.hf_runner import HFRunner
from tests.adapter_files import adapter_config, adapter_tensors


@pytest.fixture
def runner(tiny_model) -> HFRunner:
    return HFRunner(tiny_model)


@pytest.fixture
def shapes(runner) -> dict[str, BaseLinearShape]:
    return runner.base_shapes


def _adapter(model, shapes, *, r=8, alpha=16.0, targets=("q_proj", "v_proj"), edit=None, b=0.5, **config):
    tensors = adapter_tensors(model, seed=3, r=r, targets=targets, b=b)
    if edit is not None:
        edit(tensors)
    spec = parse_adapter_config(adapter_config(r=r, alpha=alpha, targets=targets, **config))
    return build_adapter("a", spec, tensors, shapes, max_rank=64)


def _types(result) -> list[str]:
    return [w["type"] for w in result["warnings"]]


def _weight_fn(runner):
    return lambda module: runner.weight_targets[module].read()


def test_coverage_counts_modules_per_layer_and_in_all(tiny_base, shapes) -> None:
    def only_layer_1(tensors):
        for key in [k for k in tensors if ".layers.0." in k]:
            del tensors[key]

    adapter = _adapter(tiny_base, shapes, edit=only_layer_1, layers_to_transform=[1])
    cov = coverage(adapter, shapes)
    assert (
        cov["modules"] == 2 and cov["of"] == len(linear_shapes(shapes)) == 14
    )  # the embedding and head apart
    assert cov["fraction"] == pytest.approx(2 / 14)
    assert cov["layers"]["0"] == {"modules": [], "of": 7}
    assert cov["layers"]["1"] == {"modules": ["q_proj", "v_proj"], "of": 7}
    assert cov["module_types"] == {"q_proj": 1, "v_proj": 1}


def test_a_plain_random_adapter_has_no_warnings(tiny_base, shapes, runner) -> None:
    adapter = _adapter(tiny_base, shapes, b=1e-3)  # σ₁(ΔW) well below σ_max(W) (random W: ~0.3)
    assert screen(adapter, shapes, _weight_fn_norm(runner))["warnings"] == []


def _weight_fn_norm(runner):
    weight = _weight_fn(runner)
    return lambda module: spectral_norm_estimate(weight(module))


def test_zero_b_is_no_effect(tiny_base, shapes) -> None:
    def zero_b(tensors):
        for key in tensors:
            if "lora_B" in key:
                tensors[key].zero_()

    result = screen(_adapter(tiny_base, shapes, edit=zero_b), shapes)
    assert _types(result) == ["no_effect"]
    assert "every lora_B is zero" in result["warnings"][0]["message"]
    assert len(result["warnings"][0]["modules"]) == 4


def test_some_zero_modules_are_named(tiny_base, shapes) -> None:
    def zero_one(tensors):
        tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].zero_()

    result = screen(_adapter(tiny_base, shapes, edit=zero_one), shapes)
    assert _types(result) == ["zero_modules"]
    assert result["warnings"][0]["modules"] == ["model.layers.1.self_attn.v_proj"]


def test_rank_far_above_the_effective_rank(tiny_base, shapes) -> None:
    def rank_one(tensors):  # every row of A the same direction: ΔW has rank 1 whatever r is
        for key, t in tensors.items():
            if "lora_A" in key:
                t.copy_(t[:1].expand_as(t))

    result = screen(_adapter(tiny_base, shapes, r=16, edit=rank_one), shapes)
    assert _types(result) == ["rank_above_effective"]
    assert "rank 16" in result["warnings"][0]["message"] and "shrink" in result["warnings"][0]["message"]
    # the same spectrum at rank 4 is below the warning's floor (MIN_RANK_FOR_WARNING)
    assert screen(_adapter(tiny_base, shapes, r=4, edit=rank_one), shapes)["warnings"] == []


def test_large_update_against_the_base_norm(tiny_base, shapes, runner) -> None:
    norm = _weight_fn_norm(runner)
    assert screen(_adapter(tiny_base, shapes, b=1e-3), shapes, norm)["warnings"] == []
    big = _adapter(tiny_base, shapes, b=1e-3, alpha=4000.0)  # the same factors, 250 times the scale
    result = screen(big, shapes, norm)
    assert _types(result) == ["large_update"] and len(result["warnings"][0]["modules"]) == 4
    assert "σ₁(ΔW)/σ_max(W)" in result["warnings"][0]["message"]
    assert screen(big, shapes, None)["warnings"] == []  # no base weights at hand: not checked


def test_unmatched_target_entries_warn(tiny_base, shapes) -> None:
    result = screen(_adapter(tiny_base, shapes, targets=("q_proj", "v_proj", "c_attn")), shapes)
    assert _types(result) == ["unmatched_targets"] and result["warnings"][0]["modules"] == ["c_attn"]


def test_targets_matching_no_module_are_refused_naming_them(tiny_base, shapes) -> None:
    spec = parse_adapter_config(adapter_config(targets=("c_attn", "c_proj")))
    tensors = {"base_model.model.h.0.attn.c_attn.lora_A.weight": torch.zeros(8, 64),
               "base_model.model.h.0.attn.c_attn.lora_B.weight": torch.zeros(64, 8)}  # fmt: skip
    with pytest.raises(AdapterError) as err:
        build_adapter("a", spec, tensors, shapes)
    message = err.value.message
    assert err.value.error_type == "incompatible"
    for word in ("c_attn", "c_proj", "match no module", "q_proj", "'h.0.attn.c_attn'"):
        assert word in message, message


def test_spectral_norm_estimate_is_close_to_exact() -> None:
    W = torch.randn(96, 64, generator=torch.Generator().manual_seed(1))
    exact = float(torch.linalg.matrix_norm(W, 2))
    assert spectral_norm_estimate(W) == pytest.approx(exact, rel=0.02)
    assert spectral_norm_estimate(torch.zeros(4, 4)) == 0.0
