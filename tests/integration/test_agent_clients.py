"""Agent libraries against a live server (tiny random model: the grammar alone makes the calls
valid): LangChain's ``ChatOpenAI`` (``bind_tools``, streamed tool calls,
``with_structured_output(method="function_calling")``) and instructor's TOOLS mode, each on the base
model and an adapter."""

from __future__ import annotations

import instructor
import openai
import pytest
from langchain_core.messages import AIMessageChunk, HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, ConfigDict, Field

from tests.live_server import served_with_qv_adapter

BASE = "tiny-llama"


class GetWeather(BaseModel):
    """The weather in a city."""

    # no extra keys: a random model would otherwise add keys until max_tokens (a trained one stops)
    model_config = ConfigDict(extra="forbid")

    city: str = Field(max_length=8)
    days: int = Field(ge=1, le=7)


class Person(BaseModel):
    """A person mentioned in the text."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=120)
    member: bool


@pytest.fixture(scope="module")
def server(tiny_base, tokenizer, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("agent-clients")
    with served_with_qv_adapter(tiny_base, tokenizer, workdir, max_total_tokens=512) as live:
        yield live


def _chat(server, model: str) -> ChatOpenAI:
    return ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model=model, temperature=0, max_tokens=200,
                      max_retries=0)  # fmt: skip


@pytest.mark.parametrize("model", [BASE, "qv"])
def test_langchain_bind_tools(server, model) -> None:
    llm = _chat(server, model).bind_tools([GetWeather], tool_choice="required")
    question = HumanMessage("What is the weather in Paris?")
    reply = llm.invoke([question])
    assert reply.tool_calls and reply.response_metadata["finish_reason"] == "tool_calls"
    for call in reply.tool_calls:
        assert call["name"] == "GetWeather" and call["id"]
        GetWeather.model_validate(call["args"])
    streamed: AIMessageChunk | None = None
    for chunk in llm.stream([question]):
        streamed = chunk if streamed is None else streamed + chunk
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [
        (c["name"], c["args"]) for c in reply.tool_calls
    ]
    results = [ToolMessage('{"sunny": true}', tool_call_id=c["id"]) for c in reply.tool_calls]
    answer = (
        _chat(server, model).bind_tools([GetWeather], tool_choice="none").invoke([question, reply, *results])
    )
    assert isinstance(answer.content, str) and answer.content and not answer.tool_calls


@pytest.mark.parametrize("model", [BASE, "qv"])
def test_langchain_structured_output_by_function_calling(server, model) -> None:
    structured = _chat(server, model).with_structured_output(Person, method="function_calling")
    person = structured.invoke("Alice is 30 and a member.")
    assert isinstance(person, Person)


@pytest.mark.parametrize("model", [BASE, "qv"])
def test_instructor_tools_mode(server, model) -> None:
    client = instructor.from_openai(openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0),
                                    mode=instructor.Mode.TOOLS)  # fmt: skip
    person, completion = client.chat.completions.create_with_completion(
        model=model, response_model=Person, max_tokens=200, temperature=0, max_retries=0,
        messages=[{"role": "user", "content": "Alice is 30 and a member."}],
    )  # fmt: skip
    assert isinstance(person, Person)
    assert completion.choices[0].message.tool_calls[0].function.name == "Person"
