"""Tool calling through the openai SDK against a live server (tiny random model: the grammar alone
makes its calls valid): tool_choice auto/required/named, streamed tool calls, ``role: "tool"``
turns, and 20 requests mixed in one batch (tools and plain rows, base and adapter)."""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from tests.live_server import openai_client, served_with_qv_adapter

BASE = "tiny-llama"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": 0, "maximum": 99},
                "b": {"type": "integer", "minimum": -9, "maximum": 9},
            },
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tiny_base, tokenizer, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("openai-tools")
    with served_with_qv_adapter(tiny_base, tokenizer, workdir, max_total_tokens=512) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    with openai_client(server) as c:
        yield c


def _check_calls(message, names: set[str]) -> None:
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("model", [BASE, "qv"])
def test_required_and_named_tool_choice(client, model) -> None:
    reply = client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                           max_tokens=200, temperature=0)  # fmt: skip
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice.message.content
    _check_calls(choice.message, set(SCHEMAS))
    named = client.chat.completions.create(
        model=model, messages=MESSAGES, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}},
        max_tokens=200, temperature=0.9, seed=5, parallel_tool_calls=False,
    )  # fmt: skip
    assert named.choices[0].finish_reason == "tool_calls" and len(named.choices[0].message.tool_calls) == 1
    _check_calls(named.choices[0].message, {"add"})


def test_auto_is_text_or_valid_calls(client) -> None:
    seen = set()
    for seed in range(6):
        reply = client.chat.completions.create(model=BASE, messages=MESSAGES, tools=TOOLS, max_tokens=60,
                                               temperature=1.0, seed=seed)  # fmt: skip
        choice = reply.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            _check_calls(choice.message, set(SCHEMAS))
            seen.add("call")
        else:
            assert choice.message.content and not choice.message.content.startswith("<")
            seen.add("text")
    assert seen  # the model decides; both outcomes are checked when they occur
    none = client.chat.completions.create(model=BASE, messages=MESSAGES, tools=TOOLS, tool_choice="none",
                                          max_tokens=5, temperature=0)  # fmt: skip
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason == "length"


@pytest.mark.parametrize("model", [BASE, "qv"])
def test_streamed_tool_calls_equal_the_whole_reply(client, model) -> None:
    args = dict(model=model, messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=200,
                temperature=0)  # fmt: skip
    whole = client.chat.completions.create(**args).choices[0]
    chunks = list(client.chat.completions.create(**args, stream=True))
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or []:
            if delta.id is not None:  # the first delta of a call: id, type and name, empty arguments
                assert (
                    delta.type == "function" and delta.function.arguments == "" and delta.index not in calls
                )
                calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
            else:
                assert delta.function.name is None
                calls[delta.index]["arguments"] += delta.function.arguments
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls
    ]
    with client.chat.completions.stream(**args) as stream:  # the SDK's helper joins the same deltas
        final = stream.get_final_completion().choices[0]
    assert [c.function.arguments for c in final.message.tool_calls] == [
        c.function.arguments for c in whole.message.tool_calls
    ]


def test_tool_results_continue_the_conversation(client) -> None:
    first = client.chat.completions.create(model=BASE, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                           max_tokens=200, temperature=0).choices[0].message  # fmt: skip
    follow = [*MESSAGES, first.model_dump(exclude_none=True)]
    follow += [
        {"role": "tool", "tool_call_id": c.id, "content": '{"temperature": 21}'} for c in first.tool_calls
    ]
    reply = client.chat.completions.create(model="qv", messages=follow, tools=TOOLS, tool_choice="none",
                                           max_tokens=4, temperature=0)  # fmt: skip
    assert reply.choices[0].message.content


def test_mixed_batch_of_tool_and_plain_rows(server, client) -> None:
    """20 requests at once (one engine batch): every call's arguments validate; plain rows stay plain."""
    stats = server.app.state.engine.stats
    before = Counter(stats.batch_sizes)

    def one(i: int):
        model = BASE if i % 2 else "qv"
        if i % 4 == 0:
            return "plain", client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12,
                                                           temperature=0.8, seed=i)  # fmt: skip
        choice = "required" if i % 4 == 1 else {"type": "function", "function": {"name": "get_weather"}}
        if i % 4 == 3:
            choice = "auto"
        return choice, client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS, tool_choice=choice,
                                                      max_tokens=200, temperature=0.8, seed=i)  # fmt: skip

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    calls = 0
    for kind, reply in results:
        message = reply.choices[0].message
        if kind == "plain":
            assert message.tool_calls is None and message.content is not None
        elif kind == "auto" and not message.tool_calls:
            assert not message.content.startswith("<")
        else:
            _check_calls(message, {"get_weather"} if isinstance(kind, dict) else set(SCHEMAS))
            calls += len(message.tool_calls)
    assert calls >= 10
    decoded_together = max(size for size, steps in (stats.batch_sizes - before).items() if steps)
    assert decoded_together >= 15, stats.batch_sizes - before  # tool, named, auto and plain rows in one step


def test_bad_tool_requests_are_refused(client) -> None:
    with pytest.raises(openai.UnprocessableEntityError, match="not in tools"):
        client.chat.completions.create(model=BASE, messages=MESSAGES, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})  # fmt: skip
    with pytest.raises(openai.UnprocessableEntityError, match="response_format"):
        client.chat.completions.create(model=BASE, messages=MESSAGES, tools=TOOLS,
                                       response_format={"type": "json_object"})  # fmt: skip
    bad_history = [*MESSAGES, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{not json"}}]}]  # fmt: skip
    with pytest.raises(openai.UnprocessableEntityError, match="JSON object"):
        client.chat.completions.create(model=BASE, messages=bad_history, tools=TOOLS, max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError, match="invalid JSON schema"):
        bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": 3}}}
        client.chat.completions.create(model=BASE, messages=MESSAGES, tools=[bad], max_tokens=2)
