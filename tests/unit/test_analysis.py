"""adapters.analysis / plots / report without HTTP: caches, shrunk adapters in PEFT, local analysis, plots."""

from __future__ import annotations

import copy
import json
import math
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from adapters import plots
from adapters.analysis import (
    AnalysisMemo,
    BaseStatsCache,
    ShrinkError,
    analyze,
    compile_layer_filter,
    natural_key,
    shrink_adapter,
    shrunk_config,
    weights_digest,
)
from adapters.peft_format import LoraConfigSpec
from adapters.report import format_report, render_html
from adapters.store import parse_adapter_files
from server.analyze_local import analyze_local
from tests.adapter_files import adapter_config, adapter_tensors, linear_shapes

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_lora(model, *, seed: int = 0, r: int = 8, targets=ALL, **config_extra):
    """A validated LoraAdapter plus its raw files (random factors on ``targets``)."""
    from adapters.archive import AdapterFiles

    config = json.dumps(adapter_config(r=r, alpha=16, targets=targets, **config_extra)).encode()
    files = AdapterFiles(
        config=config, weights=st_save(adapter_tensors(model, seed=seed, r=r, targets=targets))
    )
    return parse_adapter_files(files, f"a{seed}", linear_shapes(model), max_rank=64)


def weight_fn(model):
    return lambda name: model.get_submodule(name).weight.detach()


# --------------------------------------------------------------------------- base cache


def test_base_cache_persists_and_is_keyed_by_digest(tiny_base, tmp_path: Path) -> None:
    adapter = make_lora(tiny_base)
    cache = BaseStatsCache(tmp_path, "tiny model/x", "ab" * 32)
    first = analyze(adapter, weight_fn(tiny_base), cache)
    assert (
        cache.computed == 14
        and cache.path is not None
        and cache.path.name == f"base-tiny-model-x-{'ab' * 8}.pt"
    )
    data = torch.load(cache.path, weights_only=True)  # tensors, floats and strings only
    assert data["digest"] == "ab" * 32 and len(data["layers"]) == 14

    again = BaseStatsCache(tmp_path, "tiny model/x", "ab" * 32)
    assert len(again) == 14
    assert analyze(adapter, weight_fn(tiny_base), again) == first and again.computed == 0

    other = BaseStatsCache(tmp_path, "tiny model/x", "cd" * 32)  # another checkpoint: nothing reused
    assert len(other) == 0
    cache.path.write_bytes(b"not a torch file")
    assert len(BaseStatsCache(tmp_path, "tiny model/x", "ab" * 32)) == 0  # corrupt: rebuilt, not fatal


def test_base_cache_grows_when_more_vectors_are_needed(tiny_base) -> None:
    cache = BaseStatsCache(None, "tiny", "00", top_k=4)
    W = tiny_base.get_submodule("model.layers.0.mlp.up_proj").weight.detach()  # [128, 64]
    assert cache.get("up", W).top_left.shape == (128, 4)
    assert cache.get("up", W, min_vectors=8).top_left.shape == (128, 8) and cache.computed == 2
    assert cache.get("up", W, min_vectors=2).top_left.shape == (128, 8) and cache.computed == 2


# --------------------------------------------------------------------------- memo


def test_memo_computes_once_per_key_and_forgets_old_versions() -> None:
    memo = AnalysisMemo(max_entries=3)
    calls: list[str] = []

    def slow(key: str):
        def compute():
            calls.append(key)
            time.sleep(0.05)
            return {"key": key}

        return compute

    threads = [threading.Thread(target=memo.get_or_compute, args=("a@v1", slow("a@v1"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["a@v1"] and memo.hits == 3 and memo.misses == 1
    memo.get_or_compute("b@v1", slow("b@v1"))
    memo.retain({"a": "a@v2", "b": "b@v1"}.get)  # a replaced
    assert memo.cached_keys() == ["b@v1"]
    memo.retain({}.get)  # b deleted
    assert memo.cached_keys() == []
    for i in range(5):
        memo.get_or_compute(f"c{i}@v", slow("c"))
    assert memo.cached_keys() == ["c2@v", "c3@v", "c4@v"]  # LRU bound


# --------------------------------------------------------------------------- shrink -> PEFT


def test_shrunk_adapter_loads_in_peft_with_the_truncated_delta(tiny_base, tmp_path: Path) -> None:
    from peft import PeftModel

    adapter = make_lora(tiny_base, seed=3, use_rslora=True)
    result = shrink_adapter(adapter, "sv_fro", 0.8)
    kept = {row["module"]: row["kept_rank"] for row in result.layers}
    assert len(set(kept.values())) > 1  # per-module ranks: rank_pattern / alpha_pattern are exercised
    folder = tmp_path / "shrunk"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes(result.files.config)
    (folder / "adapter_model.safetensors").write_bytes(result.files.weights)
    config = json.loads(result.files.config)
    assert config["use_rslora"] is False and config["lora_alpha"] == config["r"]

    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_base), folder).eval()
    reparsed = parse_adapter_files(result.files, "shrunk", linear_shapes(tiny_base), max_rank=64)
    energy_kept = energy_total = 0.0
    for module, w in adapter.layers.items():
        delta = w.scale * w.B.double() @ w.A.double()  # [d, k]
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        k = kept[module]
        want = (U[:, :k] * S[:k]) @ Vh[:k]
        layer = peft_model.base_model.model.get_submodule(module)
        assert layer.scaling["default"] == 1.0 and layer.r["default"] == k
        got = layer.get_delta_weight("default").double()
        assert torch.allclose(got, want, atol=1e-5 * float(S[0]))
        assert reparsed.layers[module].scale == 1.0 and reparsed.layers[module].rank == k
        energy_kept += float((S[:k] ** 2).sum())
        energy_total += float((S[: w.rank] ** 2).sum())
    assert result.fro_retained == pytest.approx(math.sqrt(energy_kept / energy_total), rel=1e-9)


def test_shrunk_config_patterns_only_where_the_rank_differs() -> None:
    source = LoraConfigSpec(r=16, lora_alpha=32, target_modules=["q_proj"], use_rslora=True)
    config = shrunk_config(source, {"m.0.q_proj": 3, "m.1.q_proj": 3, "m.2.q_proj": 5})
    assert (config["r"], config["lora_alpha"]) == (3, 3)
    assert config["rank_pattern"] == config["alpha_pattern"] == {"m.2.q_proj": 5}
    assert config["target_modules"] == ["q_proj"] and config["peft_type"] == "LORA"


def test_shrink_refuses_bad_requests(tiny_base) -> None:
    adapter = make_lora(tiny_base, seed=4, targets=("q_proj",))
    for method, value, words in [
        ("nope", 1.0, "unknown"),
        ("sv_fro", 0.0, "(0, 1]"),
        ("rank", 8, "1 to 7"),
        ("sv_cumulative", 1.0, "nothing to shrink"),
    ]:
        with pytest.raises(ShrinkError) as info:
            shrink_adapter(adapter, method, value)
        assert words in info.value.message, (method, info.value.message)
    with pytest.raises(ShrinkError, match="spectral norms"):
        shrink_adapter(adapter, "spn_ckpt", 0.1)


# --------------------------------------------------------------------------- local analysis, report, plots


@pytest.fixture(scope="module")
def tiny_dir(tiny_base, tokenizer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_base.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_analyze_local_and_text_report(tiny_base, tiny_dir: Path, tmp_path: Path) -> None:
    from tests.synthetic import make_random_peft_adapter

    adapter_dir = tmp_path / "my-adapter"
    make_random_peft_adapter(
        tiny_base, adapter_dir, seed=5, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
    )
    result = analyze_local(adapter_dir, str(tiny_dir), cache_dir=tmp_path / "cache")
    assert result["adapter_id"] == "my-adapter" and result["rank"] == 4 and result["summary"]["layers"] == 4
    assert list((tmp_path / "cache" / "analysis").glob(f"base-{tiny_dir.name}-*.pt"))
    text = format_report(result)
    assert "mean effective rank" in text and "model.layers.1.self_attn.v_proj" in text
    assert len([line for line in text.splitlines() if line.startswith("model.layers.")]) == 4
    shapes = linear_shapes(tiny_base)
    digest = weights_digest((n, tiny_base.get_submodule(n).weight) for n in shapes)
    assert f"-{digest[:16]}.pt" in next((tmp_path / "cache" / "analysis").iterdir()).name


def test_png_and_html_render_also_when_empty(tiny_base) -> None:
    adapter = make_lora(tiny_base, seed=6)
    result = analyze(adapter, weight_fn(tiny_base), BaseStatsCache(None, "tiny", "00"))
    png = plots.analysis_png(result)
    assert png.startswith(b"\x89PNG")
    empty = {
        **result,
        "layers": [],
        "summary": {**result["summary"], "layers": 0, "mean_effective_rank": None},
    }
    assert plots.analysis_png(empty).startswith(b"\x89PNG")
    page = render_html({**result, "adapter_id": "<script>"}, plots.panel_pngs(result))
    assert "<script>" not in page and "&lt;script&gt;" in page and page.count("<tr>") >= 14


def test_layer_filter_and_model_order() -> None:
    with pytest.raises(ValueError, match="not a valid regular expression"):
        compile_layer_filter("(")
    assert compile_layer_filter("") is None and compile_layer_filter(None) is None
    names = ["m.layers.10.q", "m.layers.2.q", "m.layers.1.q"]
    assert sorted(names, key=natural_key) == ["m.layers.1.q", "m.layers.2.q", "m.layers.10.q"]
