"""Adapter loads off the engine thread (issue 29, item 2): a slow load stalls no other row, a
loading adapter is served once loaded, a failed load fails only its request, and no adapter in
use is evicted; the bank's staged install equals the plain one."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from adapters.peft_format import load_adapter_dir
from server.engine.engine import Engine, EngineConfig
from server.engine.lora.slots import LoraSlotBank
from server.engine.requests import TokenEvent
from server.engine.slot_loader import StagedAdapter, bank_of
from tests.engine_helpers import outcome, run_one, submit

PROMPT = "Once upon a time in a land far away"


def _engine(model, tokenizer, **config) -> Engine:
    config.setdefault("mode", "unmerged")
    return Engine.for_hf_model(model, tokenizer, EngineConfig(**config))


@pytest.fixture
def engine_and_adapters(tiny_base, tokenizer, peft_adapter_factory):
    engine = _engine(copy.deepcopy(tiny_base), tokenizer, max_loaded_adapters=2)
    adapters = [
        load_adapter_dir(
            peft_adapter_factory(tiny_base, f"a{i}", seed=i, r=4 * (i + 1))[0], f"a{i}", engine.base_shapes
        )
        for i in range(3)
    ]
    return engine, adapters


class GatedStage:
    """Wraps the loader thread's staging: every load blocks until the test opens the gate."""

    def __init__(self, stage) -> None:
        self.stage = stage
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.fail: Exception | None = None

    def __call__(self, adapter, slots) -> StagedAdapter:
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        if self.fail is not None:
            raise self.fail
        return self.stage(adapter, slots)


def _step(engine: Engine) -> None:
    engine._drain_inbox(block=False)
    engine.step_safely()


def _ids(tokenizer) -> list[int]:
    return tokenizer(PROMPT)["input_ids"]


def test_a_slow_load_stalls_no_running_row_and_the_adapter_is_served_once_loaded(
    engine_and_adapters, tokenizer
) -> None:
    engine, (a0, a1, _) = engine_and_adapters
    ids = _ids(tokenizer)
    solo_running = run_one(engine, ids, a0, max_new_tokens=40, ignore_eos=True).tokens
    solo_newcomer = run_one(engine, ids, a1, max_new_tokens=6, ignore_eos=True).tokens
    engine.slots.evict(a1.key)  # a1 must be loaded again
    gated = GatedStage(engine.slots.loader._stage)
    engine.slots.loader._stage = gated

    running = submit(engine, ids, a0, max_new_tokens=40, ignore_eos=True)[1]
    _step(engine)  # a0 is resident: admitted and prefilled at once
    newcomer = submit(engine, ids, a1, max_new_tokens=6, ignore_eos=True)[1]
    _step(engine)
    assert gated.entered.wait(10), "the newcomer's load never started"
    steps_before, tokens_before = engine.steps, len(outcome(running).tokens)
    for _ in range(10):  # the load is blocked: the running row decodes a token every step
        _step(engine)
    assert engine.steps - steps_before == 10
    assert len(outcome(running).tokens) - tokens_before == 10
    assert outcome(newcomer).tokens == [] and engine.num_waiting == 1
    assert a1.key not in engine.slots

    gated.gate.set()
    engine.run_until_idle()
    assert outcome(newcomer).tokens == solo_newcomer  # served once loaded, as when loaded at once
    assert outcome(running).tokens == solo_running
    assert engine.slots.loader.started >= 1 and engine.slots.inline_grows == 0


def test_a_failed_load_fails_its_request_alone_and_the_engine_goes_on(engine_and_adapters, tokenizer) -> None:
    engine, (a0, _, a2) = engine_and_adapters
    ids = _ids(tokenizer)
    solo = run_one(engine, ids, a0, max_new_tokens=12, ignore_eos=True).tokens
    gated = GatedStage(engine.slots.loader._stage)
    gated.fail = MemoryError("no host memory left (simulated)")
    engine.slots.loader._stage = gated

    running = submit(engine, ids, a0, max_new_tokens=12, ignore_eos=True)[1]
    _step(engine)
    bad = submit(engine, ids, a2, max_new_tokens=4)[1]
    twin = submit(engine, ids, a2, max_new_tokens=4)[1]  # a second request for the same adapter
    _step(engine)
    gated.gate.set()
    engine.run_until_idle()
    for events in (bad, twin):
        error = outcome(events).error
        assert error is not None and "could not be admitted" in error.message and "simulated" in error.message
    assert outcome(running).error is None and outcome(running).tokens == solo
    assert a2.key not in engine.slots and all(r.in_use == 0 for r in engine.slots._resident.values())
    assert engine.slots.loader.failed == 1 and engine.slots.loader.pending == 0  # one load, both failed

    engine.slots.loader._stage = gated.stage  # the source works again: the same adapter now loads
    assert len(run_one(engine, ids, a2, max_new_tokens=4, ignore_eos=True).tokens) == 4
    assert a2.key in engine.slots


def test_no_adapter_in_use_is_evicted_while_another_waits_for_a_slot(engine_and_adapters, tokenizer) -> None:
    engine, adapters = engine_and_adapters  # two slots, three adapters
    ids = _ids(tokenizer)
    lengths = (20, 30, 5)
    solo = [
        run_one(engine, ids, a, max_new_tokens=n, ignore_eos=True).tokens
        for a, n in zip(adapters, lengths, strict=True)
    ]
    engine.slots.evict(adapters[2].key)
    run_one(engine, ids, adapters[0], max_new_tokens=1)  # a0 and a1 resident, a2 not
    pending = [
        submit(engine, ids, a, max_new_tokens=n, ignore_eos=True)[1]
        for a, n in zip(adapters, lengths, strict=True)
    ]
    third_started_at = None
    for step in range(200):
        _step(engine)
        a0_running = len(outcome(pending[0]).tokens) < 20
        a1_running = len(outcome(pending[1]).tokens) < 30
        if a0_running and a1_running:  # both slots in use: the third waits, neither is evicted
            assert adapters[0].key in engine.slots and adapters[1].key in engine.slots
            assert outcome(pending[2]).tokens == []
        if third_started_at is None and outcome(pending[2]).tokens:
            third_started_at = step
            assert not a0_running  # it took the slot of a0, whose row had finished
        if not engine.busy:
            break
    assert third_started_at is not None
    assert [outcome(p).tokens for p in pending] == solo
    assert engine.slots.evictions >= 1


def _bank() -> LoraSlotBank:
    return LoraSlotBank(in_features=6, out_features=5, dtype=torch.float32, device=torch.device("cpu"))


def _factors(rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, 6, generator=g), torch.randn(5, rank, generator=g)


def test_staged_install_with_grown_stacks_equals_set_slot() -> None:
    plain, staged = _bank(), _bank()
    for slot, (rank, scale) in enumerate([(2, 0.5), (8, 2.0), (4, 1.5)]):  # ranks grow, then shrink
        A, B = _factors(rank, slot)
        plain.set_slot(slot, A, B, scale)
        grown = staged.grown(slot + 1, rank, limit=3)  # on "the loader thread"
        A_p, B_p = staged.stage(A, B)
        if grown is not None:  # padded to the grown rank, as slot_loader._stage_at does
            pad = grown.A_stack.shape[1] - A_p.shape[0]
            A_p = torch.cat([A_p, A_p.new_zeros(pad, 6)])
            B_p = torch.cat([B_p, B_p.new_zeros(5, pad)], dim=1)
        assert staged.install(slot, A_p, B_p, scale, grown, limit=3)  # no growth on the engine thread
    assert staged.num_slots <= 3 and staged.r_max == 8
    for slot in range(3):
        assert torch.allclose(staged.delta_weight(slot), plain.delta_weight(slot))


def test_stale_grown_stacks_are_not_swapped_in() -> None:
    bank = _bank()
    bank.set_slot(0, *_factors(2, 0), 1.0)
    grown = bank.grown(2, 4, limit=4)  # snapshot of slot 0 before it is replaced
    A, B = _factors(3, 1)
    bank.set_slot(0, A, B, 3.0)  # the engine changed a slot meanwhile: the snapshot is stale
    A2, B2 = _factors(4, 2)
    A_p, B_p = bank.stage(A2, B2)
    assert not bank.install(1, A_p, B_p, 0.5, grown, limit=4)  # grew here instead
    assert torch.allclose(bank.delta_weight(0), 3.0 * B @ A)
    assert torch.allclose(bank.delta_weight(1), 0.5 * B2 @ A2)


def _fake(key: str):
    """An adapter with no layers: enough for the slot policy (nothing to copy)."""
    from types import SimpleNamespace

    return SimpleNamespace(key=key, adapter_id=key, layers={}, vocab={})


def test_a_burst_of_cold_adapters_does_not_evict_a_hot_one() -> None:
    from server.engine.lora_model import AdapterSlots

    slots = AdapterSlots({}, capacity=2)
    for _ in range(5):
        slots.acquire(_fake("hot"))
        slots.release("hot")
    for cold in ("c1", "c2", "c3"):  # plain LRU would evict "hot" at c2 (it was used before c1)
        slots.acquire(_fake(cold))
        slots.release(cold)
        assert "hot" in slots
    assert slots.evictions == 2 and slots.eviction_order()[0] == "c3"  # the cold ones went first
    in_use = slots.acquire(_fake("c3"))  # held by a running row: never evicted, whatever its count
    slots.acquire(_fake("c4"))
    assert in_use == slots._resident["c3"].slot and "hot" not in slots


def test_slots_laid_out_by_the_loader_serve_what_first_use_layouts_serve(
    tiny_base, tiny_base_dir, tokenizer, peft_adapter_factory, monkeypatch
) -> None:
    """The native runner's fused q/k/v projections with the compiled kernel: the loader thread
    packs each slot (``CompiledCpuBackend.prebuild``) and the install adopts it, so the first step
    packs nothing; every token and log-probability equals those of an engine whose slots are
    packed at first use (the way before), for adapters of every fused-part combination."""
    from server.engine import cpu_build, sgmv_cpu
    from server.engine.base_model import build_engine_for_dir
    from server.engine.lora.compiled_cpu import CompiledCpuBackend

    if not cpu_build.cpu_supports_avx2_fma():
        pytest.fail("this test needs a C compiler and an AVX2/FMA CPU, as CI has")
    sgmv_cpu.configure("auto")
    targets = [["q_proj", "k_proj", "v_proj", "o_proj"], ["q_proj", "v_proj"], ["k_proj", "down_proj"]]
    paths = [
        peft_adapter_factory(tiny_base, f"l{i}", seed=i, r=r, target_modules=t)[0]
        for i, (r, t) in enumerate(zip((16, 12, 8), targets, strict=True))
    ]

    def serve() -> tuple[list[tuple[list[int], list[float]]], list[int]]:
        config = EngineConfig(mode="unmerged", max_loaded_adapters=2)  # the third load evicts
        engine = build_engine_for_dir(tiny_base_dir, "native", torch.float32, torch.device("cpu"), config)
        assert engine.runner.lora_backend.name == "compiled-cpu"
        adapters = [load_adapter_dir(p, f"l{i}", engine.base_shapes) for i, p in enumerate(paths)]
        results = []
        for adapter in [*adapters, adapters[0]]:
            _, events = submit(engine, _ids(tokenizer), adapter, max_new_tokens=6, ignore_eos=True)
            engine.run_until_idle()
            tokens = [e for e in events if isinstance(e, TokenEvent)]
            results.append(([e.id for e in tokens], [e.logprob for e in tokens]))
        projections = {id(b.reader): b.reader for b in map(bank_of, engine.runner.lora_targets.values()) if b}
        return results, [p.state.layouts.rebuilt for p in projections.values()]

    prebuilt, rebuilt = serve()
    assert sum(rebuilt) == 0  # every slot's layout came from the loader thread
    monkeypatch.setattr(CompiledCpuBackend, "prebuild", lambda self, projection, parts: None)
    first_use, rebuilt_at_first_use = serve()
    assert sum(rebuilt_at_first_use) > 0
    assert prebuilt == first_use


def test_a_queued_requests_adapter_loads_while_the_batch_is_full(
    engine_and_adapters, tiny_base, tokenizer
) -> None:
    """With every row taken, a waiting request's adapter is staged meanwhile (its load overlaps the
    queueing), and the request is served as when loaded at once."""
    _, (a0, a1, _) = engine_and_adapters
    engine = _engine(copy.deepcopy(tiny_base), tokenizer, max_loaded_adapters=2, max_batch=1)
    ids = _ids(tokenizer)
    solo = run_one(engine, ids, a1, max_new_tokens=4, ignore_eos=True).tokens
    engine.slots.evict(a1.key)
    gated = GatedStage(engine.slots.loader._stage)
    engine.slots.loader._stage = gated
    gated.gate.set()  # loads run at once; `entered` says when one began

    running = submit(engine, ids, a0, max_new_tokens=12, ignore_eos=True)[1]
    _step(engine)
    queued = submit(engine, ids, a1, max_new_tokens=4, ignore_eos=True)[1]
    _step(engine)
    assert gated.entered.wait(10), "the queued request's adapter did not start loading"
    assert engine.num_waiting == 1 and outcome(running).finish is None  # still queued behind a0's row
    engine.run_until_idle()
    assert outcome(queued).tokens == solo and len(outcome(running).tokens) == 12


def test_a_prefetched_adapter_is_staged_before_its_request_and_kept_for_it(
    engine_and_adapters, tiny_base, tokenizer
) -> None:
    """``Engine.prefetch`` (the API calls it once the adapter is read, before tokenizing): the load
    begins at once on the loader thread and survives steps that no waiting request wants it in, so
    the request, submitted later, installs what was staged and stages nothing itself."""
    engine, (a0, _, _) = engine_and_adapters
    ids = _ids(tokenizer)
    solo = run_one(_engine(copy.deepcopy(tiny_base), tokenizer), ids, a0, max_new_tokens=4, ignore_eos=True)
    engine.prefetch(a0)
    _step(engine)
    assert a0.key in engine.slots.loader and engine.slots.loader.started == 1
    engine.slots.wait_for_loads(10)
    for _ in range(3):  # steps with nothing waiting: the staged load is kept for the request on its way
        _step(engine)
    assert engine.slots.prepare(a0) is None and a0.key not in engine.slots  # staged, not installed
    served = run_one(engine, ids, a0, max_new_tokens=4, ignore_eos=True)
    assert served.tokens == solo.tokens and engine.slots.loader.started == 1 and engine.slots.loads == 1
    assert not engine.slots._expected


def test_a_prefetch_nobody_claims_is_dropped_after_a_while(engine_and_adapters) -> None:
    engine, (a0, _, _) = engine_and_adapters
    engine.slots.expect(a0, seconds=0.0)
    engine.slots.wait_for_loads(10)
    engine.slots.prepare(a0)  # takes the finished load from the loader
    engine.slots.retain(set())
    assert a0.key not in engine.slots._staged and not engine.slots._expected
