"""The request body of ``POST /v1/responses`` (OpenAI's Responses API), and its translation to a
chat request, which the chat route's machinery runs (template, tools, grammar, engine requests).

    Responses                                   chat completions
    input: "text"                               messages: [{"role": "user", "content": "text"}]
    input: [{"role", "content"}, ...]           the same messages (input_text/output_text parts joined)
    input item {"type": "function_call"}        an assistant message's tool_calls
    input item {"type": "function_call_output"} a {"role": "tool"} message
    instructions                                a system message first
    max_output_tokens                           max_tokens
    text.format                                 response_format
    tools [{"type": "function", "name", ...}]   tools [{"type": "function", "function": {...}}]
    tool_choice {"type": "function", "name"}    tool_choice {"type": "function", "function": {"name"}}

Stateless: ``store`` is accepted and nothing is stored, so ``previous_response_id`` (and
``conversation``) are refused with a 400 saying to send the earlier turns in ``input``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.api.compose_schemas import AdapterScale
from server.api.openai_schemas import ChatCompletionRequest
from server.api.openai_tools import MAX_TOOLS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class InputText(_Strict):
    type: Literal["input_text", "output_text"]
    text: str


class InputMessage(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputText]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(_Strict):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None


class FunctionCallOutputItem(_Strict):
    type: Literal["function_call_output"]
    call_id: str
    output: str


InputItem = FunctionCallItem | FunctionCallOutputItem | InputMessage


class TextFormatText(_Strict):
    type: Literal["text"]


class TextFormatJsonObject(_Strict):
    type: Literal["json_object"]


class TextFormatJsonSchema(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)
    type: Literal["json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="The JSON schema of the output.")
    strict: bool | None = None


TextFormat = Annotated[
    TextFormatText | TextFormatJsonObject | TextFormatJsonSchema, Field(discriminator="type")
]


class TextOptions(_Strict):
    format: TextFormat | None = None


class FunctionTool(_Strict):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(_Strict):
    type: Literal["function"]
    name: str


class ResponsesRequest(_Strict):
    model: str = Field(..., description="An adapter id, or the base model's name for no adapter.")
    input: str | list[InputItem] = Field(
        ..., description="Text, or a list of messages and function call items."
    )
    instructions: str | None = Field(None, description="A system message put before the input.")
    max_output_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    temperature: float | None = Field(None, ge=0, le=2, description="0: greedy; default 1.")
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool | None = False
    store: bool | None = Field(None, description="Accepted; loraplex stores no responses.")
    previous_response_id: str | None = Field(None, description="Not supported (nothing is stored): null.")
    conversation: Any = Field(None, description="Not supported (nothing is stored): null.")
    text: TextOptions | None = None
    tools: list[FunctionTool] | None = Field(None, max_length=MAX_TOOLS, description="Function tools only.")
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    adapter_scale: AdapterScale = 1.0  # loraplex's extra body field (openai SDK: extra_body)

    def as_chat(self) -> ChatCompletionRequest:
        """The same request as /v1/chat/completions takes it (validated there too)."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": self._messages(),
            "max_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "adapter_scale": self.adapter_scale,
            "parallel_tool_calls": self.parallel_tool_calls,
        }
        if self.text is not None and self.text.format is not None:
            body["response_format"] = self._response_format()
        if self.tools:
            body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                             for t in self.tools]  # fmt: skip
        if isinstance(self.tool_choice, FunctionChoice):
            body["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice
        return ChatCompletionRequest.model_validate(body)

    def _response_format(self) -> dict[str, Any]:
        fmt = self.text.format  # type: ignore[union-attr]
        if isinstance(fmt, TextFormatJsonSchema):
            return {"type": "json_schema", "json_schema": {"name": fmt.name, "schema": fmt.schema_}}
        return {"type": fmt.type}  # type: ignore[union-attr]

    def _messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            return [*messages, {"role": "user", "content": self.input}]
        for item in self.input:
            if isinstance(item, InputMessage):
                messages.append({"role": item.role, "content": item.text()})
            elif isinstance(item, FunctionCallOutputItem):
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
            else:  # consecutive calls join one assistant turn, as chat's tool_calls
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}  # fmt: skip
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
                    last["tool_calls"].append(call)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        return messages
