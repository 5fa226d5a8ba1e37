"""100 adapters, 8 memory slots, traffic spread over all of them: LRU churn serves every request
with its own adapter (the outputs equal those served alone) and memory stays bounded."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from transformers import LlamaForCausalLM

from tests.adapter_files import files_parts, make_adapter
from tests.conftest import tiny_llama_config
from tests.live_server import start_live_server

ADAPTERS = 100
SLOTS = 8
HOST_CACHE_MB = 1  # about a third of the 100 parsed adapters: the host tier churns too


@pytest.fixture
def live(tokenizer, tmp_path: Path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer))).eval()
    server = start_live_server(
        model, tokenizer, tmp_path, mode="unmerged", max_loaded_adapters=SLOTS, host_cache_mb=HOST_CACHE_MB
    )
    yield server
    server.stop()


async def _generate_all(url: str, adapter_ids: list[str], concurrency: int) -> dict[str, set[str]]:
    """Generate once per entry of ``adapter_ids`` with ``concurrency`` requests in flight."""
    answers: dict[str, set[str]] = {}
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120) as client:

        async def one(adapter_id: str) -> None:
            body = {"inputs": "Hello there", "parameters": {"adapter_id": adapter_id, "max_new_tokens": 6}}
            async with gate:
                r = await client.post(url + "/generate", json=body)
            assert r.status_code == 200, r.text
            answers.setdefault(adapter_id, set()).add(r.json()["generated_text"])

        await asyncio.gather(*(one(a) for a in adapter_ids))
    return answers


def test_100_adapters_over_8_slots_serve_correct_outputs_in_bounded_memory(live, tiny_base) -> None:
    ids = [f"churn{i:03d}" for i in range(ADAPTERS)]
    for i, adapter_id in enumerate(ids):
        r = httpx.post(live.url + "/adapters", files=files_parts(*make_adapter(tiny_base, seed=i)),
                       data={"adapter_id": adapter_id}, timeout=30)  # fmt: skip
        assert r.status_code == 201, r.text
    engine, store = live.app.state.engine, live.app.state.store

    alone = asyncio.run(_generate_all(live.url, ids, concurrency=1))  # one at a time: the reference
    assert len({next(iter(a)) for a in alone.values()}) > ADAPTERS // 2  # the adapters do differ

    rng = random.Random(0)
    process = psutil.Process()
    rss: list[int] = []
    for _ in range(3):  # rounds of shuffled traffic, 16 in flight over 100 adapters and 8 slots
        traffic = list(ids)
        rng.shuffle(traffic)
        mixed = asyncio.run(_generate_all(live.url, traffic, concurrency=16))
        assert mixed == alone, [a for a in ids if mixed[a] != alone[a]][:5]
        assert len(engine.slots.resident_keys) <= SLOTS
        assert store.cache.nbytes <= HOST_CACHE_MB << 20
        rss.append(process.memory_info().rss)

    assert engine.slots.evictions > ADAPTERS  # the slots really churned
    assert store.disk_loads > ADAPTERS  # and so did the host tier
    assert engine.slots.in_use == 0 and engine.num_running == 0
    assert rss[-1] < rss[0] * 1.05, [r >> 20 for r in rss]  # no growth after the first round
