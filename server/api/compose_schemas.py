"""Request bodies of adapter composition: LoRAX's ``parameters.merged_adapters`` and
``POST /adapters/compose``, and the per-request ``adapter_scale`` field.

The semantics of each strategy are in ``adapters/compose.py``. What a schema cannot state is
checked by the composition itself (``adapters.compose.check_composition``): one weight per id,
density above 0 for ties / DARE, ranks that ties / DARE can combine.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from adapters.compose import MAX_SOURCES, CompositionSpec
from adapters.store import ADAPTER_ID_RE

MAX_ADAPTER_SCALE = 10.0  # |adapter_scale| at most this
MAX_WEIGHT = 100.0  # |weight| of a composed adapter at most this

AdapterScale = Annotated[
    float,
    Field(
        ge=-MAX_ADAPTER_SCALE,
        le=MAX_ADAPTER_SCALE,
        description="Factor on the adapter's update for this request: ΔW → scale·ΔW (0: the base model, "
        "1: the adapter, the default). Applied per row, without another adapter slot.",
    ),
]
Weight = Annotated[float, Field(ge=-MAX_WEIGHT, le=MAX_WEIGHT)]
StoredId = Annotated[str, Field(pattern=ADAPTER_ID_RE.pattern)]
MergeStrategy = Literal["linear", "ties", "dare_linear", "dare_ties"]
SignMethod = Literal["total", "frequency"]

_STRATEGY_HELP = (
    "linear: ΔW = Σ wᵢ·ΔWᵢ exactly (factors concatenated, rank Σ rᵢ); ties, dare_linear, dare_ties: PEFT's "
    "add_weighted_adapter on the LoRA factors (every adapter the same rank per module)."
)


class MergedAdapters(BaseModel):
    """LoRAX's ``merged_adapters``: compose stored adapters for this request (cached per composition)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    ids: list[str] = Field(..., min_length=1, max_length=MAX_SOURCES, description="Stored adapter ids.")
    weights: list[Weight] = Field(
        ..., min_length=1, max_length=MAX_SOURCES, description="One weight per id, in [-100, 100]."
    )
    merge_strategy: MergeStrategy | None = Field(None, description=f"null: linear. {_STRATEGY_HELP}")
    density: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Fraction of entries ties and DARE keep, in (0, 1] for them; linear ignores it.",
    )
    majority_sign_method: SignMethod | None = Field(
        None, description="ties and dare_ties: elect each entry's sign by the sum (total, null) or the count."
    )

    def spec(self) -> CompositionSpec:
        return CompositionSpec(
            strategy=self.merge_strategy or "linear",
            density=self.density,
            majority_sign_method=self.majority_sign_method or "total",
        )


class ComposeSource(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    id: StoredId = Field(..., description="A stored adapter id.")
    weight: Weight = Field(1.0, description="Its weight, in [-100, 100].")


class ComposeBody(BaseModel):
    """``POST /adapters/compose``: store a composition as a regular PEFT adapter."""

    model_config = ConfigDict(extra="forbid", strict=True)

    sources: list[ComposeSource] = Field(..., min_length=1, max_length=MAX_SOURCES)
    strategy: MergeStrategy = Field("linear", description=_STRATEGY_HELP)
    density: float = Field(1.0, ge=0, le=1, description="ties / DARE: fraction of entries kept, in (0, 1].")
    majority_sign_method: SignMethod = Field("total", description="ties / dare_ties: sign election.")
    new_id: StoredId = Field(..., description="Id of the new adapter (1-64 of A-Z a-z 0-9 . _ -).")
    rank: int | None = Field(
        None,
        ge=1,
        description="Recompress: truncate each module's ΔW to this rank (exact SVD) and report the relative "
        "error per module; null: store the composition as it is.",
    )

    def spec(self) -> CompositionSpec:
        return CompositionSpec(self.strategy, self.density, self.majority_sign_method)
