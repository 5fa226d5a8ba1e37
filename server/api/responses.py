"""``POST /v1/responses``: OpenAI's Responses API, stateless, on the chat route's machinery.

The request becomes a chat request (``ResponsesRequest.as_chat``: template, tools, grammar and
engine requests are the chat route's), and the reply takes the Responses shape::

    {"id": "resp_…", "object": "response", "status": "completed" | "incomplete",
     "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text"}]}]
               or [{"type": "function_call", "call_id", "name", "arguments"}, ...],
     "incomplete_details": {"reason": "max_output_tokens"} | null, "usage": {"input_tokens", ...}}

Streams are OpenAI's typed events (``event: <type>`` and the same ``type`` in the data, each
with a ``sequence_number``): ``response.created``, ``response.in_progress``, per output item
``response.output_item.added``, its text (``response.content_part.added``,
``response.output_text.delta``…, ``.done``, ``response.content_part.done``) or its arguments
(``response.function_call_arguments.delta``…, ``.done``), ``response.output_item.done``, and
``response.completed`` (or ``response.incomplete``) with the whole response. A generation error
ends the stream with ``response.failed``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from server.api.deps import BaseDep, EngineDep, RegistryDep
from server.api.generation import ERROR_STATUS, run_many, stream_events, timing_headers
from server.api.openai import (
    _OPENAI_ERRORS,
    OpenAIError,
    OpenAIRoute,
    openai_text,
    prepare_chat,
)
from server.api.openai_tools import ToolStream, whole_message
from server.api.openapi_errors import OpenAIErrorResponse, error_responses
from server.api.responses_schemas import ResponsesRequest
from server.api.sse import sse_response
from server.engine.requests import ErrorEvent, FinishEvent, TokenEvent

router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)


@router.post("/responses", responses=error_responses(*_OPENAI_ERRORS, model=OpenAIErrorResponse))
async def create_response(
    body: ResponsesRequest, engine: EngineDep, base: BaseDep, registry: RegistryDep, http_request: Request
) -> Response:
    """One model response (stateless: nothing is stored; send earlier turns in ``input``)."""
    for field in ("previous_response_id", "conversation"):
        if getattr(body, field) is not None:
            raise OpenAIError(400, f"{field} is not supported: loraplex stores no responses. Send the earlier "
                              "turns (messages, function_call and function_call_output items) in `input`.",
                              "unsupported_parameter", field)  # fmt: skip
    try:
        chat_body = body.as_chat()
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc
    chat = await prepare_chat(chat_body, engine, base, registry)
    reply = _ResponseReply(body, tools=chat.plan is not None)
    if body.stream:
        return sse_response(reply.stream(engine, chat.requests[0]), chat.requests[0])
    finish = (await run_many(engine, chat.requests, http_request))[0]
    return JSONResponse(reply.whole(finish), headers=timing_headers(chat.requests[0]))


class _ResponseReply:
    """One response's body (whole, or as stream events) with a shared id and timestamp."""

    def __init__(self, body: ResponsesRequest, tools: bool) -> None:
        self.body = body
        self.tools = tools
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.sequence = 0

    def envelope(self, status: str, output: list[dict], finish: FinishEvent | None = None) -> dict[str, Any]:
        body = self.body
        incomplete = status == "incomplete"
        text_format = body.text.model_dump(by_alias=True, exclude_none=True) if body.text else None
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "model": body.model, "output": output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "metadata": body.metadata or {}, "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": None, "store": False, "temperature": body.temperature, "top_p": body.top_p,
            "text": text_format or {"format": {"type": "text"}},
            "tool_choice": _tool_choice(body),
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
            "truncation": "disabled", "user": body.user,
            "usage": None if finish is None else _usage(finish),
        }  # fmt: skip

    def whole(self, finish: FinishEvent) -> dict[str, Any]:
        text = openai_text(finish)
        reason = "length" if finish.finish_reason == "length" else "stop"
        output: list[dict[str, Any]]
        if self.tools and (message := whole_message(text, reason))[1] == "tool_calls":
            output = [_function_call(c["id"], c["function"]["name"], c["function"]["arguments"], "completed")
                      for c in message[0]["tool_calls"]]  # fmt: skip
        else:
            output = [self._message(text, "incomplete" if reason == "length" else "completed")]
        return self.envelope("incomplete" if reason == "length" else "completed", output, finish)

    def _message(self, text: str | None, status: str) -> dict[str, Any]:
        content = [] if text is None else [_output_text(text)]
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

    async def stream(self, engine: Any, request: Any) -> AsyncIterator[str]:
        """The typed events (see the module docstring)."""
        yield self.event("response.created", response=self.envelope("in_progress", []))
        yield self.event("response.in_progress", response=self.envelope("in_progress", []))
        parts = ToolStream() if self.tools else None
        items = _StreamItems(self)
        async for event in stream_events(engine, request):
            if isinstance(event, TokenEvent):
                for chunk in items.push(parts.push(event.text) if parts else [{"content": event.text}]):
                    yield chunk
            elif isinstance(event, FinishEvent):  # (no stop sequences here: every token's text is kept)
                for chunk in items.push(parts.push("", final=True) if parts else []):
                    yield chunk
                status = "incomplete" if event.finish_reason == "length" else "completed"
                output = []
                for chunk, item in items.close(status):
                    yield chunk
                    output.append(item)
                kind = "response.incomplete" if status == "incomplete" else "response.completed"
                yield self.event(kind, response=self.envelope(status, output, event))
            elif isinstance(event, ErrorEvent):
                failed = self.envelope("failed", [])
                failed["error"] = {"code": event.error_type, "message": event.message,
                                   "status": ERROR_STATUS.get(event.error_type, 500)}  # fmt: skip
                yield self.event("response.failed", response=failed)


class _StreamItems:
    """The output items of a stream as they open, grow and close."""

    def __init__(self, reply: _ResponseReply) -> None:
        self.reply = reply
        self.text = ""  # the message's text so far
        self.message_open = False
        self.calls: list[dict[str, Any]] = []  # function_call items, in output order

    def push(self, deltas: list[dict[str, Any]]) -> list[str]:
        event, out = self.reply.event, []
        for delta in deltas:
            if "content" in delta:
                if not self.message_open:
                    self.message_open = True
                    out.append(event("response.output_item.added", output_index=0,
                                     item=self.reply._message(None, "in_progress")))  # fmt: skip
                    out.append(event("response.content_part.added", item_id=self.reply.message_id, output_index=0,
                                     content_index=0, part=_output_text("")))  # fmt: skip
                self.text += delta["content"]
                out.append(event("response.output_text.delta", item_id=self.reply.message_id, output_index=0,
                                 content_index=0, delta=delta["content"], logprobs=[]))  # fmt: skip
                continue
            call = delta["tool_calls"][0]
            if "id" in call:
                item = _function_call(call["id"], call["function"]["name"], "", "in_progress")
                self.calls.append(item)
                out.append(
                    event("response.output_item.added", output_index=len(self.calls) - 1, item=dict(item))
                )
            else:
                item = self.calls[call["index"]]
                item["arguments"] += call["function"]["arguments"]
                out.append(event("response.function_call_arguments.delta", item_id=item["id"],
                                 output_index=call["index"], delta=call["function"]["arguments"]))  # fmt: skip
        return out

    def close(self, status: str) -> list[tuple[str, dict[str, Any]]]:
        """The closing events, each with the finished item."""
        event, closed = self.reply.event, []
        if self.calls:  # (cut by max_output_tokens inside a call: that item is "incomplete")
            for index, item in enumerate(self.calls):
                item["status"] = status
                done = event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                             name=item["name"], arguments=item["arguments"])  # fmt: skip
                closed.append(
                    (done + event("response.output_item.done", output_index=index, item=item), item)
                )
            return closed
        item_id = self.reply.message_id
        message = self.reply._message(self.text, status)
        events = "" if self.message_open else event("response.output_item.added", output_index=0,
                                                    item=self.reply._message(None, "in_progress"))  # fmt: skip
        events += event("response.output_text.done", item_id=item_id, output_index=0, content_index=0,
                        text=self.text, logprobs=[])  # fmt: skip
        events += event("response.content_part.done", item_id=item_id, output_index=0, content_index=0,
                        part=_output_text(self.text))  # fmt: skip
        events += event("response.output_item.done", output_index=0, item=message)
        return [(events, message)]


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _function_call(call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": f"fc_{call_id.removeprefix('call_')}", "call_id": call_id,
            "name": name, "arguments": arguments, "status": status}  # fmt: skip


def _tool_choice(body: ResponsesRequest) -> Any:
    if body.tool_choice is None:
        return "auto"
    return body.tool_choice if isinstance(body.tool_choice, str) else body.tool_choice.model_dump()


def _usage(finish: FinishEvent) -> dict[str, Any]:
    return {
        "input_tokens": finish.prompt_tokens,
        "input_tokens_details": {"cached_tokens": finish.cached_tokens},
        "output_tokens": finish.generated_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": finish.prompt_tokens + finish.generated_tokens,
    }
