"""Metrics collectors, JSON logs and OpenAI request translation, without a server."""

from __future__ import annotations

import io
import json
import logging
from collections import Counter

import pytest
from pydantic import ValidationError

from server.api.context import RequestContext, activate, deactivate
from server.api.openai_schemas import ChatCompletionRequest, CompletionRequest
from server.engine.describe import (
    EngineSnapshot,
    KvInfo,
    LimitsInfo,
    PrefixCacheInfo,
    QueueInfo,
    RunnerInfo,
    SlotsInfo,
    StatsInfo,
)
from server.logs import make_handler
from server.metrics import Metrics, batch_size_histogram
from tests.prom import metric_value


def _buckets(family) -> dict[str, float]:
    return {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}


@pytest.mark.parametrize("sizes", [Counter({1: 3, 4: 2, 40: 1}), [1, 1, 1, 4, 4, 40]])
def test_batch_size_histogram_from_counter_or_list(sizes) -> None:
    family = batch_size_histogram(sizes)
    buckets = _buckets(family)
    assert buckets["1"] == 3 and buckets["2"] == 3 and buckets["4"] == 5 and buckets["32"] == 5
    assert buckets["64"] == 6 and buckets["+Inf"] == 6
    assert next(s.value for s in family.samples if s.name.endswith("_sum")) == 3 + 8 + 40


def _snapshot(**stats) -> EngineSnapshot:
    """An engine snapshot of a quiet HF-runner engine: 2 running, 1 waiting, one adapter resident."""
    counters = dict(steps=5, peak_batch=3, swaps=0, swap_seconds=0.0, generated_tokens=0, preemptions=0,
                    batch_sizes={}) | stats  # fmt: skip
    return EngineSnapshot(
        runner=RunnerInfo("hf", "grouped", "eager", "grouped", 0, 0.0, "dense", "none", 100, False),
        kv=KvInfo(used_tokens=7, capacity_tokens=None, bytes_reserved=0, block_size=None),
        prefix_cache=PrefixCacheInfo(enabled=False, reason="the hf runner has no prefix cache"),
        mode="auto",
        merged_adapter=None,
        stats=StatsInfo(**counters),
        slots=SlotsInfo(resident_keys=("a@1",), in_use=2, loads=4, evictions=1, capacity=8),
        queue=QueueInfo(running=2, waiting=1),
        limits=LimitsInfo(32, 2048, 4096, 4096, 8),
    )


def test_engine_snapshot_drives_the_engine_metrics() -> None:
    text = Metrics(lambda: (_snapshot(), None)).exposition().decode()
    assert (
        metric_value(text, "loraplex_running_requests") == 2
        and metric_value(text, "loraplex_waiting_requests") == 1
        and metric_value(text, "loraplex_swaps_total") == 0
    )
    assert (
        metric_value(text, "loraplex_adapters_loaded") == 1
        and metric_value(text, "loraplex_batch_size_count") == 0
    )
    assert metric_value(text, "loraplex_adapter_slot_evictions_total") == 1
    assert metric_value(text, "loraplex_kv_cache_used_tokens") == 7
    assert "loraplex_kv_cache_capacity_tokens" not in text  # grows on demand: no capacity to show
    assert "loraplex_prefix_cache_lookups" not in text
    busy = Metrics(lambda: (_snapshot(swaps=3, batch_sizes={1: 2, 4: 1}), None)).exposition().decode()
    assert (
        metric_value(busy, "loraplex_swaps_total") == 3
        and metric_value(busy, "loraplex_batch_size_count") == 3
    )
    empty = Metrics(lambda: (None, None)).exposition().decode()  # before the model is loaded
    assert metric_value(empty, "loraplex_running_requests") == 0
    assert "loraplex_kv_cache_used_tokens" not in empty


def test_json_log_lines_carry_the_request_id() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("loraplex.test.json")
    logger.addHandler(make_handler("json", stream))
    logger.propagate = False
    token = activate(RequestContext(request_id="rid-1", route="/x", started=0.0))
    try:
        logger.warning("inside %s", "a request")
    finally:
        deactivate(token)
    logger.warning("outside")
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (
        inside["request_id"] == "rid-1"
        and inside["message"] == "inside a request"
        and inside["level"] == "warning"
    )
    assert outside["request_id"] is None


def test_openai_sampling_translation() -> None:
    greedy = CompletionRequest(model="m", prompt="p", temperature=0, top_p=0.5, stop="x").sampling(5)
    assert not greedy.samples and greedy.stop == ("x",) and greedy.max_new_tokens == 5
    default = CompletionRequest(model="m", prompt="p").sampling(5)
    assert default.samples and default.temperature is None  # OpenAI's default: temperature 1, sampling
    warm = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], temperature=0.7,
                                 top_p=0.9, seed=3, max_completion_tokens=7)  # fmt: skip
    params = warm.sampling(warm.token_limit)
    assert (params.temperature, params.top_p, params.seed, params.max_new_tokens) == (0.7, 0.9, 3, 7)


@pytest.mark.parametrize(
    "fields",
    [{"n": 9}, {"prompt": ["a"] * 65}, {"prompt": ["a"] * 9, "n": 8}, {"max_tokens": 0}, {"logprobs": 6}, {"stop": [""]}, {"frequency_penalty": 2.5},
     {"temperature": 3}, {"best_of": 2}, {"suffix": "x"}, {"logit_bias": {"1": 1.0}}, {"stream": 1}],
)  # fmt: skip
def test_openai_requests_refuse_what_loraplex_cannot_honour(fields) -> None:
    with pytest.raises(ValidationError):
        CompletionRequest(**{"model": "m", "prompt": "p", **fields})


def test_chat_messages_flatten_text_parts() -> None:
    request = ChatCompletionRequest(model="m", messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ])  # fmt: skip
    assert [m.template_dict() for m in request.messages] == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]  # fmt: skip
    with pytest.raises(ValidationError):
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [{"type": "image_url"}]}])


def test_the_stores_pending_background_checks_are_a_gauge(tmp_path) -> None:
    """``loraplex_adapter_checks_pending``: versions queued for the store's background sha256 check
    (a bench waits for 0 before measuring an idle server); 0 without a store."""
    from adapters.store import AdapterStore

    with AdapterStore(tmp_path / "data") as store:
        store.checks.schedule("some-folder", delay=60.0)  # queued, not due for a minute
        text = Metrics(lambda: (None, store)).exposition().decode()
        assert metric_value(text, "loraplex_adapter_checks_pending") == 1
    assert (
        metric_value(Metrics(lambda: (None, None)).exposition().decode(), "loraplex_adapter_checks_pending")
        == 0
    )


def test_minor_page_faults_count_memory_touched_for_the_first_time() -> None:
    """``loraplex_process_minor_page_faults``: a new anonymous mapping written page by page adds
    faults (at least one, whatever the page size the kernel backs it with)."""
    import mmap

    before = metric_value(
        Metrics(lambda: (None, None)).exposition().decode(), "loraplex_process_minor_page_faults_total"
    )
    fresh = mmap.mmap(-1, 8 << 20)
    for offset in range(0, len(fresh), mmap.PAGESIZE):
        fresh[offset] = 1
    after = metric_value(
        Metrics(lambda: (None, None)).exposition().decode(), "loraplex_process_minor_page_faults_total"
    )
    fresh.close()
    assert after >= before + 1
