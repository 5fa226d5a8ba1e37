"""POST /generate, /generate_stream, /health, /info over HTTP on the tiny model."""

from __future__ import annotations

import json

import pytest

from tests.api_helpers import start_client


@pytest.fixture
def client(tiny_base, tokenizer, tmp_path, peft_adapter_factory):
    path, _ = peft_adapter_factory(tiny_base, "qv", seed=3)
    c = start_client(tiny_base, tokenizer, tmp_path, adapter=[f"qv={path}"], max_total_tokens=256)
    yield c
    c.__exit__(None, None, None)


def _generate(client, inputs="Hello there", **parameters):
    return client.post("/generate", json={"inputs": inputs, "parameters": parameters})


def test_health_info(client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/info").json()
    assert info["model"] == "tiny-llama" and info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["mode"] == "auto" and info["merged_adapter"] is None and info["adapters"] == ["qv"]
    assert info["limits"]["max_batch"] == 32 and info["limits"]["max_total_tokens"] == 256


def test_generate_shape_and_headers(client) -> None:
    r = _generate(client, max_new_tokens=5, adapter_id="qv", details=True)
    assert r.status_code == 200, r.text
    body = r.json()
    details = body["details"]
    assert details["finish_reason"] == "length" and details["generated_tokens"] == 5
    assert details["adapter_id"] == "qv" and details["seed"] is None and details["prompt_tokens"] > 0
    assert len(details["tokens"]) == 5 and {"id", "text", "logprob", "special"} <= details["tokens"][0].keys()
    assert body["generated_text"] == "".join(t["text"] for t in details["tokens"])
    assert r.headers["x-adapter-id"] == "qv"
    for h in ("x-queue-time", "x-inference-time", "x-time-to-first-token"):
        assert float(r.headers[h]) >= 0
    plain = _generate(client, max_new_tokens=5, adapter_id="qv").json()
    assert plain["details"]["tokens"] == [] and plain["details"]["prefill"] == []
    assert plain["generated_text"] == body["generated_text"]


def test_adapter_changes_output_and_base_is_default(client) -> None:
    base = _generate(client, max_new_tokens=8).json()
    tuned = _generate(client, max_new_tokens=8, adapter_id="qv").json()
    assert base["details"]["adapter_id"] is None
    assert base["generated_text"] != tuned["generated_text"]


def test_stream_matches_generate(client) -> None:
    whole = _generate(client, max_new_tokens=6, adapter_id="qv").json()
    with client.stream(
        "POST",
        "/generate_stream",
        json={"inputs": "Hello there", "parameters": {"max_new_tokens": 6, "adapter_id": "qv"}},
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert len(events) == 6
    assert all(e["generated_text"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == whole["generated_text"]
    assert events[-1]["details"]["finish_reason"] == "length"
    assert "".join(e["token"]["text"] for e in events) == whole["generated_text"]


def test_unknown_adapter_is_404_naming_it(client) -> None:
    r = _generate(client, adapter_id="nope")
    assert r.status_code == 404
    assert "'nope'" in r.json()["error"] and r.json()["error_type"] == "adapter_not_found"
    r = client.post("/generate_stream", json={"inputs": "x", "parameters": {"adapter_id": "nope"}})
    assert r.status_code == 404


@pytest.mark.parametrize(
    ("parameters", "words"),
    [
        ({"temperature": 0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 10_000}, "max_new_tokens"),
        ({"stop": [""]}, "stop"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"unknown_knob": 1}, "unknown_knob"),
        ({"best_of": 5}, "best_of"),
        ({"top_n_tokens": 21}, "top_n_tokens"),
        ({"watermark": True}, "watermark"),
        ({"adapter_source": "ftp"}, "adapter_source"),
        ({"merged_adapters": {"ids": ["a"], "weights": [1.0], "density": 2.0}}, "merged_adapters"),
        ({"response_format": {"type": "json_schema", "schema": {}}}, "response_format"),
        ({"response_format": {"type": "json_object", "schema": {"type": "strin"}}}, "Invalid type: strin"),
        ({"truncate": 0}, "truncate"),
        ({"typical_p": 1.5}, "typical_p"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
    ],
)
def test_invalid_parameters_are_422(client, parameters, words) -> None:
    r = _generate(client, **parameters)
    assert r.status_code == 422, r.text
    assert words in r.json()["error"] and r.json()["error_type"] == "validation"
    assert _generate(client, max_new_tokens=2).status_code == 200  # still serving


def test_bad_bodies(client) -> None:
    assert client.post("/generate", json={"parameters": {}}).status_code == 422
    assert (
        client.post(
            "/generate", content=b"not json", headers={"content-type": "application/json"}
        ).status_code
        == 422
    )
    r = client.post("/generate", json={"inputs": "", "parameters": {}})
    assert r.status_code == 422 and "inputs" in r.json()["error"]


def test_seeded_sampling_over_http(client) -> None:
    p = dict(max_new_tokens=8, do_sample=True, temperature=1.3, seed=11, adapter_id="qv")
    a, b = _generate(client, **p).json(), _generate(client, **p).json()
    assert a["generated_text"] == b["generated_text"] and a["details"]["seed"] == 11
