"""Per-request ``adapter_scale``: a per-row factor on the adapter's update, without a slot of its own.

Scale 0 equals the base model and 1 the adapter, in one mixed batch, on every LoRA backend and both
runners; a row at another scale never gets the merged weights' answer (merged and auto modes).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapters.peft_format import LoraAdapter, load_adapter_dir
from server.engine.engine import Engine, EngineConfig
from server.engine.lora_linear import BASE_SLOT, LoraBatchContext, LoraLinear
from server.engine.native import NativeLlamaRunner
from server.engine.requests import Event, GenerationRequest
from server.engine.sampling import SamplingParams
from tests.conftest import make_peft_adapter
from tests.engine_helpers import outcome, verify_base_now
from tests.lora_backends import LORA_BACKENDS, lora_backend

PROMPTS = ["Hello there, how are", "The quick brown fox", "Once upon a time in a land far away"]
SCALES = [0.0, 1.0, 0.5, -1.0]


@pytest.fixture(scope="module")
def saved(tiny_base, tmp_path_factory):
    """The tiny model as a checkpoint (merging restores from it) and one adapter for it."""
    root = tmp_path_factory.mktemp("scale")
    tiny_base.save_pretrained(root / "model")
    make_peft_adapter(tiny_base, root / "qvo", seed=5, r=8, lora_alpha=16,
                      target_modules=["q_proj", "v_proj", "o_proj", "gate_proj"])  # fmt: skip
    return root / "model", root / "qvo"


def _engine(saved, tokenizer, mode: str, backend: str = "auto", runner: str = "hf", **config):
    model_dir, adapter_dir = saved
    engine_config = EngineConfig(mode=mode, lora_backend=backend, checkpoint_dir=model_dir, **config)
    if runner == "native":
        native = NativeLlamaRunner(model_dir, lora_backend=backend, kv_cache_tokens=2048)
        engine = Engine(native, tokenizer, engine_config)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        engine = Engine.for_hf_model(model, tokenizer, engine_config)
    return engine, load_adapter_dir(adapter_dir, "qvo", engine.base_shapes)


def _submit(engine: Engine, ids: list[int], adapter: LoraAdapter | None, scale: float, n: int) -> list[Event]:
    events: list[Event] = []
    request = GenerationRequest(
        prompt_ids=list(ids), params=SamplingParams(max_new_tokens=n), adapter=adapter, adapter_scale=scale,
        sink=events.append,
    )  # fmt: skip
    engine.submit(request)
    return events


def _run(
    engine: Engine, jobs: list[tuple[list[int], LoraAdapter | None, float]], n: int = 10
) -> list[list[int]]:
    pending = [_submit(engine, ids, adapter, scale, n) for ids, adapter, scale in jobs]
    engine.run_until_idle()
    return [outcome(events).tokens for events in pending]


def _dense(base: torch.nn.Module, adapter: LoraAdapter, scale: float) -> torch.nn.Module:
    """The reference: a copy of the base with W <- W + scale·s·B·A (float64, then cast)."""
    model = copy.deepcopy(base)
    for name, w in adapter.layers.items():
        linear = model.get_submodule(name)
        delta = scale * w.scale * (w.B.double() @ w.A.double())
        linear.weight.data = (linear.weight.double() + delta).to(linear.weight.dtype)
    return model


def _generate(model, ids: list[int], n: int = 10) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=2)  # fmt: skip
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("backend", LORA_BACKENDS)
def test_row_scales_equal_the_dense_reference(backend: str) -> None:
    ctx = LoraBatchContext()
    torch.manual_seed(0)
    layer = LoraLinear(torch.nn.Linear(24, 40), 24, 40, ctx, lora_backend(backend))
    g = torch.Generator().manual_seed(1)
    factors = {0: (torch.randn(4, 24, generator=g), torch.randn(40, 4, generator=g), 2.0),
               2: (torch.randn(8, 24, generator=g), torch.randn(40, 8, generator=g), 0.5)}  # fmt: skip
    for slot, (A, B, s) in factors.items():
        layer.set_slot(slot, A, B, s)
    rows = [(0, 1.0), (0, 0.0), (BASE_SLOT, 3.0), (2, -0.5), (0, 0.25), (2, 1.0)]
    x = torch.randn(len(rows), 3, 24)  # x: [B, T, k]
    ctx.set_rows([s for s, _ in rows], "cpu", [c for _, c in rows])
    y = layer(x)
    W, bias = layer.base.weight, layer.base.bias
    for i, (slot, c) in enumerate(rows):
        dense = W if slot == BASE_SLOT else W + c * factors[slot][2] * factors[slot][1] @ factors[slot][0]
        torch.testing.assert_close(y[i], x[i] @ dense.T + bias, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[1], layer.base(x)[1])  # scale 0: exactly the base
    ctx.set_rows([0, 2], "cpu", [1.0, 1.0])  # every row at 1: no scale tensor at all
    assert ctx.row_scale is None


@pytest.mark.parametrize(
    ("runner", "backend"),
    [("hf", backend) for backend in LORA_BACKENDS] + [("native", backend) for backend in LORA_BACKENDS],
)
def test_scale_zero_is_the_base_and_one_the_adapter_in_one_mixed_batch(
    saved, tiny_base, tokenizer, runner, backend
) -> None:
    engine, adapter = _engine(saved, tokenizer, "unmerged", backend=backend, runner=runner)
    jobs = [(tokenizer(p)["input_ids"], adapter, s) for p in PROMPTS for s in SCALES]
    jobs += [(tokenizer(p)["input_ids"], None, 1.0) for p in PROMPTS]
    mixed = _run(engine, jobs)
    assert engine.slots.loads == 1  # every scale read the adapter's one slot
    for (ids, a, scale), tokens in zip(jobs, mixed, strict=True):
        reference = tiny_base if a is None or scale == 0 else _dense(tiny_base, adapter, scale)
        assert tokens == _generate(reference, ids), (runner, backend, scale)
    by_scale = {
        s: [t for (_, a, c), t in zip(jobs, mixed, strict=True) if a is not None and c == s] for s in SCALES
    }
    assert by_scale[0.0] == [t for (_, a, _), t in zip(jobs, mixed, strict=True) if a is None]
    assert by_scale[1.0] == _run(engine, [(tokenizer(p)["input_ids"], adapter, 1.0) for p in PROMPTS])
    assert by_scale[0.5] != by_scale[1.0] != by_scale[0.0]


def test_merged_mode_never_serves_another_scale_from_the_merged_weights(saved, tokenizer) -> None:
    reference, ref_adapter = _engine(saved, tokenizer, "unmerged")
    engine, adapter = _engine(saved, tokenizer, "merged", switch_wait=0.0)
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    jobs = [(ids[i % 3], scale) for i, scale in enumerate([1.0, 0.0, 1.0, 0.5, 0.0, 1.0])]
    expected = _run(reference, [(i, ref_adapter, s) for i, s in jobs])
    got = _run(engine, [(i, adapter, s) for i, s in jobs])
    assert got == expected
    assert engine.stats.swaps >= 3  # the adapter at 1, at 0 and at 0.5 were each merged in turn
    assert verify_base_now(engine)["intact"]


def test_auto_mode_unmerges_when_a_row_wants_the_merged_adapter_at_another_scale(saved, tokenizer) -> None:
    engine, adapter = _engine(saved, tokenizer, "auto", auto_min_uniform_steps=3)
    ids = tokenizer(PROMPTS[0])["input_ids"]
    solo = _run(engine, [(ids, adapter, 1.0)], n=20)[0]
    assert engine.merged_adapter_id == "qvo"  # 20 steps of one adapter at scale 1: merged
    base = _run(engine, [(ids, None, 1.0)], n=8)[0]
    _run(engine, [(ids, adapter, 1.0)], n=20)
    assert engine.merged_adapter_id == "qvo"
    running = _submit(engine, ids, adapter, 1.0, 20)
    engine._drain_inbox(block=False)
    engine.step()
    zero = _submit(engine, ids, adapter, 0.0, 8)  # the merged adapter, at scale 0
    engine._drain_inbox(block=False)
    engine.step()
    assert engine.merged_adapter_id is None  # another key: unmerged before its first forward
    engine.run_until_idle()
    assert outcome(running).tokens == solo and outcome(zero).tokens == base
    assert verify_base_now(engine)["intact"]
