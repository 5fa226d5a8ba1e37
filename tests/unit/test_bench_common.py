"""The benchmarks' shared helpers against the runners they feed (bench/common.py)."""

from __future__ import annotations

from adapters.peft_format import load_adapter_dir
from bench.common import write_random_adapter
from server.engine.native import NativeLlamaRunner


def test_a_random_all_linear_adapter_loads_on_a_runner_whose_shapes_name_its_head(
    tiny_base_dir, tmp_path
) -> None:
    """A runner's ``base_shapes`` name its embedding and LM head too; the random adapter the
    benchmarks write adapts every linear layer and neither of those (PEFT's ``all-linear``)."""
    runner = NativeLlamaRunner(tiny_base_dir, kv_cache_tokens=256)
    kinds = {shape.kind for shape in runner.base_shapes.values()}
    assert {"head", "embedding"} <= kinds
    out = write_random_adapter(runner.base_shapes, tmp_path / "rnd", seed=0, r=4, lora_alpha=8)
    adapter = load_adapter_dir(out, "rnd", runner.base_shapes)
    linear = {name for name, shape in runner.base_shapes.items() if shape.kind == "linear"}
    assert set(adapter.layers) == linear and not adapter.vocab
