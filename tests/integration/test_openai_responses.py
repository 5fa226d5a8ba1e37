"""The openai SDK's Responses API (``responses.create``, ``responses.stream``, ``responses.parse``)
against a live server (tiny model): text and message input, instructions, streaming events,
``text.format`` JSON schema, function tools, ``model`` = an adapter; stateless (no
``previous_response_id``)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pydantic
import pytest

from tests.live_server import openai_client, served_with_qv_adapter

BASE = "tiny-llama"
TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer", "minimum": 1,
                                                                            "maximum": 7}},
        "required": ["city", "days"],
        "additionalProperties": False,
    },
}  # fmt: skip


class Answer(pydantic.BaseModel):
    ok: bool


@pytest.fixture(scope="module")
def server(tiny_base, tokenizer, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("openai-responses")
    with served_with_qv_adapter(tiny_base, tokenizer, workdir, max_total_tokens=512) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    with openai_client(server) as c:
        yield c


@pytest.mark.parametrize("model", [BASE, "qv"])
def test_create_equals_chat_and_stream(client, model) -> None:
    chat = client.chat.completions.create(model=model, max_tokens=8, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])  # fmt: skip
    response = client.responses.create(model=model, instructions="Be brief.", input="Hi", max_output_tokens=8,
                                       temperature=0)  # fmt: skip
    assert response.object == "response" and response.model == model and response.id.startswith("resp_")
    assert response.output_text == chat.choices[0].message.content
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    as_messages = client.responses.create(model=model, max_output_tokens=8, temperature=0, input=[
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}])  # fmt: skip
    assert as_messages.output_text == response.output_text
    events = list(client.responses.create(model=model, instructions="Be brief.", input="Hi", max_output_tokens=8,
                                          temperature=0, stream=True))  # fmt: skip
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-1] == "response.incomplete" and "response.output_text.done" in kinds  # cut: OpenAI's event
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == response.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.output[0].content[0].text == response.output_text


def test_text_format_json_schema(client) -> None:
    parsed = client.responses.parse(model="qv", input="Is it ok?", text_format=Answer, max_output_tokens=40,
                                    temperature=0)  # fmt: skip
    assert parsed.status == "completed" and isinstance(parsed.output_parsed, Answer)
    with client.responses.stream(model="qv", input="Is it ok?", text_format=Answer, max_output_tokens=40,
                                 temperature=0) as stream:  # fmt: skip
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[-1] == "response.completed" and final.output_parsed == parsed.output_parsed
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}  # fmt: skip
    raw = client.responses.create(model=BASE, input="A number", max_output_tokens=40, temperature=0.7,
                                  text={"format": {"type": "json_schema", "name": "n", "schema": schema}})  # fmt: skip
    jsonschema.validate(json.loads(raw.output_text), schema)


@pytest.mark.parametrize("model", [BASE, "qv"])
def test_function_tools_whole_and_streamed(client, model) -> None:
    args = dict(model=model, input="Weather in Paris?", tools=[TOOL], tool_choice="required", max_output_tokens=200,
                temperature=0)  # fmt: skip
    response = client.responses.create(**args)
    calls = [item for item in response.output if item.type == "function_call"]
    assert response.status == "completed" and calls and len(calls) == len(response.output)
    for call in calls:
        assert call.name == "get_weather" and call.call_id.startswith("call_")
        jsonschema.validate(json.loads(call.arguments), TOOL["parameters"])
    with client.responses.stream(**args) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [(c.name, c.arguments) for c in final.output] == [(c.name, c.arguments) for c in calls]
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert deltas == "".join(c.arguments for c in calls)
    named = client.responses.create(**{**args, "tool_choice": {"type": "function", "name": "get_weather"},
                                       "parallel_tool_calls": False})  # fmt: skip
    assert len(named.output) == 1 and named.output[0].type == "function_call"
    # the call and its output sent back as input items (stateless: the whole conversation each time)
    follow = client.responses.create(model=model, max_output_tokens=4, temperature=0, tools=[TOOL], tool_choice="none",
                                     input=[{"role": "user", "content": "Weather in Paris?"},
                                            {"type": "function_call", "call_id": calls[0].call_id, "name": calls[0].name,
                                             "arguments": calls[0].arguments},
                                            {"type": "function_call_output", "call_id": calls[0].call_id,
                                             "output": '{"sunny": true}'}])  # fmt: skip
    assert follow.output[0].type == "message" and follow.output_text


def test_stateless_and_bad_requests(client) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=BASE, input="Hi", previous_response_id="resp_123")
    assert info.value.param == "previous_response_id" and "input" in info.value.message
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="Hi")
    with pytest.raises(openai.UnprocessableEntityError, match="not in tools"):
        client.responses.create(
            model=BASE, input="Hi", tools=[TOOL], tool_choice={"type": "function", "name": "x"}
        )
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=BASE, input="hello " * 600)
    assert info.value.code == "context_length_exceeded"
