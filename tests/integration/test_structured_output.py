"""Structured output on the embedded SmolLM2 (native runner) over HTTP: 20 constrained requests and
free ones in one batch, the official ``openai`` SDK's ``response_format``, and the example in docs/structured-output.md."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema
import openai
import pydantic
import pytest

from tests.api_helpers import native_loader
from tests.live_server import start_live_server

ROOT = Path(__file__).resolve().parents[2]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 40},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
PEOPLE = [
    ("Alice", 31, "Paris"), ("Bob", 45, "London"), ("Chen", 28, "Beijing"), ("Dara", 52, "Dublin"),
    ("Emil", 19, "Oslo"), ("Fatima", 37, "Cairo"), ("Goran", 64, "Zagreb"), ("Hana", 23, "Tokyo"),
    ("Ivan", 41, "Moscow"), ("Juana", 35, "Lima"), ("Kofi", 29, "Accra"), ("Lena", 58, "Berlin"),
    ("Marco", 33, "Rome"), ("Nadia", 26, "Algiers"), ("Omar", 47, "Amman"), ("Priya", 30, "Delhi"),
    ("Quinn", 22, "Toronto"), ("Rosa", 69, "Madrid"), ("Sven", 40, "Stockholm"), ("Tariq", 55, "Karachi"),
]  # fmt: skip
FREE = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain.", "Say hello."]


@pytest.fixture(scope="module")
def server(tokenizer, embedded_dir, tmp_path_factory):
    live = start_live_server(None, tokenizer, tmp_path_factory.mktemp("structured"),
                             loader=native_loader(embedded_dir), runner="native", max_total_tokens=512)  # fmt: skip
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def base(client) -> str:
    return client.models.list().data[0].id


def chat(tokenizer, question: str) -> str:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _generate(server, inputs: str, **parameters) -> dict:
    r = httpx.post(server.url + "/generate", json={"inputs": inputs, "parameters": parameters}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_twenty_constrained_rows_validate_and_free_rows_in_their_batch_are_unchanged(
    server, tokenizer
) -> None:
    """20 JSON-schema requests (greedy and sampled) and 4 free ones arrive while the engine is held,
    so they run as one batch: every constrained output validates; every free output equals the
    same request run alone."""
    free = [(chat(tokenizer, q), {"max_new_tokens": 24, **({"do_sample": True, "seed": 5} if i == 3 else {})})
            for i, q in enumerate(FREE)]  # fmt: skip
    alone = [_generate(server, prompt, **params)["generated_text"] for prompt, params in free]
    fmt = {"type": "json_object", "schema": PERSON}
    constrained = [
        (chat(tokenizer, f"Give {name}'s record as JSON: {name} is {age} and lives in {city}."),
         {"max_new_tokens": 96, "response_format": fmt, **({"do_sample": True, "seed": i} if i % 4 == 3 else {})})
        for i, (name, age, city) in enumerate(PEOPLE)
    ]  # fmt: skip
    engine, held, holding = server.app.state.engine, threading.Event(), threading.Event()

    def hold() -> None:  # the engine thread waits until every request is queued
        holding.set()
        held.wait(60)

    engine.call(hold)
    assert holding.wait(30)
    jobs = [*constrained, *free]
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(_generate, server, prompt, **params) for prompt, params in jobs]
        while engine.num_waiting < len(jobs) and not any(f.done() for f in futures):
            threading.Event().wait(0.05)
        held.set()
        replies = [f.result() for f in futures]
    assert engine.stats.peak_batch >= len(jobs)  # they shared one batch
    for (prompt, _), reply in zip(constrained, replies[: len(PEOPLE)], strict=True):
        assert reply["details"]["finish_reason"] == "eos_token", (prompt, reply)
        jsonschema.validate(json.loads(reply["generated_text"]), PERSON)
    records = [json.loads(reply["generated_text"]) for reply in replies[: len(PEOPLE)]]
    assert sum(r["name"] == name for r, (name, _, _) in zip(records, PEOPLE, strict=True)) >= 15  # it reads
    assert [reply["generated_text"] for reply in replies[len(PEOPLE) :]] == alone


class City(pydantic.BaseModel):
    name: str
    country: str
    population_millions: float


def test_openai_sdk_json_schema(client, base) -> None:
    question = [{"role": "user", "content": "Give the name, country and population of Paris as JSON."}]
    schema = City.model_json_schema()
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}
    reply = client.chat.completions.create(model=base, messages=question, response_format=fmt, temperature=0,
                                           max_tokens=80)  # fmt: skip
    assert reply.choices[0].finish_reason == "stop"
    content = reply.choices[0].message.content
    jsonschema.validate(json.loads(content), schema)
    stream = client.chat.completions.create(model=base, messages=question, response_format=fmt, temperature=0,
                                            max_tokens=80, stream=True)  # fmt: skip
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == content
    parsed = client.chat.completions.parse(model=base, messages=question, response_format=City, temperature=0,
                                           max_tokens=80)  # fmt: skip
    assert isinstance(parsed.choices[0].message.parsed, City)  # the SDK's own parse of the output
    place = {"type": "object", "additionalProperties": False, "required": ["city", "country"],
             "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20}}}  # fmt: skip
    completion = client.completions.create(  # the SDK's completions take response_format as an extra field
        model=base, prompt="Paris as JSON:", max_tokens=100, temperature=0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "place", "schema": place}}},
    )  # fmt: skip
    assert completion.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(completion.choices[0].text), place)


def test_openai_sdk_json_object_and_text(client, base) -> None:
    question = [{"role": "user", "content": "Return a JSON object with the capital of France."}]
    reply = client.chat.completions.create(model=base, messages=question, temperature=0, max_tokens=120,
                                           response_format={"type": "json_object"})  # fmt: skip
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    text = client.chat.completions.create(model=base, messages=question, temperature=0, max_tokens=12,
                                          response_format={"type": "text"})  # fmt: skip
    free = client.chat.completions.create(model=base, messages=question, temperature=0, max_tokens=12)
    assert text.choices[0].message.content == free.choices[0].message.content


def test_a_cut_output_says_length(client, base) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": City.model_json_schema()}}
    reply = client.chat.completions.create(model=base, messages=[{"role": "user", "content": "Paris?"}],
                                           response_format=fmt, temperature=0, max_tokens=3)  # fmt: skip
    assert reply.choices[0].finish_reason == "length" and reply.choices[0].message.content.startswith("{")


def test_an_invalid_schema_is_422_with_the_engines_message(server, client, base) -> None:
    bad = {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}
    with pytest.raises(openai.UnprocessableEntityError, match="uniqueItems") as info:
        client.chat.completions.create(model=base, messages=[{"role": "user", "content": "hi"}],
                                       response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": bad}})  # fmt: skip
    assert info.value.body["code"] == "validation" and "response_format" in info.value.body["message"]
    r = httpx.post(server.url + "/generate_stream", json={"inputs": "hi", "parameters": {
        "response_format": {"type": "json_object", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}}})  # fmt: skip
    assert r.status_code == 422 and "minimum (5) is greater than maximum (1)" in r.json()["error"]


def test_docs_structured_output_example_runs(server) -> None:
    page = (ROOT / "docs" / "structured-output.md").read_text()
    match = re.search(r"<!-- structured-output.*?-->\n```python\n(.*?)```", page, flags=re.S)
    assert match, "docs/structured-output.md lost its structured-output example"
    script = match.group(1).replace("http://127.0.0.1:8080", server.url)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "{'name': 'Ada Lovelace', 'age': 36}"  # as docs/structured-output.md shows
    assert lines[1] == "stop {'name': 'Ada Lovelace', 'age': 36}"
    assert lines[2] == "Person(name='Ada Lovelace', age=36)"
    assert lines[3].startswith("UnprocessableEntityError") and "Invalid type: strin" in lines[3]
