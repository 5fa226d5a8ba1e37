"""Graph-captured decode (``server/engine/native/graphed.py``) against the eager native runner and PEFT.

``--compile on`` is run for real (``torch.compile`` on the CPU, on a 2-layer model so it compiles
in seconds). The CUDA-graph path is run with its CPU stand-in (``ReplayedEagerly``): the same
padding to buckets, static input tensors, gathered adapters bound at capture time and re-capture
rules; only the capture itself is CUDA's.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from adapters.peft_format import load_adapter_dir
from server.engine.engine import Engine, EngineConfig
from server.engine.lora_linear import BASE_SLOT
from server.engine.lora_model import AdapterSlots
from server.engine.merge import MergeManager
from server.engine.native.graphed import GraphedDecode, StepRows, decode_kind, power_of_two_bucket
from server.engine.runner import DecodeInput, PrefillInput
from tests.engine_helpers import run_many, run_one
from tests.unit.test_native_runner import ADAPTERS, PROMPTS, _runner, _saved


def test_decode_kind_and_buckets() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [decode_kind(m, cpu) for m in ("auto", "on", "off")] == ["eager", "compile", "eager"]
    assert [decode_kind(m, cuda) for m in ("auto", "on", "off")] == ["cuda_graphs", "cuda_graphs", "eager"]
    assert [power_of_two_bucket(n, 32) for n in (1, 2, 3, 5, 16, 17, 32)] == [2, 2, 4, 8, 16, 32, 32]
    assert [power_of_two_bucket(n, 24) for n in (17, 24)] == [24, 24]  # the limit is the last bucket


def test_padding_rows_touch_only_the_scratch_block() -> None:
    real = StepRows([5], [20], [3], [4], [[7, 3]], [21], [0], [0.5])
    rows = StepRows.padded(real, size=4, width=4, scratch_block=99)
    assert rows.tables == [[7, 3, 99, 99]] + [[99] * 4] * 3
    assert rows.write_blocks == [3, 99, 99, 99] and rows.lengths == [21, 1, 1, 1]
    assert rows.slots == [0, BASE_SLOT, BASE_SLOT, BASE_SLOT] and rows.scales == [0.5, 1.0, 1.0, 1.0]


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    return _saved(tmp_path_factory, "llama")


def _adapters(model, runner, factory):
    adapters, pefts = {}, {}
    for seed, (name, kwargs) in enumerate(ADAPTERS.items()):
        adapter_dir, pefts[name] = factory(model, f"graphed-{name}", seed=seed, **kwargs)
        adapters[name] = load_adapter_dir(adapter_dir, name, runner.base_shapes)
    return adapters, pefts


def _cuda_graph_stand_in(runner) -> GraphedDecode:
    kv = runner.kv
    graphs = GraphedDecode(runner.model, kv, "cuda_graphs", max_batch=8, max_blocks=kv.blocks_for(512))
    runner.graphs = graphs
    return graphs


@pytest.mark.parametrize("kind", ["compile", "cuda_graphs"])
def test_graphed_decode_equals_eager_and_peft_over_many_steps(
    small_llama, kind, peft_adapter_factory
) -> None:
    """Rows for the base and every adapter (some skip parts of the fused projections), decoded for
    20 steps so that contexts cross a block boundary; one row leaves halfway."""
    model, path = small_llama
    eager = _runner(path, compile="off")
    graphed = _runner(path, compile="on") if kind == "compile" else _runner(path, compile="off")
    if kind == "cuda_graphs":
        _cuda_graph_stand_in(graphed)
    assert graphed.graphs is not None and graphed.graphs.kind == kind
    adapters, pefts = _adapters(model, eager, peft_adapter_factory)
    rows = [None, *ADAPTERS, None, "qv"]
    runs = []
    for runner in (eager, graphed):
        slots = AdapterSlots(runner.lora_targets, 8, runner.slots_changed)
        row_slots = [BASE_SLOT if a is None else slots.acquire(adapters[a]) for a in rows]
        runner.prefill([PrefillInput(i, PROMPTS[i % 3], 0, s) for i, s in enumerate(row_slots)])
        live = list(range(len(rows)))
        steps = []
        for step in range(20):
            if step == 10:
                runner.release([live.pop(1)])
            logits = runner.decode([DecodeInput(i, 5 + step, row_slots[i]) for i in live])
            steps.append({i: logits[j].clone() for j, i in enumerate(live)})
        runs.append(steps)
    for eager_step, graphed_step in zip(*runs, strict=True):
        assert eager_step.keys() == graphed_step.keys()
        for i in eager_step:
            torch.testing.assert_close(graphed_step[i], eager_step[i], rtol=1e-4, atol=1e-4)
    for i, name in enumerate(rows):  # the last step of the rows that stayed, against PEFT / HF
        if i == 1:
            continue
        ids = torch.tensor([[*PROMPTS[i % 3], *range(5, 25)]])
        with torch.no_grad():
            ref = (model if name is None else pefts[name])(input_ids=ids).logits[0, -1]
        torch.testing.assert_close(runs[1][-1][i], ref, rtol=1e-4, atol=1e-4)


def test_cuda_graph_stand_in_recaptures_when_slot_stacks_grow(small_llama, peft_adapter_factory) -> None:
    """A graph reads the slot stacks it was captured with. A second adapter makes the banks grow
    their stacks (new storage) while the step's key (bucket, adapted parts) stays the same: the step
    must be captured again, or the new adapter's row would replay the old stacks and read as base."""
    model, path = small_llama
    runner = _runner(path, compile="off")
    graphs = _cuda_graph_stand_in(runner)
    adapters, pefts = {}, {}
    for seed, name in enumerate(("qv", "qv2")):
        adapter_dir, pefts[name] = peft_adapter_factory(model, f"grow-{name}", seed=seed, **ADAPTERS["qv"])
        adapters[name] = load_adapter_dir(adapter_dir, name, runner.base_shapes)
    slots = AdapterSlots(runner.lora_targets, 8, runner.slots_changed)
    first = slots.acquire(adapters["qv"])
    runner.prefill([PrefillInput(0, PROMPTS[0], 0, first)])
    runner.decode([DecodeInput(0, 5, first)])  # batch bucket 2, parts q and v adapted
    captured = graphs.captures
    second = slots.acquire(adapters["qv2"])  # slot 1: the q and v stacks grow from 1 to 2 slots
    runner.prefill([PrefillInput(1, PROMPTS[1], 0, second)])
    logits = runner.decode([DecodeInput(0, 6, first), DecodeInput(1, 5, second)])  # the same key
    assert graphs.captures == captured + 1
    for row, (name, prompt, tail) in enumerate((("qv", PROMPTS[0], [5, 6]), ("qv2", PROMPTS[1], [5]))):
        with torch.no_grad():
            ref = pefts[name](input_ids=torch.tensor([[*prompt, *tail]])).logits[0, -1]
        torch.testing.assert_close(logits[row], ref, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def saved_tiny_base(tiny_base, tmp_path_factory):
    """conftest's tiny Llama (the embedded tokenizer's vocabulary), saved for the native runner."""
    path = tmp_path_factory.mktemp("graphed-engine")
    tiny_base.save_pretrained(path)
    return tiny_base, path


def test_compiled_engine_mixed_merged_and_solo_outputs_agree(
    saved_tiny_base, tokenizer, peft_adapter_factory
) -> None:
    """Through the engine with ``--compile on``: mixed = solo = the eager engine's greedy tokens, and
    merged weights (written in place, read by the compiled graph) = the adapter unmerged."""
    model, path = saved_tiny_base
    eager = Engine(
        _runner(path, compile="off", kv_cache_tokens=2048), tokenizer, EngineConfig(mode="unmerged")
    )
    compiled_runner = _runner(path, compile="on", kv_cache_tokens=2048)
    compiled = Engine(compiled_runner, tokenizer, EngineConfig(mode="unmerged"))
    adapters, _ = _adapters(model, compiled_runner, peft_adapter_factory)
    texts = ["Hello there, how are", "The quick brown fox", "A", "Once upon a time in a land"]
    names = [None, *ADAPTERS] * 2
    jobs = [
        (tokenizer(t)["input_ids"], adapters.get(n) if n else None)
        for t, n in zip(texts * 3, names, strict=False)
    ]
    want = [o.tokens for o in run_many(eager, jobs, max_new_tokens=12)]
    graphs = counters["stats"]["unique_graphs"]
    assert [o.tokens for o in run_many(compiled, jobs, max_new_tokens=12)] == want
    for (ids, adapter), tokens in zip(jobs[:5], want[:5], strict=True):
        assert run_one(compiled, ids, adapter, max_new_tokens=12).tokens == tokens
    # every batch (1 to 10 rows, adapters of ranks 2-8 on some parts or all) ran on the two graphs
    # compiled at start-up: nothing recompiled
    assert counters["stats"]["unique_graphs"] == graphs
    ids = jobs[1][0]
    merger = MergeManager(compiled_runner.weight_targets, path, can_merge=True)
    merger.merge(adapters["all"])  # the fused weights now hold "all": a base row runs it
    assert (
        run_one(compiled, ids, None, max_new_tokens=12).tokens
        == run_one(eager, ids, adapters["all"], max_new_tokens=12).tokens
    )
    merger.merge(None)
    base = run_one(eager, ids, None, max_new_tokens=12).tokens
    assert run_one(compiled, ids, None, max_new_tokens=12).tokens == base != want[1]  # restored
