"""Request bodies of the OpenAI-compatible routes, and their translation to ``SamplingParams``.

Unknown fields are ignored (OpenAI clients send many), but fields that would change the answer
and that loraplex does not implement (``best_of > 1``, ``suffix``, ``logit_bias``) are
refused with a 422 naming the field, never silently dropped. Their schemas say so (``const``/``maxItems``), so the OpenAPI contract matches.

Sampling follows OpenAI, not TGI: ``temperature`` defaults to 1 (sampling); ``temperature: 0``
is greedy decoding.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from server.api.compose_schemas import AdapterScale
from server.api.openai_tools import MAX_TOOLS, MessageToolCall, ToolChoice, ToolDef
from server.api.schemas import MAX_STOP_CHARS, MAX_STOP_SEQUENCES, StopSequence
from server.engine.sampling import SamplingParams

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_CHOICES = 8  # most choices (n) in one request
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs (OpenAI's limit)
MAX_COMPLETION_LOGPROBS = 5  # completions' logprobs (OpenAI's limit)
MAX_BATCH_ROWS = 64  # most prompts x n in one /v1/completions request (each is a row of one batch)


def _refuse(message: str):
    """A wrap validator: values the schema allows pass, others get ``message`` (not pydantic's)."""

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValueError as exc:
            raise ValueError(message) from exc

    return check


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class ResponseFormatText(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]

    def output_schema(self) -> None:
        return None


class ResponseFormatJsonObject(BaseModel):
    """JSON mode: the output is one JSON object."""

    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["json_object"]

    def output_schema(self) -> dict[str, Any] | None:
        return None  # any JSON object


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)

    name: str | None = Field(None, description="The schema's name (OpenAI requires one; loraplex does not).")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(
        None,
        alias="schema",
        description="The JSON schema the output validates against; null: any JSON object.",
    )
    strict: bool | None = Field(None, description="Accepted; the schema is always enforced.")


class ResponseFormatJsonSchema(BaseModel):
    """Structured output: the output is JSON valid against ``json_schema.schema``."""

    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec

    def output_schema(self) -> dict[str, Any] | None:
        return self.json_schema.schema_


OpenAIResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema, Field(discriminator="type")
]


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # JSON types as the schema states them

    model: str = Field(..., description="An adapter id, or the base model's name for no adapter.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    temperature: float | None = Field(None, ge=0, le=2, description="0: greedy; default 1.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass.")
    stop: StopSequence | Annotated[list[StopSequence], Field(max_length=MAX_STOP_SEQUENCES)] | None = Field(
        None, description="Stop sequences (at most 16, each 1-512 characters), excluded from the text."
    )
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Same seed, same output.")
    n: int | None = Field(1, ge=1, le=MAX_CHOICES, description="Choices to generate (seed + i for choice i).")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    frequency_penalty: float | None = Field(
        None, ge=-2, le=2, description="logit -= f × count in the output."
    )
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="logit -= p if in the output.")
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description="Not supported: {} or null.")
    adapter_scale: AdapterScale = 1.0  # loraplex's extra body field (openai SDK: extra_body)
    ignore_eos: bool = Field(False, description="vLLM's extra field: keep generating past EOS (benchmarks).")
    response_format: OpenAIResponseFormat | None = Field(
        None,
        description="`text` (or null): free text; `json_object`: a JSON object; `json_schema`: JSON valid "
        "against `json_schema.schema`.",
    )

    _logit_bias = field_validator("logit_bias", mode="wrap")(
        _refuse("is not supported by loraplex; leave it out")
    )

    @property
    def choices(self) -> int:
        return self.n or 1

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop sequences may be at most {MAX_STOP_CHARS} characters long")
        return stops

    @property
    def stops(self) -> list[str]:
        return self.stop if isinstance(self.stop, list) else []

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def sampling(self, max_new_tokens: int, choice: int = 0) -> SamplingParams:
        """The engine's parameters for choice ``choice`` (seed + choice when a seed is given)."""
        temperature = 1.0 if self.temperature is None else self.temperature
        seed = None if self.seed is None else (self.seed + choice) % 2**63
        extra = {"frequency_penalty": self.frequency_penalty, "presence_penalty": self.presence_penalty,
                 "ignore_eos": self.ignore_eos}  # fmt: skip
        if temperature == 0:
            return SamplingParams(max_new_tokens=max_new_tokens, seed=seed, stop=tuple(self.stops), **extra)
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=None if temperature == 1.0 else temperature,
            top_p=None if self.top_p in (None, 1.0) else self.top_p,
            seed=seed,
            stop=tuple(self.stops),
            **extra,
        )


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_OpenAIRequest):
    prompt: Prompt = Field(
        ...,
        description="Text, token ids, or a list of either (a batch: one choice per prompt x n, decoded together).",
    )
    max_tokens: int | None = Field(
        None, ge=0, description="Most tokens to generate; 0 with echo: score the prompt."
    )
    echo: bool | None = Field(False, description="Prepend the prompt to the text (and its logprobs).")
    suffix: Literal[""] | None = Field(None, description="Insertion is not supported: null or empty.")
    best_of: Literal[1] | None = Field(None, description="Only 1; use n for several choices.")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_COMPLETION_LOGPROBS, description="Log-probabilities of the tokens and the top N."
    )

    _suffix = field_validator("suffix", mode="wrap")(_refuse("suffix (insertion) is not supported"))
    _best_of = field_validator("best_of", mode="wrap")(_refuse("best_of > 1 is not supported; use n"))

    @model_validator(mode="after")
    def _check_batch(self) -> CompletionRequest:
        prompts = self.prompts()
        if len(prompts) * self.choices > MAX_BATCH_ROWS:
            raise ValueError(
                f"{len(prompts)} prompts x n={self.choices} make more than {MAX_BATCH_ROWS} choices; "
                "split the prompts over several requests"
            )
        if self.max_tokens == 0 and not self.echo:
            raise ValueError(
                "max_tokens 0 generates nothing: use it with echo (to score the prompt), or ask for >= 1"
            )
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts (text, or token ids), in order: a single prompt is a batch of one."""
        prompt: Any = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            return list(prompt)
        return [prompt]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = Field(None, description="An assistant message's calls.")
    tool_call_id: str | None = Field(None, description="A tool message: the call it answers.")

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates expect it (``developer`` is OpenAI's new name for ``system``)."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        message: dict[str, Any] = {"role": role, "content": content or ""}
        if self.name:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens.")
    logprobs: bool | None = Field(None, description="Return each token's log-probability.")
    top_logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="Also the N most likely tokens at each step (implies logprobs).",
    )
    tools: list[ToolDef] | None = Field(
        None, max_length=MAX_TOOLS, description="Functions the model may call (see server.api.openai_tools)."
    )
    tool_choice: ToolChoice | None = Field(
        None, description='"none", "auto" (the default with tools), "required", or a named function.'
    )
    parallel_tool_calls: bool | None = Field(
        None, description="Allow several calls in one reply (default true)."
    )

    @property
    def wants_logprobs(self) -> bool:
        return bool(self.logprobs or self.top_logprobs)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens
