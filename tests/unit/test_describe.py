"""``Engine.describe()``: the snapshot /info, /metrics and cluster replicas read, and its safety
when another thread reads it while the engine steps."""

from __future__ import annotations

import dataclasses
import itertools
import threading

import pytest

from adapters.peft_format import load_adapter_dir
from server.engine.engine import Engine, EngineConfig
from server.engine.native.runner import NativeLlamaRunner
from tests.api_helpers import start_client
from tests.engine_helpers import outcome, submit


def _info_from(snap) -> dict:
    """The engine part of /info as the snapshot says it should read (docs/operations: /info)."""
    prefix = (
        {"enabled": False, "reason": snap.prefix_cache.reason}
        if not snap.prefix_cache.enabled
        else {
            "enabled": True,
            "block_size": snap.kv.block_size,
            "lookups": snap.prefix_cache.lookups,
            "lookup_tokens": snap.prefix_cache.lookup_tokens,
            "hit_tokens": snap.prefix_cache.hit_tokens,
            "hit_rate": round(snap.prefix_cache.hit_rate, 4),
            "cached_blocks": snap.prefix_cache.cached_blocks,
            "evictable_blocks": snap.prefix_cache.evictable_blocks,
            "evictions": snap.prefix_cache.evictions,
        }
    )
    spec = snap.speculation
    speculation = (
        {"enabled": False, "reason": spec.reason}
        if not spec.enabled
        else {
            "enabled": True,
            "method": "prompt_lookup",
            "speculate": spec.speculate,
            "max_batch": spec.max_batch,
            "verify_rows": spec.verify_rows,
            "drafted_tokens": spec.drafted_tokens,
            "accepted_tokens": spec.accepted_tokens,
            "acceptance_rate": round(spec.acceptance_rate, 4),
            "by_adapter": {
                name: {
                    "drafted_tokens": drafted,
                    "accepted_tokens": accepted,
                    "acceptance_rate": round(accepted / drafted, 4) if drafted else 0.0,
                }
                for name, (drafted, accepted) in sorted(spec.by_adapter.items())
            },
        }
    )
    return {
        "mode": snap.mode,
        "merged_adapter": snap.merged_adapter,
        "swaps": snap.stats.swaps,
        "generated_tokens": snap.stats.generated_tokens,
        "lora_backend": snap.runner.lora_backend,
        "runner": snap.runner.name,
        "decode": {
            "kind": snap.runner.decode_kind,
            "weights": snap.runner.weight_layout,
            "quantization": snap.runner.quantization,
            "lora_backend": snap.runner.decode_lora_backend,
            "graphs": snap.runner.graphs,
            "warm_up_seconds": round(snap.runner.warm_up_seconds, 2),
            **({"threads": dict(snap.runner.decode_threads)} if snap.runner.decode_threads else {}),
        },
        "kv_cache": {
            "used_tokens": snap.kv.used_tokens,
            "capacity_tokens": snap.kv.capacity_tokens,
            "free_tokens": snap.kv.free_tokens,
            "bytes_reserved": snap.kv.bytes_reserved,
            "preemptions": snap.stats.preemptions,
        },
        "prefix_cache": prefix,
        "speculation": speculation,
        "limits": dataclasses.asdict(snap.limits),
        "adapters_loaded": [key.partition("@")[0] for key in snap.slots.resident_keys],
        "adapter_slot_users": snap.slots.in_use,
        "running_requests": snap.queue.running,
        "waiting_requests": snap.queue.waiting,
    }


@pytest.mark.parametrize("runner", ["hf", "native"])
def test_snapshot_matches_info(
    tiny_base, tiny_base_dir, tokenizer, tmp_path, peft_adapter_factory, runner
) -> None:
    adapter_dir, _ = peft_adapter_factory(tiny_base, "qv", seed=5)
    client = start_client(tiny_base, tokenizer, tmp_path, model_path=tiny_base_dir, runner=runner,
                          adapter=[f"qv={adapter_dir}"])  # fmt: skip
    try:
        generated = 0
        for adapter in (None, "qv", "qv"):
            parameters = {"max_new_tokens": 3, **({"adapter_id": adapter} if adapter else {})}
            r = client.post("/generate", json={"inputs": "one two three four", "parameters": parameters})
            assert r.status_code == 200, r.text
            generated += 3
        info = client.get("/info").json()
        snap = client.app.state.engine.describe()  # the engine is idle: nothing moves between the two
    finally:
        client.__exit__(None, None, None)
    shown = {key: info[key] for key in _info_from(snap)}
    shown["limits"] = {key: value for key, value in info["limits"].items() if key != "max_rank"}
    assert shown == _info_from(snap)
    # and the snapshot says what happened
    assert snap.stats.generated_tokens == generated and snap.stats.steps > 0 and snap.stats.peak_batch == 1
    assert snap.slots.resident_keys[0].startswith("qv@") and snap.slots.loads == 1 and snap.slots.in_use == 0
    assert snap.queue.running == snap.queue.waiting == 0 and snap.kv.used_tokens == 0
    assert snap.runner.name == runner and snap.runner.vocab_size == len(tokenizer)
    # speculation is on by default (--speculate 4) where the runner verifies drafts
    if runner == "native":
        assert snap.speculation.enabled and snap.speculation.speculate == 4
        assert snap.speculation.max_batch == 4
    else:
        assert not snap.speculation.enabled
        assert snap.speculation.reason == "the hf runner does not verify drafts (the native runner does)"
    assert sum(snap.stats.batch_sizes.values()) > 0
    if runner == "native":
        assert snap.prefix_cache.enabled and snap.prefix_cache.lookups == 3 and snap.kv.block_size == 16
        assert snap.kv.capacity_tokens is not None and snap.kv.free_tokens == snap.kv.capacity_tokens
    else:
        assert not snap.prefix_cache.enabled and "hf runner has no prefix cache" in snap.prefix_cache.reason
        assert snap.kv.capacity_tokens is None and snap.kv.block_size is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.stats.steps = 0  # type: ignore[misc]
    with pytest.raises(TypeError):
        snap.stats.batch_sizes[1] = 0  # type: ignore[index]  # a read-only copy


def test_describe_from_another_thread_while_the_engine_steps(
    tiny_base, tiny_base_dir, tokenizer, peft_adapter_factory
) -> None:
    """Snapshots taken while the engine thread admits, decodes and frees rows (and loads adapters
    into slots) never fail, and their counters never go backwards."""
    runner = NativeLlamaRunner(tiny_base_dir, kv_cache_tokens=2048)
    engine = Engine(runner, tokenizer, EngineConfig(max_batch=8, max_loaded_adapters=2, mode="unmerged"))
    adapters = []
    for seed in range(3):  # three adapters in two slots: loads and evictions while rows come and go
        adapter_dir, _ = peft_adapter_factory(tiny_base, f"a{seed}", seed=seed + 1)
        adapters.append(load_adapter_dir(adapter_dir, f"a{seed}", runner.base_shapes))
    jobs = [
        submit(engine, [1, 5 + i, 9, 13], adapters[i % 3], max_new_tokens=4 + i % 5)[1] for i in range(24)
    ]
    stepping = threading.Thread(target=engine.run_until_idle)
    snaps = []
    stepping.start()
    while stepping.is_alive():
        snaps.append(engine.describe())
    stepping.join()
    snaps.append(engine.describe())
    assert len(snaps) > 10  # read many times while it stepped
    for before, after in itertools.pairwise(snaps):
        assert after.stats.steps >= before.stats.steps
        assert after.stats.generated_tokens >= before.stats.generated_tokens
        assert (
            after.slots.loads >= before.slots.loads
            and after.prefix_cache.lookups >= before.prefix_cache.lookups
        )
    assert all(s.queue.running <= 8 and len(s.slots.resident_keys) <= 2 for s in snaps)
    last = snaps[-1]
    assert last.stats.generated_tokens == sum(len(outcome(events).tokens) for events in jobs)
    assert last.slots.evictions > 0 and last.queue.running == 0 and last.kv.used_tokens == 0
