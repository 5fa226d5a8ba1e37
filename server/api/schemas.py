"""Request and response bodies of the HTTP API (the TGI/LoRAX shape for /generate)."""

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

from server.api.compose_schemas import AdapterScale, MergedAdapters
from server.engine.sampling import SamplingParams

MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 512  # longest stop sequence: each is matched against every token's text
MAX_TOP_N_TOKENS = 20  # most likely tokens reported per step (top_n_tokens, return_k_alternatives)
MAX_BEST_OF = 4  # candidates sampled for one request
StopSequence = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


def _only_null(what: str, hint: str) -> Any:
    """A wrap validator for a field that accepts only null (its schema says so), with a clear message."""

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> None:
        if value is not None:
            raise ValueError(f"{what} is not supported yet; {hint}")
        return handler(value)

    return check


class ResponseFormat(BaseModel):
    """LoRAX's ``response_format``: the output is JSON, valid against ``schema`` (see ``server.api.structured``)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    type: Literal["json_object"] = Field(..., description="`json_object`: the output is one JSON value.")
    schema_: dict[str, Any] | None = Field(
        None,
        alias="schema",
        description="A JSON schema the output must validate against; null: any JSON object.",
    )

    def output_schema(self) -> dict[str, Any] | None:
        return self.schema_


class GenerateParameters(BaseModel):
    """``parameters`` of the TGI/LoRAX request. Every field their clients send is accepted.

    Strict: JSON types as the schema states them (no 0 for false, no "5" for 5).
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    adapter_id: str | None = Field(None, description="Adapter to apply; null for the bare base model.")
    adapter_source: Literal["local", "s3", "hub"] | None = Field(
        None,
        description="Where the adapter comes from (LoRAX): `local` the server's store only; `s3` the "
        "server's --adapter-source S3 locations; null: the store, then those sources; `hub` is refused "
        "(no hub source).",
    )
    api_token: str | None = Field(None, description="LoRAX's token for private hub adapters; ignored.")
    merged_adapters: MergedAdapters | None = Field(
        None, description="Compose stored adapters for this request (LoRAX); instead of adapter_id."
    )
    adapter_scale: AdapterScale = 1.0
    response_format: ResponseFormat | None = Field(
        None, description="Structured output (LoRAX): JSON valid against a schema; null: free text."
    )
    grammar: None = Field(None, description="Constrained output (TGI); only null for now.")
    max_new_tokens: int | None = Field(
        64, ge=1, description="Most tokens to generate; null: as many as fit in --max-total-tokens."
    )
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float | None = Field(None, gt=0, le=100, description="Softmax temperature (> 0).")
    top_k: int | None = Field(None, gt=0, description="Keep the k most likely tokens.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass, in (0, 1].")
    typical_p: float | None = Field(None, gt=0, le=1, description="Typical decoding mass, in (0, 1].")
    repetition_penalty: float | None = Field(None, gt=0, le=100, description="CTRL repetition penalty (> 0).")
    frequency_penalty: float | None = Field(
        None,
        ge=-2,
        le=2,
        description="Subtracts penalty × count of the token in the output so far (OpenAI's).",
    )
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Random seed; same seed, same output.")
    stop: list[StopSequence] = Field(
        default_factory=list, max_length=MAX_STOP_SEQUENCES, description="Stop sequences (at most 16)."
    )
    details: bool = Field(False, description="Return per-token details.")
    decoder_input_details: bool | None = Field(
        None, description="Return the prompt's tokens and their log-probabilities in details.prefill."
    )
    top_n_tokens: int | None = Field(
        None, ge=0, le=MAX_TOP_N_TOKENS, description="Return the n most likely tokens at each step (TGI)."
    )
    return_k_alternatives: int | None = Field(
        None, ge=0, le=MAX_TOP_N_TOKENS, description="Return k alternatives with each token (LoRAX)."
    )
    best_of: int | None = Field(
        None,
        ge=1,
        le=MAX_BEST_OF,
        description="Sample this many candidates and return the one with the highest mean token "
        "log-probability (the others in details.best_of_sequences); > 1 turns sampling on.",
    )
    ignore_eos: bool = Field(False, description="Keep generating past EOS (benchmarks).")
    ignore_eos_token: bool = Field(False, description="LoRAX's name for ignore_eos.")
    return_full_text: bool | None = Field(None, description="Prepend the prompt to generated_text.")
    truncate: int | None = Field(None, ge=1, description="Keep only the last N prompt tokens.")
    watermark: Literal[False] | None = Field(
        None, description="Watermarking is not supported: false or null."
    )

    _grammar = field_validator("grammar", mode="wrap")(
        _only_null("grammar (constrained output)", "send null.")
    )

    @field_validator("watermark", mode="wrap")
    @classmethod
    def _no_watermark(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if value is not None and value is not False:  # 0 == False: a Literal alone would take 0
            raise ValueError("watermark is not supported by loraplex; send false or leave it out.")
        return handler(value)

    @model_validator(mode="after")
    def _one_adapter_source(self) -> GenerateParameters:
        if self.adapter_id is not None and self.merged_adapters is not None:
            raise ValueError("give adapter_id or merged_adapters, not both (as LoRAX requires).")
        return self

    @property
    def candidates(self) -> int:
        return self.best_of or 1

    @property
    def top_n(self) -> int:
        """Most likely tokens to compute per step, for top_n_tokens and return_k_alternatives."""
        return max(self.top_n_tokens or 0, self.return_k_alternatives or 0)

    def sampling(self, max_new_tokens: int | None = None, candidate: int = 0) -> SamplingParams:
        """The engine's parameters; ``candidate`` i of best_of uses seed + i (when a seed is given)."""
        seed = self.seed
        if seed is not None and candidate:
            seed = (seed + candidate) % 2**63
        return SamplingParams(
            max_new_tokens=max_new_tokens or self.max_new_tokens or 1,
            do_sample=self.do_sample or self.candidates > 1,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            typical_p=self.typical_p,
            repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=seed,
            stop=tuple(self.stop),
            ignore_eos=self.ignore_eos or self.ignore_eos_token,
        )


class StreamParameters(GenerateParameters):
    """A stream carries one sequence: best_of is 1 (or null)."""

    best_of: Literal[1] | None = Field(None, description="Only 1: a stream carries one sequence.")

    @field_validator("best_of", mode="wrap")
    @classmethod
    def _one(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if value not in (None, 1):
            raise ValueError("best_of > 1 cannot be streamed; use a non-streamed request.")
        return handler(value)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    inputs: str = Field(..., min_length=1, description="The prompt, used as given (no chat template).")
    parameters: GenerateParameters | None = Field(None, description="Generation parameters; null: defaults.")
    stream: bool | None = Field(
        None, description="Ignored here (TGI clients send it); POST / dispatches on it."
    )

    @property
    def params(self) -> GenerateParameters:
        return self.parameters or GenerateParameters()


class GenerateStreamRequest(GenerateRequest):
    parameters: StreamParameters | None = Field(None, description="Generation parameters; null: defaults.")

    @property
    def params(self) -> StreamParameters:
        return self.parameters or StreamParameters()


class AlternativeToken(BaseModel):
    id: int
    text: str
    logprob: float


class TopToken(AlternativeToken):
    special: bool


class Token(TopToken):
    alternative_tokens: list[AlternativeToken] | None = Field(
        None, description="With return_k_alternatives (LoRAX): the k most likely tokens at this step."
    )


class InputToken(BaseModel):
    id: int
    text: str
    logprob: float | None = Field(..., description="log p(token | tokens before); null for the first.")


class BestOfSequence(BaseModel):
    generated_text: str
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None
    prefill: list[InputToken]
    tokens: list[Token]
    top_tokens: list[list[TopToken]] | None = None


class Details(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    prompt_tokens: int
    cached_tokens: int = Field(
        0, description="Prompt tokens whose KV came from the prefix cache (not prefilled)."
    )
    generated_tokens: int
    seed: int | None
    adapter_id: str | None
    prefill: list[InputToken] = Field(description="The prompt's tokens, with decoder_input_details.")
    tokens: list[Token] = Field(description="The generated tokens, with details.")
    top_tokens: list[list[TopToken]] | None = Field(None, description="With top_n_tokens: per step.")
    best_of_sequences: list[BestOfSequence] | None = Field(None, description="With best_of > 1.")


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details


class StreamDetails(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    prompt_tokens: int
    cached_tokens: int = Field(
        0, description="Prompt tokens whose KV came from the prefix cache (not prefilled)."
    )
    generated_tokens: int
    seed: int | None
    adapter_id: str | None
    prefill: list[InputToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)


class StreamResponse(BaseModel):
    token: Token
    top_tokens: list[TopToken] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None


class ErrorResponse(BaseModel):
    error: str
    error_type: str
