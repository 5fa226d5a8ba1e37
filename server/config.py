"""Server settings: every option is a CLI flag of `loraplex serve` and an env var LORAPLEX_<NAME>."""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Mode = Literal["unmerged", "merged", "auto"]
# settings that were replaced, with what to use instead
REPLACED = {
    "kernel": "grouped is --lora-backend grouped (or compiled-cpu), segmented is segmented, "
    "gather_bmm is gathered",
    "cpu_kernel": "auto is --lora-backend auto, off is --lora-backend grouped",
}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8080, ge=1, le=65535, description="Port to listen on.")
    model: str | None = Field(
        None,
        description="Local Hugging Face causal-LM directory; default: the embedded SmolLM2-135M-Instruct.",
    )
    adapter: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Adapters to register at start-up, as ID=PATH (repeatable; env: comma-separated).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto = float32 on CPU, bfloat16 on CUDA."
    )
    device: str = Field("auto", description="auto (CUDA when available), cpu, cuda, cuda:N.")
    mode: Mode = Field(
        "auto",
        description="unmerged (batched LoRA), merged (hot-swap, bit-exact restore) or auto (per step).",
    )
    switch_wait: float = Field(
        0.5, ge=0, description="Merged mode: seconds a request for another adapter waits."
    )
    max_batch: int = Field(32, ge=1, le=1024, description="Most requests decoded together.")
    max_input_tokens: int = Field(2048, ge=1, description="Longest prompt, in tokens.")
    max_total_tokens: int = Field(4096, ge=2, description="Prompt + new tokens, per request.")
    max_prefill_tokens: int = Field(4096, ge=1, description="Prompt tokens prefilled in one engine step.")
    max_loaded_adapters: int = Field(64, ge=1, description="Adapter slots in memory (LRU eviction).")
    max_rank: int = Field(256, ge=1, description="Largest LoRA rank accepted.")
    lora_backend: Literal["auto", "grouped", "compiled-cpu", "segmented", "gathered"] = Field(
        "auto",
        description="How unmerged adapters are applied (server/engine/lora/). auto: compiled-cpu on the CPU "
        "in float32 where it builds (C compiled on first use: a C compiler and AVX2/FMA), else grouped; "
        "grouped: PyTorch ops, each adapter on its own rows; segmented; gathered (per-row reference).",
    )
    runner: Literal["auto", "native", "hf"] = Field(
        "auto",
        description="Model runner: native (Llama, Mistral, Qwen2: fused projections, paged KV memory), "
        "hf (any Hugging Face causal LM), or auto (native where the model_type is supported).",
    )
    kv_cache_tokens: int | None = Field(
        None, ge=16, description="Native runner: KV memory in tokens, allocated at start-up."
    )
    kv_cache_memory: str | None = Field(
        None,
        description="Native runner: KV memory budget, e.g. 512MiB or 2GiB (a bare number is MiB); "
        "used when --kv-cache-tokens is not set. Default: 384MiB on the CPU, 90% of free GPU memory on CUDA.",
    )
    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Native runner: graph-captured decode. auto: CUDA graphs on CUDA, eager on the CPU "
        "(compiling measured no faster there); on: also torch.compile on the CPU (many minutes at start-up); off: eager.",
    )
    weight_layout: Literal["auto", "blocked", "packed", "dense"] = Field(
        "auto",
        description="Native runner: the weights' layout (CPU, float32, eager decode). blocked: the compiled "
        "linear kernel's blocks (streams the weights near memory bandwidth); packed: oneDNN's packed layout; "
        "dense: plain matrices; auto: blocked where the kernel builds, else packed where it applies.",
    )
    prefix_cache: Literal["on", "off"] = Field(
        "on",
        description="Native runner: reuse the KV blocks of a prompt prefix seen before (a chat's history), "
        "keyed by the adapter version and scale that computed them; off: prefill every prompt whole. "
        "The hf runner has no prefix cache.",
    )
    speculate: int = Field(
        4,
        ge=0,
        le=16,
        description="Native runner: speculative decoding by prompt lookup, the draft tokens proposed per "
        "row and step, at most (TGI's --speculate; each row drafts fewer while its drafts miss); 0: off. "
        "Outputs are the same as without (greedy: equal; sampling: the same distribution). The hf "
        "runner does not speculate.",
    )
    speculate_max_batch: int = Field(
        4,
        ge=1,
        description="With --speculate: no drafts in a step with more running rows than this (a large batch "
        "is no longer bound by reading the weights, so verifying drafts costs about what they save).",
    )
    adapter_source: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Where to fetch adapters that are not stored, s3://BUCKET/PREFIX (repeatable, searched "
        "in order; env: comma-separated); AWS credentials, region and AWS_ENDPOINT_URL as boto3 reads them.",
    )
    adapter_source_refresh: float = Field(
        0.0,
        ge=0,
        description="Seconds after which a fetched adapter's source is re-checked on use, a changed object "
        "served as a new version (0: never re-check).",
    )
    quantization: Literal["none", "int8", "int4", "gguf"] = Field(
        "none",
        description="Native runner, CPU: base weights int8 (per channel) or int4 (groups of 32), quantized "
        "at load; gguf: the GGUF file's blocks as shipped (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K). "
        "Adapters stay float32, unmerged; --mode merged is refused.",
    )
    quant_dot: Literal["int", "float"] = Field(
        "float",
        description="With --quantization: float (the default) keeps float32 inputs (the dequantized weights' "
        "exact products; two paths to the same logits agree to float32 rounding); int quantizes each "
        "projection's input rows to int8 blocks of 32 and multiplies with integer dot products (faster, as "
        "llama.cpp does, at a small cost in accuracy; near-tied greedy tokens can differ from float's and "
        "between two paths to the same logits, e.g. with and without the prefix cache). Both are checked at "
        "load; int falls back to float where its kernels cannot be used.",
    )
    data_dir: Path = Field(Path("./data"), description="Where adapters are stored (folders + SQLite index).")
    max_upload_mb: int = Field(
        512, ge=1, description="Largest adapter upload (request body and unpacked archive), MiB."
    )
    host_cache_mb: int = Field(
        1024,
        ge=0,
        description="Parsed adapters kept in host memory (LRU), MiB; adapters in use are always kept.",
    )
    cache_dir: Path = Field(Path("~/.cache/loraplex"), description="Converted embedded model and caches.")
    log_level: str = Field("info", description="debug, info, warning, error.")
    log_format: Literal["text", "json"] = Field(
        "text", description="text, or json: one JSON object per line, with the request id."
    )
    # Access and load control (server/api/security.py). Keys come from the environment only:
    # command-line flags would show them in `ps`.
    api_key: SecretStr | None = Field(
        None, description="Bearer token for generation and read routes (unset: open access)."
    )
    admin_key: SecretStr | None = Field(
        None,
        description="Bearer token for upload, replace, delete, shrink and /admin/* (also valid for reads).",
    )
    max_queue: int = Field(256, ge=1, description="Running + waiting requests before new ones get 429.")
    request_timeout: float | None = Field(
        None, gt=0, description="Seconds a generation request may take before it is cancelled (504)."
    )
    shutdown_timeout: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM: seconds running requests get to finish (new ones get 503) before exit.",
    )
    max_body_kb: int = Field(
        2048,
        ge=1,
        description="Largest request body on every route but uploads (those: --max-upload-mb), KiB; "
        "checked while the body arrives, before it is parsed (413).",
    )
    max_prompt_chars: int = Field(
        262144,
        ge=1,
        description="Longest prompt (or all chat messages together), in characters, checked before "
        "tokenizing (422).",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host names the server answers to besides loopback and --host, while the API key is "
        "unset (DNS rebinding); '*': any (env: comma-separated).",
    )
    upload_timeout: float = Field(
        300.0,
        gt=0,
        description="Seconds a client may take to send an upload's whole body before it is cut off (408).",
    )

    @model_validator(mode="before")
    @classmethod
    def _refuse_replaced_settings(cls, values: object) -> object:
        """``--kernel`` and ``--cpu-kernel`` (and their env vars) became ``--lora-backend``."""
        given = [name for name in REPLACED if isinstance(values, dict) and values.get(name) is not None]
        given += [name for name in REPLACED if f"LORAPLEX_{name.upper()}" in os.environ]
        if given:
            name = given[0]
            raise ValueError(
                f"--{name.replace('_', '-')} (LORAPLEX_{name.upper()}) was replaced by --lora-backend "
                f"(LORAPLEX_LORA_BACKEND): {REPLACED[name]}"
            )
        return values

    @model_validator(mode="after")
    def _check_quantized_mode(self) -> Settings:
        if self.quantization != "none" and self.mode == "merged":
            raise ValueError(
                f"--mode merged cannot be used with --quantization {self.quantization}: an adapter's s·B·A "
                "cannot be folded into quantized blocks and restored exactly; use --mode unmerged or auto "
                "(auto then stays unmerged)"
            )
        return self

    @field_validator("adapter", "adapter_source", "allowed_hosts", mode="before")
    @classmethod
    def _split_adapters(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("adapter_source")
    @classmethod
    def _check_sources(cls, value: list[str]) -> list[str]:
        from adapters.sources import S3Location  # imported only when sources are given

        return [S3Location.parse(uri).uri for uri in value] if value else value

    @field_validator("adapter")
    @classmethod
    def _check_adapter_specs(cls, value: list[str]) -> list[str]:
        for spec in value:
            adapter_id, sep, path = spec.partition("=")
            if not sep or not adapter_id or not path:
                raise ValueError(f"--adapter {spec!r} must look like ID=PATH")
        return value

    @field_validator("api_key", "admin_key", mode="before")
    @classmethod
    def _empty_key_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("kv_cache_memory")
    @classmethod
    def _check_memory(cls, value: str | None) -> str | None:
        if value is not None:
            parse_bytes(value)  # raises ValueError with the accepted forms
        return value

    @property
    def kv_cache_bytes(self) -> int | None:
        return parse_bytes(self.kv_cache_memory) if self.kv_cache_memory is not None else None

    @field_validator("cache_dir", "data_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    def adapter_specs(self) -> list[tuple[str, Path]]:
        return [(spec.partition("=")[0], Path(spec.partition("=")[2]).expanduser()) for spec in self.adapter]


_UNITS = {
    "": 1 << 20,
    "b": 1,
    "kb": 10**3,
    "kib": 1 << 10,
    "mb": 10**6,
    "mib": 1 << 20,
    "gb": 10**9,
    "gib": 1 << 30,
}


def parse_bytes(text: str) -> int:
    """``512MiB``, ``2GB``, ``1.5GiB`` or a bare number of MiB -> bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a memory size: write e.g. 512MiB, 2GiB, 800MB or a number of MiB")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"memory size {text!r} must be positive")
    return size


@lru_cache
def get_settings() -> Settings:
    return Settings()
