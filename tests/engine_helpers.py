"""Helpers to drive an Engine synchronously in tests (no thread, no HTTP)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from adapters.peft_format import LoraAdapter
from server.engine.engine import Engine
from server.engine.requests import ErrorEvent, Event, FinishEvent, GenerationRequest, TokenEvent
from server.engine.sampling import SamplingParams


@dataclass
class Outcome:
    tokens: list[int]
    finish: FinishEvent | None
    error: ErrorEvent | None


def submit(
    engine: Engine, prompt_ids: list[int], adapter: LoraAdapter | None = None, **params
) -> tuple[GenerationRequest, list[Event]]:
    params.setdefault("max_new_tokens", 8)
    events: list[Event] = []
    request = GenerationRequest(
        prompt_ids=list(prompt_ids), params=SamplingParams(**params), adapter=adapter, sink=events.append
    )
    engine.submit(request)
    return request, events


def outcome(events: list[Event]) -> Outcome:
    finish = next((e for e in events if isinstance(e, FinishEvent)), None)
    error = next((e for e in events if isinstance(e, ErrorEvent)), None)
    return Outcome([e.id for e in events if isinstance(e, TokenEvent)], finish, error)


def run_one(engine: Engine, prompt_ids: list[int], adapter: LoraAdapter | None = None, **params) -> Outcome:
    _, events = submit(engine, prompt_ids, adapter, **params)
    engine.run_until_idle()
    return outcome(events)


def run_many(engine: Engine, jobs: list[tuple[list[int], LoraAdapter | None]], **params) -> list[Outcome]:
    pending = [submit(engine, ids, adapter, **params)[1] for ids, adapter in jobs]
    engine.run_until_idle()
    return [outcome(events) for events in pending]


def verify_base_now(engine: Engine) -> dict[str, Any]:
    """``Engine.verify_base`` for tests that drive the engine themselves (no thread)."""
    future = engine.verify_base()
    engine.run_until_idle()
    return future.result(timeout=0)
