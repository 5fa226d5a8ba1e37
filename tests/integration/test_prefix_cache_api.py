"""Prefix caching over HTTP on the embedded SmolLM2 (native runner): a chat's next turn reuses its
history's KV blocks, ``usage.prompt_tokens_details.cached_tokens`` (chat, completions, streamed) and
TGI's ``details.cached_tokens`` say how much, /info and /metrics count it, and no other adapter,
no replaced or re-uploaded version and no other composition ever reads those blocks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.adapter_files import files_parts, make_adapter
from tests.api_helpers import start_client

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples/adapters"
N = 8
SYSTEM = "You are a careful assistant for a shipping company. " + " ".join(
    f"Rule {i}: parcels of class {i} weigh at most {i * 3} kilograms and ship on day {i % 7}."
    for i in range(40)
)


@pytest.fixture(scope="module")
def client(embedded_model, tokenizer, embedded_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix")
    specs = [f"caps={EXAMPLES / 'caps'}", f"pirate={EXAMPLES / 'pirate'}"]
    client = start_client(
        embedded_model, tokenizer, root, adapter=specs, model_path=embedded_dir, runner="native"
    )
    assert client.get("/info").json()["prefix_cache"]["enabled"] is True
    yield client
    client.__exit__(None, None, None)


def _messages(question: str, history: list[dict] | None = None) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, *(history or []), {"role": "user", "content": question}]


def _chat(client, model: str, messages: list[dict], **extra) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": N, "temperature": 0, **extra}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _cached(reply: dict) -> int:
    return reply["usage"]["prompt_tokens_details"]["cached_tokens"]


def _base_name(client) -> str:
    return client.get("/info").json()["model"]


def test_a_chats_next_turn_reuses_its_history_and_answers_as_cold(client) -> None:
    base = _base_name(client)
    for model in (base, "caps", "pirate"):
        question = f"Which day does class 7 ship? ({model})"
        cold = _chat(client, model, _messages(question))
        # the system prompt was never seen under this identity (caps and pirate run it after the base)
        assert _cached(cold) == 0
        warm = _chat(client, model, _messages(question))
        prompt = warm["usage"]["prompt_tokens"]
        assert prompt > 500 and _cached(warm) >= prompt // 2
        assert warm["choices"][0]["message"] == cold["choices"][0]["message"]
        history = [{"role": "user", "content": question}, cold["choices"][0]["message"]]
        turn2 = _chat(client, model, _messages("And class 9?", history))
        # the whole first turn but its last block or two (where the reply's re-tokenized text starts)
        assert _cached(turn2) >= (prompt // 16 - 1) * 16


def test_streamed_usage_completions_and_tgi_details_report_cached_tokens(client) -> None:
    prompt = SYSTEM + " Question: which class weighs the most?"
    body = {"model": _base_name(client), "prompt": prompt, "max_tokens": N, "temperature": 0}
    first = client.post("/v1/completions", json=body).json()
    second = client.post("/v1/completions", json=body).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"] // 2
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=stream) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert (
        chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"] // 2
    )
    tgi = {"inputs": prompt, "parameters": {"max_new_tokens": N, "details": True}}
    details = client.post("/generate", json=tgi).json()["details"]
    assert details["cached_tokens"] >= details["prompt_tokens"] // 2
    tgi["parameters"]["adapter_id"] = "caps"
    assert client.post("/generate", json=tgi).json()["details"]["cached_tokens"] == 0


def test_info_and_metrics_count_lookups_hits_blocks_and_evictions(client) -> None:
    before = client.get("/info").json()["prefix_cache"]
    _chat(client, "pirate", _messages("How heavy is class 3?"))
    after = client.get("/info").json()["prefix_cache"]
    assert after["lookups"] == before["lookups"] + 1 and after["hit_tokens"] > before["hit_tokens"]
    assert after["cached_blocks"] > 0 and after["block_size"] == 16 and "evictions" in after
    metrics = client.get("/metrics").text
    for name in ("lookups", "hit_tokens", "blocks", "evictions"):
        line = next(x for x in metrics.splitlines() if x.startswith(f"loraplex_prefix_cache_{name}"))
        assert float(line.split()[-1]) >= 0
    hits = next(x for x in metrics.splitlines() if x.startswith("loraplex_prefix_cache_hit_tokens"))
    assert float(hits.split()[-1]) == after["hit_tokens"]


def _upload(client, model, seed: int, adapter_id: str, replace: bool = False) -> None:
    config, weights = make_adapter(model, seed=seed, r=8, alpha=64)
    r = client.post(
        "/adapters", files=files_parts(config, weights), data={"adapter_id": adapter_id},
        params={"replace": "true"} if replace else None,
    )  # fmt: skip
    assert r.status_code == 201, r.text


def test_replaced_reuploaded_and_composed_adapters_never_read_earlier_blocks(client, embedded_model) -> None:
    messages = _messages("Which class ships on day 3?")
    _upload(client, embedded_model, 21, "swap")
    v1 = _chat(client, "swap", messages)
    assert _cached(_chat(client, "swap", messages)) > 0
    _upload(client, embedded_model, 22, "swap", replace=True)  # same id, other weights
    v2 = _chat(client, "swap", messages)
    assert _cached(v2) == 0 and v2["choices"][0]["message"] != v1["choices"][0]["message"]
    assert client.delete("/adapters/swap").status_code == 204
    _upload(client, embedded_model, 22, "swap")  # the very same files again: a new version all the same
    assert _cached(_chat(client, "swap", messages)) == 0
    prompt = SYSTEM + " Which class ships on day 5?"

    def composed(weights: list[float]) -> dict:
        merged = {"ids": ["caps", "pirate"], "weights": weights, "merge_strategy": "linear"}
        r = client.post("/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": N, "details": True,
                                                                            "merged_adapters": merged}})  # fmt: skip
        assert r.status_code == 200, r.text
        return r.json()["details"]

    assert composed([0.5, 0.5])["cached_tokens"] == 0
    assert composed([0.5, 0.5])["cached_tokens"] > 0  # the same composition: the same digest
    assert composed([0.9, 0.1])["cached_tokens"] == 0  # another composition never reads it
