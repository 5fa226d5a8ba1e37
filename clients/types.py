"""Typed results of the client's methods, built from the server's JSON.

Fields the server adds later are ignored (each result keeps the whole JSON in ``raw``), so an
older client keeps working against a newer server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    logprob: float
    special: bool

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Token:
        return cls(
            id=int(data["id"]),
            text=data["text"],
            logprob=float(data["logprob"]),
            special=bool(data["special"]),
        )


@dataclass(frozen=True)
class GenerateResult:
    generated_text: str
    finish_reason: str  # "length" | "eos_token" | "stop_sequence"
    prompt_tokens: int
    generated_tokens: int
    seed: int | None
    adapter_id: str | None
    tokens: list[Token] | None = None  # only with details=True
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GenerateResult:
        details = data.get("details") or {}
        tokens = details.get("tokens")
        return cls(
            generated_text=data["generated_text"],
            finish_reason=details.get("finish_reason", ""),
            prompt_tokens=int(details.get("prompt_tokens", 0)),
            generated_tokens=int(details.get("generated_tokens", 0)),
            seed=details.get("seed"),
            adapter_id=details.get("adapter_id"),
            tokens=[Token.from_json(t) for t in tokens] if tokens else None,  # [] when not asked for
            raw=data,
        )


@dataclass(frozen=True)
class AdapterSummary:
    id: str
    rank: int
    lora_alpha: float
    use_rslora: bool
    target_modules: list[str] | str
    layers: int  # adapted modules
    parameters: int
    bytes: int
    sha256: str
    created_at: str
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AdapterSummary:
        return cls(
            id=data["id"],
            rank=int(data["rank"]),
            lora_alpha=float(data["lora_alpha"]),
            use_rslora=bool(data["use_rslora"]),
            target_modules=data["target_modules"],
            layers=int(data["layers"]),
            parameters=int(data["parameters"]),
            bytes=int(data["bytes"]),
            sha256=data["sha256"],
            created_at=data["created_at"],
            raw=data,
        )


@dataclass(frozen=True)
class Analysis:
    """``GET /adapters/{id}/analysis``: a summary and one entry per adapted module (docs/analysis.md)."""

    adapter_id: str
    rank: int
    lora_alpha: float
    summary: dict[str, Any]
    layers: list[dict[str, Any]]
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Analysis:
        return cls(
            adapter_id=data["adapter_id"],
            rank=int(data["rank"]),
            lora_alpha=float(data["lora_alpha"]),
            summary=data.get("summary", {}),
            layers=data.get("layers", []),
            raw=data,
        )


@dataclass(frozen=True)
class Comparison:
    """``GET /adapters/compare``: subspace similarity per shared module, and a summary."""

    a: str
    b: str
    summary: dict[str, Any]
    layers: list[dict[str, Any]]
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Comparison:
        return cls(
            a=data["a"],
            b=data["b"],
            summary=data.get("summary", {}),
            layers=data.get("layers", data.get("modules", [])),
            raw=data,
        )


@dataclass(frozen=True)
class ShrinkResult:
    """``POST /adapters/{id}/shrink``: the new adapter's summary, and under ``shrink`` per layer
    the kept rank and the Frobenius fraction retained."""

    adapter: AdapterSummary
    layers: list[dict[str, Any]]  # per module: module, original_rank, kept_rank, fro_retained
    fro_retained: float | None  # over the whole adapter
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShrinkResult:
        details = data.get("shrink") if isinstance(data.get("shrink"), dict) else {}
        retained = details.get("fro_retained")
        return cls(
            adapter=AdapterSummary.from_json(data),
            layers=details.get("layers", []),
            fro_retained=float(retained) if retained is not None else None,
            raw=data,
        )
