"""GET /metrics: exposed, counting requests by adapter and status, latencies and engine gauges."""

from __future__ import annotations

import pytest

from tests.api_helpers import start_client
from tests.conftest import make_peft_adapter
from tests.prom import metric_value


@pytest.fixture(scope="module")
def client(tiny_base, tokenizer, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("metrics")
    make_peft_adapter(
        tiny_base, workdir / "qv", seed=3, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]
    )
    c = start_client(tiny_base, tokenizer, workdir, adapter=[f"qv={workdir / 'qv'}"], max_total_tokens=256)
    yield c
    c.__exit__(None, None, None)


def _metrics(client) -> str:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return r.text


def test_metrics_count_requests_latencies_and_engine(client) -> None:
    gen = {"max_new_tokens": 4, "ignore_eos": True}
    assert client.post("/generate", json={"inputs": "Hi", "parameters": gen}).status_code == 200
    assert (
        client.post("/generate", json={"inputs": "Hi", "parameters": {**gen, "adapter_id": "qv"}}).status_code
        == 200
    )
    with client.stream(
        "POST", "/generate_stream", json={"inputs": "Hi", "parameters": {**gen, "adapter_id": "qv"}}
    ) as r:
        assert sum(1 for line in r.iter_lines() if line.startswith("data:")) == 4
    assert (
        client.post("/generate", json={"inputs": "Hi", "parameters": {"adapter_id": "nope"}}).status_code
        == 404
    )
    chat = {"model": "qv", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    text = _metrics(client)

    def value(name: str, **labels: str) -> float | None:
        return metric_value(text, name, **labels)

    assert value("loraplex_requests_total", route="/generate", adapter="__base__", status="200") == 1
    assert value("loraplex_requests_total", route="/generate", adapter="qv", status="200") == 1
    assert value("loraplex_requests_total", route="/generate_stream", adapter="qv", status="200") == 1
    assert value("loraplex_requests_total", route="/generate", adapter="__unknown__", status="404") == 1
    assert value("loraplex_requests_total", route="/v1/chat/completions", adapter="qv", status="200") == 1
    assert value("loraplex_request_duration_seconds_count", route="/generate") == 3  # the 404 too
    assert value("loraplex_time_to_first_token_seconds_count") == 4
    assert value("loraplex_queue_time_seconds_count") == 4
    assert value("loraplex_inter_token_latency_seconds_count") >= 3 * 3  # 3 gaps in each 4-token request
    assert value("loraplex_generated_tokens_total", adapter="qv") >= 8
    assert value("loraplex_prompt_tokens_total", adapter="__base__") >= 1
    assert value("loraplex_batch_size_count") >= 1 and value("loraplex_batch_size_bucket", le="+Inf") >= 1
    assert value("loraplex_running_requests") == 0 and value("loraplex_waiting_requests") == 0
    assert value("loraplex_peak_batch_size") >= 1
    assert value("loraplex_adapters_loaded") == 1 and value("loraplex_adapters_stored") == 1
    assert value("loraplex_adapter_slot_loads_total") >= 1
    assert value("loraplex_swaps_total") is not None and value("loraplex_swap_seconds_total") is not None
    assert value("loraplex_adapter_load_seconds_count") is not None


def test_apps_have_their_own_registries(client, tiny_base, tokenizer, tmp_path) -> None:
    other = start_client(tiny_base, tokenizer, tmp_path)
    try:
        before = metric_value(_metrics(client), "loraplex_requests_total", route="/generate", adapter="__base__",
                              status="200")  # fmt: skip
        assert (
            other.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 1}}).status_code
            == 200
        )
        mine = _metrics(other)
        assert (
            metric_value(mine, "loraplex_requests_total", route="/generate", adapter="__base__", status="200")
            == 1
        )
        after = metric_value(_metrics(client), "loraplex_requests_total", route="/generate", adapter="__base__",
                             status="200")  # fmt: skip
        assert after == before
    finally:
        other.__exit__(None, None, None)
