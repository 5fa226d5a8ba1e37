"""Request bodies of the OpenAI-compatible routes, and their translation to ``SamplingParams``.

Unknown fields are ignored (OpenAI clients send many), but fields that would change the answer
and that loraplex does not implement (``n > 1``, ``logprobs``, ``echo``, tools, penalties...)
are refused with a 422 naming the field, never silently dropped.

Sampling follows OpenAI, not TGI: ``temperature`` defaults to 1 (sampling); ``temperature: 0``
is greedy decoding.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.api.schemas import MAX_STOP_SEQUENCES
from server.engine.sampling import SamplingParams

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(..., description="An adapter id, or the base model's name for no adapter.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    temperature: float | None = Field(None, ge=0, le=2, description="0: greedy; default 1.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass.")
    stop: str | list[str] | None = Field(None, description="Stop sequences, excluded from the text.")
    seed: int | None = Field(None, ge=0, lt=2**63, description="Same seed, same output.")
    n: int = Field(1, description="Only 1 is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError(
                f"only n=1 is supported, got {value}; send {value} requests (with different seeds)"
            )
        return value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value not in (None, 0, 0.0):
            raise ValueError("is not supported by loraplex; leave it out or send 0")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("is not supported by loraplex; leave it out")
        return value

    @property
    def stops(self) -> list[str]:
        return self.stop if isinstance(self.stop, list) else []

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def sampling(self, max_new_tokens: int) -> SamplingParams:
        temperature = 1.0 if self.temperature is None else self.temperature
        if temperature == 0:
            return SamplingParams(max_new_tokens=max_new_tokens, seed=self.seed, stop=tuple(self.stops))
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=None if temperature == 1.0 else temperature,
            top_p=None if self.top_p in (None, 1.0) else self.top_p,
            seed=self.seed,
            stop=tuple(self.stops),
        )


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_OpenAIRequest):
    prompt: Prompt = Field(..., description="One prompt: text, or token ids.")
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo=true is not supported; prepend the prompt yourself")
        if self.suffix:
            raise ValueError("suffix (insertion) is not supported")
        if self.best_of not in (None, 1):
            raise ValueError("best_of > 1 is not supported")
        if self.logprobs is not None:
            raise ValueError(
                "logprobs is not supported on /v1/completions; use POST /generate with details=true"
            )
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) and len(prompt) != 1:
            raise ValueError(f"one prompt per request is supported, got {len(prompt)}; send one request each")
        return self

    def single_prompt(self) -> str | list[int]:
        """The prompt as text, or as token ids."""
        prompt: Any = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        return prompt


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def template_dict(self) -> dict[str, str]:
        """The message as chat templates expect it (``developer`` is OpenAI's new name for ``system``)."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        message = {"role": role, "content": content or ""}
        if self.name:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens.")
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> ChatCompletionRequest:
        if self.logprobs or self.top_logprobs:
            raise ValueError(
                "logprobs is not supported on /v1/chat/completions; use POST /generate with details=true"
            )
        if self.tools:
            raise ValueError("tools (function calling) are not supported")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError("response_format other than text is not supported")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens
