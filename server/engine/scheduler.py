"""Serving-mode decisions: which requests may join the batch, and which adapter is merged.

* ``unmerged``: everything may join; adapters are applied per row (LoRA layers).
* ``merged``: one adapter (or none) is folded into the weights; only its requests join. When
  requests for another adapter wait, the merged one stops taking new rows once the oldest of
  them has waited ``switch_wait`` seconds (or nothing else is waiting); the batch drains, then
  the engine swaps to the adapter of the oldest waiting request. Every request therefore waits
  at most ``switch_wait`` + one batch drain + one swap per adapter ahead of it: no starvation.
* ``auto``: unmerged by default; merged while every running and waiting request wants the same
  adapter. Merging is a bet that the traffic stays uniform, so it is placed like a ski rental:
  only after the traffic has been uniform for as long as a merge and the later unmerge cost
  (at least ``min_uniform_steps`` steps). Mixed traffic unmerges at once, since otherwise the
  other requests would wait.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

from server.engine.requests import GenerationRequest

AdapterKey = str | None  # adapter id@version (*scale when not 1), None for the bare base


def key_of(request: GenerationRequest) -> AdapterKey:
    """What the request needs merged to run as a base row: its adapter at its ``adapter_scale``."""
    served = request.served_adapter
    return served.key if served is not None else None


@dataclass
class MergedPlan:
    admit_key: AdapterKey  # requests with this key may join
    admit: bool  # False while a switch is pending (the batch drains)
    switch_to: GenerationRequest | None  # swap to this request's adapter now (batch is empty)


def plan_merged(
    waiting: Iterable[GenerationRequest], merged_key: AdapterKey, batch_empty: bool, switch_wait: float
) -> MergedPlan:
    """Merged mode: keep serving the merged adapter, or drain and switch (see module docstring)."""
    now = time.perf_counter()
    oldest_other: GenerationRequest | None = None
    any_matching = False
    for request in waiting:
        if key_of(request) == merged_key:
            any_matching = True
        elif oldest_other is None:
            oldest_other = request
    if oldest_other is None:
        return MergedPlan(merged_key, True, None)
    pending = not any_matching or now - oldest_other.submitted_at >= switch_wait
    if not pending:
        return MergedPlan(merged_key, True, None)
    if batch_empty:
        return MergedPlan(key_of(oldest_other), True, oldest_other)
    return MergedPlan(merged_key, False, None)


@dataclass
class AutoPolicy:
    """Auto mode's merge decision, with ski-rental hysteresis."""

    min_uniform_steps: int = 8
    uniform_steps: int = 0
    uniform_key: AdapterKey = None
    mean_step_seconds: float = 0.0

    def observe_step(self, seconds: float) -> None:
        """Feed the duration of an unmerged decode step (exponential moving average)."""
        self.mean_step_seconds = (
            seconds if self.mean_step_seconds == 0 else 0.9 * self.mean_step_seconds + 0.1 * seconds
        )

    def steps_needed(self, swap_seconds: float) -> int:
        """Uniform steps before merging: a merge plus the later unmerge, in step durations."""
        if self.mean_step_seconds <= 0:
            return self.min_uniform_steps
        return max(self.min_uniform_steps, math.ceil(2 * swap_seconds / self.mean_step_seconds))

    def decide(
        self, wanted: set[AdapterKey], merged_key: AdapterKey, swap_seconds: float
    ) -> AdapterKey | str:
        """Return the adapter key to have merged now (None: unmerged), or ``"keep"``."""
        if merged_key is not None:
            if wanted - {merged_key}:
                self.uniform_steps = 0
                return None
            return "keep"
        if len(wanted) != 1 or None in wanted:
            self.uniform_steps = 0  # mixed traffic, or base-only traffic (nothing to merge)
            return "keep"
        (key,) = wanted
        if key != self.uniform_key:
            self.uniform_key, self.uniform_steps = key, 0
        self.uniform_steps += 1
        if self.uniform_steps >= self.steps_needed(swap_seconds):
            return key
        return "keep"
