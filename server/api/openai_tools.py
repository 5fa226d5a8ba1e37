"""Tool (function) calling on ``/v1/chat/completions``: the request's tools, the prompt, the grammar
that makes every call valid, and the reply's ``tool_calls`` (whole or as stream deltas).

The model writes each call as a Hermes/Qwen2.5-style block, whatever the model::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

(several calls: blocks separated by a newline, when ``parallel_tool_calls`` allows them).

Prompt: a chat template that renders tools itself in this format (it mentions ``<tool_call>``,
as Qwen2.5's and Hermes's do) gets ``tools=`` and the messages' ``tool_calls``; any other template
gets the generic format: a system message listing the functions' JSON schemas and the block
format, earlier calls written as blocks in the assistant's turn, and ``role: "tool"`` results as
user turns wrapped in ``<tool_response>`` (templates differ in the roles they accept).

Output, by ``tool_choice`` (the grammar is llguidance's, as ``response_format`` uses, with each
call's JSON compiled from a schema: ``name`` one of the functions, ``arguments`` valid against
that function's ``parameters``)::

    none (or no tools)   free text, no grammar
    auto (the default)   free text that does not begin with "<", or calls: the model decides
    required             one or more calls (one without parallel_tool_calls)
    {"type": "function", "function": {"name": N}}   calls of N only

``finish_reason`` is ``"tool_calls"`` when the reply holds calls; a reply cut by ``max_tokens``
inside a call is ``"length"`` with the raw text as ``content``.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool

from adapters.torch_threads import confined
from server.api.errors import ApiError
from server.engine.engine import Engine
from server.engine.grammar import JSON_OPTIONS, Grammar, GrammarError

OPEN, CLOSE = "<tool_call>\n", "\n</tool_call>"
_CALL_HEAD = re.compile(r'<tool_call>\n\{"name": "([A-Za-z0-9_.-]+)", "arguments": ')
_CALL_TAIL = "}" + CLOSE  # the wrapper object's brace, then the closing tag
MAX_TOOLS = 128


# --------------------------------------------------------------------------- request bodies


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="The function's name.")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="JSON schema of the arguments object; null: no arguments."
    )
    strict: bool | None = Field(None, description="Accepted; the schema is always enforced.")

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type", "object") != "object":
            raise ValueError('must be the JSON schema of an object ({"type": "object", "properties": ...})')
        return value


class ToolDef(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["function"]
    function: FunctionDef


class _ChosenFunction(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["function"]
    function: _ChosenFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: str
    arguments: str = Field(..., description="The arguments, a JSON object as text.")

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        try:
            parsed = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"must be a JSON object as text: {exc}") from exc
        if not isinstance(parsed, dict):
            raise ValueError('must be a JSON object as text, e.g. \'{"city": "Paris"}\'')
        return value


class MessageToolCall(BaseModel):
    """A call in an earlier assistant message (sent back in the conversation)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools ask of this reply: which functions, and must it call one."""

    functions: list[FunctionDef]  # the functions the reply may call
    mode: Literal["auto", "required"]
    parallel: bool

    @property
    def names(self) -> set[str]:
        return {f.name for f in self.functions}


def tool_plan(
    tools: list[ToolDef] | None, choice: ToolChoice | None, parallel: bool | None
) -> ToolPlan | None:
    """None when the reply is free text (no tools, or ``tool_choice: "none"``); 422 for a bad choice."""
    if choice is not None and not tools and choice != "none":
        raise ApiError(422, "tool_choice needs tools: send the functions in `tools`, or leave tool_choice out.",
                       "validation")  # fmt: skip
    if not tools or choice == "none":
        return None
    functions = [t.function for t in tools]
    names = [f.name for f in functions]
    if len(set(names)) != len(names):
        raise ApiError(422, f"tools: function names must be unique, got {names}.", "validation")
    if isinstance(choice, NamedToolChoice):
        chosen = [f for f in functions if f.name == choice.function.name]
        if not chosen:
            raise ApiError(422, f"tool_choice names {choice.function.name!r}, which is not in tools {names}; "
                           "name one of them.", "validation")  # fmt: skip
        return ToolPlan(chosen, "required", parallel is not False)
    return ToolPlan(functions, "required" if choice == "required" else "auto", parallel is not False)


# --------------------------------------------------------------------------- the prompt


def supports_tools(chat_template: str | None) -> bool:
    """A template that renders tools itself, asking for this module's block format."""
    return bool(chat_template) and "tools" in chat_template and "<tool_call>" in chat_template  # type: ignore[operator]


def render_call(name: str, arguments: str | dict[str, Any]) -> str:
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    return OPEN + json.dumps({"name": name, "arguments": args}) + CLOSE


def tool_messages(
    messages: list[dict[str, Any]], plan: ToolPlan | None, chat_template: str | None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages as the template gets them, and extra ``apply_chat_template`` arguments.

    ``messages``: the request's, each ``{"role", "content", "tool_calls"?, "tool_call_id"?}``.
    """
    if plan is not None and supports_tools(chat_template):
        tools = [{"type": "function", "function": f.model_dump(exclude_none=True)} for f in plan.functions]
        for message in messages:
            for call in message.get("tool_calls") or []:
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
        return messages, {"tools": tools}
    rendered = []
    for message in messages:
        if message["role"] == "tool":
            rendered.append(
                {"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
            )
        elif message.get("tool_calls"):
            blocks = [
                render_call(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]
            ]
            content = "\n".join([message["content"], *blocks] if message["content"] else blocks)
            rendered.append({"role": "assistant", "content": content})
        else:
            rendered.append({k: v for k, v in message.items() if k not in ("tool_calls", "tool_call_id")})
    if plan is not None:
        rendered = _with_system(rendered, generic_instructions(plan))
    return rendered, {}


def generic_instructions(plan: ToolPlan) -> str:
    listed = "\n".join(json.dumps(f.model_dump(exclude_none=True)) for f in plan.functions)
    must = "You must call a function." if plan.mode == "required" else "Call a function when it helps."
    return (
        f"You can call these functions:\n{listed}\n{must} To call one, reply with\n"
        f'{OPEN}{{"name": <function name>, "arguments": <arguments object>}}{CLOSE}\n'
        + ("(one block per call, several calls allowed)." if plan.parallel else "(one call).")
    )


def _with_system(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


# --------------------------------------------------------------------------- the grammar


def call_schema(plan: ToolPlan) -> dict[str, Any]:
    """The JSON of one call: ``{"name": N, "arguments": <valid against N's parameters>}``, N any function."""
    variants = [
        {
            "type": "object",
            "properties": {
                "name": {"const": f.name},
                "arguments": f.parameters
                if f.parameters is not None
                else {"type": "object", "properties": {}},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in plan.functions
    ]
    return {"anyOf": variants, "x-guidance": JSON_OPTIONS}


def tool_lark(plan: ToolPlan) -> str:
    """llguidance's Lark grammar of the reply (see the module docstring)."""
    calls = 'call ("\\n" call)*' if plan.parallel else "call"
    rules = [
        f"calls: {calls}",
        f"call: {json.dumps(OPEN)} body {json.dumps(CLOSE)}",
        f"body: %json {json.dumps(call_schema(plan))}",
    ]
    if plan.mode == "auto":
        return "\n".join(["start: TEXT | calls", r"TEXT: /[^<][\s\S]*/", *rules]) + "\n"
    return "\n".join(["start: calls", *rules]) + "\n"


async def tool_grammar(engine: Engine, plan: ToolPlan) -> Grammar:
    try:
        return await run_in_threadpool(
            confined(engine.grammars.compile_lark), tool_lark(plan), call_schema(plan)
        )
    except GrammarError as exc:
        raise ApiError(422, f"tools: {exc}", "validation") from exc


# --------------------------------------------------------------------------- the reply


@dataclass
class ParsedCall:
    name: str
    arguments: str  # so far (the whole, once ``closed``)
    closed: bool


def parse_calls(text: str, *, final: bool) -> list[ParsedCall] | None:
    """The calls in ``text`` (None: it is free text). Unless ``final``, the end of an open call's
    arguments is held back (it may be the wrapper's closing brace)."""
    if not text.startswith("<"):
        return None
    calls: list[ParsedCall] = []
    position = 0
    while (head := _CALL_HEAD.match(text, position)) is not None:
        start = head.end()
        end = text.find(_CALL_TAIL, start)
        if end < 0:
            rest = text[start:] if final else text[start : max(len(text) - len(_CALL_TAIL), start)]
            calls.append(ParsedCall(head.group(1), rest, False))
            break
        calls.append(ParsedCall(head.group(1), text[start:end], True))
        position = end + len(_CALL_TAIL) + 1  # the "\n" between calls
    return calls


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def whole_message(text: str, finish_reason: str) -> tuple[dict[str, Any], str]:
    """A non-streamed reply's message and finish_reason."""
    calls = parse_calls(text, final=True)
    if not calls or not all(c.closed for c in calls) or finish_reason == "length":
        return {"role": "assistant", "content": text}, finish_reason
    tool_calls = [{"id": call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                  for c in calls]  # fmt: skip
    return {"role": "assistant", "content": None, "tool_calls": tool_calls}, "tool_calls"


@dataclass
class ToolStream:
    """One streamed choice's deltas: text as ``content``, calls as OpenAI's ``tool_calls`` deltas
    (the first of each call carries its id, type and name with empty arguments; later ones only
    ``index`` and the next piece of ``arguments``)."""

    text: str = ""
    ids: list[str] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)  # argument characters sent, per call
    content_sent: int = 0

    def push(self, piece: str, *, final: bool = False) -> list[dict[str, Any]]:
        """The deltas ``piece`` adds (``final``: the reply is complete, flush what was held)."""
        self.text += piece
        calls = parse_calls(self.text, final=final)
        if calls is None:
            if not self.text and not final:
                return []
            new, self.content_sent = self.text[self.content_sent :], len(self.text)
            return [{"content": new}] if new else []
        deltas = []
        for index, call in enumerate(calls):
            if index == len(self.ids):
                self.ids.append(call_id())
                self.sent.append(0)
                deltas.append({"tool_calls": [{"index": index, "id": self.ids[index], "type": "function",
                                               "function": {"name": call.name, "arguments": ""}}]})  # fmt: skip
            if len(call.arguments) > self.sent[index]:
                new = call.arguments[self.sent[index] :]
                self.sent[index] = len(call.arguments)
                deltas.append({"tool_calls": [{"index": index, "function": {"arguments": new}}]})
        return deltas

    @property
    def called(self) -> bool:
        return bool(self.ids)
