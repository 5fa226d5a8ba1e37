"""The real TGI (``text-generation`` 0.7.0) and LoRAX (``lorax-client`` 0.6.3) Python clients against a
live server (tiny model, loopback): every generation method, sync and async, streamed and not, and
LoRAX's ``response_format`` (structured output).

Both clients POST to the server's root URL (TGI's ``POST /``); their outputs must equal what
``POST /generate`` answers for the same request. The TGI client has no ``adapter_id`` parameter,
so adapters are exercised through the LoRAX client.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time

import httpx
import jsonschema
import lorax
import lorax.errors
import lorax.types
import pytest
import text_generation
import text_generation.errors
import torch

from tests.conftest import make_peft_adapter
from tests.live_server import start_live_server

PROMPT = "Hello there, how are"


@pytest.fixture(scope="module")
def server(tiny_base, tokenizer, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tgi")
    make_peft_adapter(tiny_base, workdir / "qv", seed=3, b_scale=0.5, r=8, lora_alpha=16,
                      target_modules=["q_proj", "v_proj"])  # fmt: skip
    live = start_live_server(
        tiny_base, tokenizer, workdir, adapter=[f"qv={workdir / 'qv'}"], max_total_tokens=256
    )
    yield live
    live.stop()


def _generate(server, inputs: str = PROMPT, **parameters) -> dict:
    body = {"inputs": inputs, "parameters": {"details": True, **parameters}}
    r = httpx.post(server.url + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _tokens(details) -> list[tuple[int, str, float]]:
    return [(t.id, t.text, round(t.logprob, 4)) for t in details.tokens]


def _expected_tokens(body: dict) -> list[tuple[int, str, float]]:
    return [(t["id"], t["text"], round(t["logprob"], 4)) for t in body["details"]["tokens"]]


# ----------------------------------------------------------------------------- POST / itself


def test_root_route_dispatches_on_stream(server) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 4, "details": True}}
    whole = httpx.post(server.url + "/", json={**body, "stream": False}, timeout=60)
    assert whole.status_code == 200 and isinstance(whole.json(), list) and len(whole.json()) == 1
    assert whole.json()[0] == _generate(server, max_new_tokens=4)
    with httpx.stream("POST", server.url + "/", json={**body, "stream": True}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    assert len(lines) == 4
    refused = httpx.post(server.url + "/", json={**body, "stream": True, "parameters": {"best_of": 2}})
    assert refused.status_code == 422 and "best_of" in refused.json()["error"]


# ----------------------------------------------------------------------------- TGI client


@pytest.fixture(scope="module")
def tgi(server):
    return text_generation.Client(server.url, timeout=60)


def test_tgi_generate_equals_generate(server, tgi) -> None:
    reply = tgi.generate(PROMPT, max_new_tokens=6)
    expected = _generate(server, max_new_tokens=6)
    assert reply.generated_text == expected["generated_text"]
    assert _tokens(reply.details) == _expected_tokens(expected)
    assert reply.details.finish_reason.value == expected["details"]["finish_reason"]
    assert reply.details.generated_tokens == 6 and reply.details.prefill == []


def test_tgi_stream_equals_generate(server, tgi) -> None:
    events = list(tgi.generate_stream(PROMPT, max_new_tokens=6))
    expected = _generate(server, max_new_tokens=6)
    assert "".join(e.token.text for e in events) == expected["generated_text"]
    assert [e.token.id for e in events] == [t["id"] for t in expected["details"]["tokens"]]
    assert all(e.generated_text is None for e in events[:-1])
    assert events[-1].generated_text == expected["generated_text"]
    assert events[-1].details.generated_tokens == 6


def test_tgi_async_generate_and_stream(server) -> None:
    client = text_generation.AsyncClient(server.url, timeout=60)
    expected = _generate(server, max_new_tokens=5)

    async def run():
        whole = await client.generate(PROMPT, max_new_tokens=5)
        streamed = [e async for e in client.generate_stream(PROMPT, max_new_tokens=5)]
        return whole, streamed

    whole, streamed = asyncio.run(run())
    assert whole.generated_text == expected["generated_text"]
    assert "".join(e.token.text for e in streamed) == expected["generated_text"]


def test_tgi_every_parameter(server, tgi, tiny_base, tokenizer) -> None:
    ids = tokenizer(PROMPT)["input_ids"]
    reply = tgi.generate(
        PROMPT, max_new_tokens=5, decoder_input_details=True, top_n_tokens=3, return_full_text=True,
        repetition_penalty=1.2, frequency_penalty=0.5, truncate=len(ids) - 1, stop_sequences=["\x00never"],
    )  # fmt: skip
    details = reply.details
    kept = ids[1:]  # truncate keeps the last N prompt tokens
    assert [t.id for t in details.prefill] == kept and details.prefill[0].logprob is None
    with torch.no_grad():  # prompt log-probabilities: the model's own
        logits = tiny_base(torch.tensor([kept])).logits[0].log_softmax(-1)
    reference = [logits[j, kept[j + 1]].item() for j in range(len(kept) - 1)]
    assert [t.logprob for t in details.prefill[1:]] == pytest.approx(reference, abs=1e-4)
    assert reply.generated_text.startswith(PROMPT)  # return_full_text
    assert len(details.top_tokens) == 5 and all(len(top) == 3 for top in details.top_tokens)
    for top in details.top_tokens:
        assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
    expected = _generate(
        server,
        inputs=PROMPT,
        max_new_tokens=5,
        repetition_penalty=1.2,
        frequency_penalty=0.5,
        truncate=len(ids) - 1,
    )
    assert reply.generated_text == PROMPT + expected["generated_text"]
    # sampling knobs: typical_p, top_k, top_p, temperature with a seed repeat exactly
    sampled = [
        tgi.generate(PROMPT, max_new_tokens=6, do_sample=True, typical_p=0.9, top_k=20, top_p=0.95,
                     temperature=0.8, seed=5).generated_text
        for _ in range(2)
    ]  # fmt: skip
    assert sampled[0] == sampled[1]


def test_tgi_best_of(tgi) -> None:
    reply = tgi.generate(PROMPT, max_new_tokens=5, best_of=3, do_sample=True)
    others = reply.details.best_of_sequences
    assert len(others) == 2 and reply.details.seed is not None

    def mean(tokens) -> float:
        return sum(t.logprob for t in tokens) / len(tokens)

    assert all(mean(reply.details.tokens) >= mean(o.tokens) for o in others)
    assert len({reply.details.seed, *(o.seed for o in others)}) == 3


def test_tgi_errors_are_the_clients_exceptions(tgi) -> None:
    with pytest.raises(text_generation.errors.ValidationError, match="max_new_tokens"):
        tgi.generate(PROMPT, max_new_tokens=10_000)
    with pytest.raises(text_generation.errors.ValidationError, match="top_n_tokens"):
        tgi.generate(PROMPT, max_new_tokens=2, top_n_tokens=50)
    with pytest.raises(text_generation.errors.ValidationError, match="watermark"):
        tgi.generate(PROMPT, max_new_tokens=2, watermark=True)
    with pytest.raises(text_generation.errors.ValidationError):
        list(tgi.generate_stream(PROMPT, max_new_tokens=10_000))


# ----------------------------------------------------------------------------- LoRAX client


@pytest.fixture(scope="module")
def lrx(server):
    return lorax.Client(server.url, timeout=60)


@pytest.mark.parametrize("adapter_id", [None, "qv"])
def test_lorax_generate_and_stream_equal_generate(server, lrx, adapter_id) -> None:
    expected = _generate(server, max_new_tokens=6, adapter_id=adapter_id)
    reply = lrx.generate(
        PROMPT, adapter_id=adapter_id, adapter_source="local", max_new_tokens=6, api_token="x"
    )
    assert reply.generated_text == expected["generated_text"]
    assert _tokens(reply.details) == _expected_tokens(expected)
    assert reply.details.prompt_tokens == expected["details"]["prompt_tokens"]
    events = list(lrx.generate_stream(PROMPT, adapter_id=adapter_id, max_new_tokens=6))
    assert "".join(e.token.text for e in events) == expected["generated_text"]
    assert events[-1].details.prompt_tokens == expected["details"]["prompt_tokens"]


def test_adapter_changes_the_lorax_output(lrx) -> None:
    base = lrx.generate(PROMPT, max_new_tokens=8).generated_text
    assert lrx.generate(PROMPT, adapter_id="qv", max_new_tokens=8).generated_text != base


def test_lorax_async_generate_and_stream(server) -> None:
    client = lorax.AsyncClient(server.url, timeout=1)
    expected = _generate(server, max_new_tokens=5, adapter_id="qv")

    async def run():
        whole = await client.generate(PROMPT, adapter_id="qv", max_new_tokens=5)
        streamed = [e async for e in client.generate_stream(PROMPT, adapter_id="qv", max_new_tokens=5)]
        with pytest.raises(lorax.errors.NotFoundError):
            await client.generate(PROMPT, adapter_id="nope", max_new_tokens=2)
        with pytest.raises(lorax.errors.ValidationError):
            await client.generate(PROMPT, max_new_tokens=10_000)
        return whole, streamed

    whole, streamed = asyncio.run(run())
    assert whole.generated_text == expected["generated_text"]
    assert "".join(e.token.text for e in streamed) == expected["generated_text"]


def test_lorax_merged_adapters(server, lrx) -> None:
    """LoRAX's merged_adapters, sync, streamed and async: the same tokens as /generate; the same
    adapter twice at [0.5, 0.5] is the adapter; a DARE composition repeats exactly (seeded)."""
    twice = lorax.MergedAdapters(ids=["qv", "qv"], weights=[0.5, 0.5], merge_strategy="linear", density=1.0)
    reply = lrx.generate(PROMPT, merged_adapters=twice, max_new_tokens=6, details=True)
    assert _tokens(reply.details) == _expected_tokens(_generate(server, max_new_tokens=6, adapter_id="qv"))
    dare = lorax.MergedAdapters(ids=["qv", "qv"], weights=[0.6, 0.3], merge_strategy="dare_ties", density=0.5,
                                majority_sign_method="frequency")  # fmt: skip
    expected = _generate(server, max_new_tokens=6, merged_adapters=dare.model_dump())
    assert expected["details"]["adapter_id"].startswith("merged:")
    assert expected["generated_text"] != reply.generated_text  # another composition, another answer
    reply = lrx.generate(PROMPT, merged_adapters=dare, max_new_tokens=6, details=True)
    assert _tokens(reply.details) == _expected_tokens(expected)
    streamed = list(lrx.generate_stream(PROMPT, merged_adapters=dare, max_new_tokens=6))
    assert "".join(e.token.text for e in streamed) == expected["generated_text"]

    async def run():
        return await lorax.AsyncClient(server.url, timeout=60).generate(
            PROMPT, merged_adapters=dare, max_new_tokens=6
        )

    assert asyncio.run(run()).generated_text == expected["generated_text"]


def test_lorax_parameters(lrx) -> None:
    reply = lrx.generate(PROMPT, max_new_tokens=4, return_k_alternatives=2, decoder_input_details=True,
                         ignore_eos_token=True, details=True)  # fmt: skip
    assert reply.details.generated_tokens == 4 and reply.details.prefill[0].logprob is None
    for token in reply.details.tokens:
        alternatives = token.alternative_tokens
        assert len(alternatives) == 2 and alternatives[0].logprob >= alternatives[1].logprob
        assert token.logprob <= alternatives[0].logprob + 1e-6
    quiet = lrx.generate(PROMPT, max_new_tokens=3, details=False)
    assert quiet.details.tokens == [] and quiet.generated_text
    best = lrx.generate(PROMPT, max_new_tokens=3, best_of=2, do_sample=True)
    assert len(best.details.best_of_sequences) == 1


RECORD = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"}},
    "required": ["name", "ok"],
    "additionalProperties": False,
}


def test_lorax_response_format(lrx, server) -> None:
    """LoRAX's structured output, as its client sends it: a dict or its ResponseFormat model."""
    fmt = {"type": "json_object", "schema": RECORD}
    whole = lrx.generate(PROMPT, response_format=fmt, max_new_tokens=40)
    assert whole.details.finish_reason == "eos_token"
    jsonschema.validate(json.loads(whole.generated_text), RECORD)
    assert whole.generated_text == _generate(server, max_new_tokens=40, response_format=fmt)["generated_text"]
    streamed = list(lrx.generate_stream(PROMPT, response_format=fmt, max_new_tokens=40))
    assert "".join(e.token.text for e in streamed) == streamed[-1].generated_text == whole.generated_text
    typed = lorax.types.ResponseFormat(type="json_object", schema=RECORD)
    for seed in range(3):
        sampled = lrx.generate(PROMPT, response_format=typed, max_new_tokens=40, do_sample=True, seed=seed,
                               adapter_id="qv")  # fmt: skip
        assert sampled.details.finish_reason == "eos_token"
        jsonschema.validate(json.loads(sampled.generated_text), RECORD)
    anything = lrx.generate(PROMPT, response_format={"type": "json_object", "schema": {}}, max_new_tokens=20)
    assert anything.details.finish_reason == "eos_token"
    json.loads(anything.generated_text)  # the empty schema: any JSON value


def test_lorax_errors_are_the_clients_exceptions(lrx) -> None:
    with pytest.raises(lorax.errors.NotFoundError, match="nope"):
        lrx.generate(PROMPT, adapter_id="nope", max_new_tokens=2)
    with pytest.raises(lorax.errors.NotFoundError):
        list(lrx.generate_stream(PROMPT, adapter_id="nope", max_new_tokens=2))
    with pytest.raises(lorax.errors.BadRequestError, match="no hub source"):  # 400 source_not_configured
        lrx.generate(PROMPT, adapter_id="qv", adapter_source="hub", max_new_tokens=2)
    unknown = lorax.MergedAdapters(ids=["qv", "nope"], weights=[1.0, 1.0], density=1.0)
    with pytest.raises(lorax.errors.NotFoundError, match="nope"):
        lrx.generate(PROMPT, merged_adapters=unknown, max_new_tokens=2)
    empty = lorax.MergedAdapters(ids=["qv", "qv"], weights=[1.0, 1.0], merge_strategy="ties", density=0.0)
    with pytest.raises(lorax.errors.UnprocessableEntityError, match="density"):  # 422 invalid_composition
        lrx.generate(PROMPT, merged_adapters=empty, max_new_tokens=2)
    with pytest.raises(lorax.errors.ValidationError, match="Invalid type: strin"):
        lrx.generate(PROMPT, response_format={"type": "json_object", "schema": {"type": "strin"}})
    with pytest.raises(lorax.errors.ValidationError):
        list(lrx.generate_stream(PROMPT, max_new_tokens=10_000))


def test_overloaded_is_the_clients_overloaded_error(tiny_base, tokenizer, tmp_path) -> None:
    """429 ``overloaded`` (``--max-queue``) raises OverloadedError in both clients."""
    live = start_live_server(tiny_base, tokenizer, tmp_path, max_queue=1)
    engine, paused, stalled = live.app.state.engine, threading.Event(), threading.Event()

    def stall() -> None:  # the engine thread waits: the request below holds the only place
        stalled.set()
        paused.wait(30)

    engine.call(stall)
    assert stalled.wait(10)
    holder = threading.Thread(
        target=httpx.post, args=(live.url + "/generate",), kwargs={"json": {"inputs": PROMPT}, "timeout": 60}
    )
    holder.start()
    try:
        deadline = time.monotonic() + 10
        while engine.num_waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(text_generation.errors.OverloadedError):
            text_generation.Client(live.url).generate(PROMPT, max_new_tokens=2)
        with pytest.raises(lorax.errors.OverloadedError):
            lorax.Client(live.url).generate(PROMPT, max_new_tokens=2)
    finally:
        paused.set()
        holder.join(30)
        live.stop()


def test_lorax_max_new_tokens_null_fills_the_context(lrx) -> None:
    reply = lrx.generate("Hi", max_new_tokens=None, ignore_eos_token=True, details=True)
    assert reply.details.prompt_tokens + reply.details.generated_tokens == 256
    assert not math.isnan(reply.details.tokens[0].logprob)
