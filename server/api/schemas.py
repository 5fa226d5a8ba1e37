"""Request and response bodies of the HTTP API (the TGI/LoRAX shape for /generate)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.engine.sampling import SamplingParams

MAX_STOP_SEQUENCES = 16


class GenerateParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter_id: str | None = Field(None, description="Adapter to apply; null for the bare base model.")
    max_new_tokens: int = Field(64, ge=1, description="Most tokens to generate.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float | None = Field(None, gt=0, le=100, description="Softmax temperature (> 0).")
    top_k: int | None = Field(None, gt=0, description="Keep the k most likely tokens.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass, in (0, 1].")
    repetition_penalty: float | None = Field(None, gt=0, le=100, description="CTRL repetition penalty (> 0).")
    seed: int | None = Field(None, ge=0, lt=2**63, description="Random seed; same seed, same output.")
    stop: list[str] = Field(default_factory=list, description="Stop sequences (at most 16).")
    details: bool = Field(False, description="Return per-token details.")
    ignore_eos: bool = Field(False, description="Keep generating past EOS (benchmarks).")
    # Accepted for TGI/LoRAX client compatibility; loraplex ignores them.
    adapter_source: str | None = None
    return_full_text: bool | None = None
    decoder_input_details: bool | None = None
    watermark: bool | None = None
    truncate: int | None = None
    typical_p: float | None = None
    best_of: int | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: list[str]) -> list[str]:
        if len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(value)}")
        if any(not s for s in value):
            raise ValueError("stop sequences must be non-empty strings")
        return value

    @field_validator("best_of")
    @classmethod
    def _check_best_of(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("best_of > 1 is not supported; send separate requests")
        return value

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=tuple(self.stop),
            ignore_eos=self.ignore_eos,
        )


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: str = Field(..., description="The prompt, used as given (no chat template).")
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool | None = None  # TGI clients may send it; /generate_stream is the streaming route


class Token(BaseModel):
    id: int
    text: str
    logprob: float
    special: bool


class Details(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    prompt_tokens: int
    generated_tokens: int
    seed: int | None
    adapter_id: str | None
    tokens: list[Token] | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details


class StreamResponse(BaseModel):
    token: Token
    generated_text: str | None = None
    details: Details | None = None


class ErrorResponse(BaseModel):
    error: str
    error_type: str
