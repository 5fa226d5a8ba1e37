"""Model families the native runner serves, by ``config.json``'s ``model_type``.

A family is one module of this package that calls :func:`register` with a :class:`ModelFamily`:
how it reads its ``config.json`` into a :class:`NativeConfig`, the names of its checkpoint's
tensors (:class:`WeightNames`, which are also the PEFT module names its adapters use), and the
model class that runs it (``LlamaModel`` or a subclass with its own forward pass). Every module of
the package is imported here, so adding a family is adding one file (``llama.py`` is the pattern);
``--runner auto`` then picks the native runner for it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from server.engine.native.config import NativeConfig
from server.engine.native.model import LlamaModel, WeightNames


@dataclass(frozen=True)
class ModelFamily:
    model_type: str  # config.json's model_type
    read_config: Callable[[dict[str, Any]], NativeConfig]
    names: WeightNames = field(default_factory=WeightNames)
    model: type[LlamaModel] = LlamaModel


FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    if family.model_type in FAMILIES:
        raise ValueError(f"model family {family.model_type!r} is registered twice")
    FAMILIES[family.model_type] = family
    return family


def family_for(config: dict[str, Any]) -> ModelFamily:
    """The family of a ``config.json``; ValueError naming the served ones when there is none."""
    family = FAMILIES.get(str(config.get("model_type")))
    if family is None:
        raise ValueError(
            f"model_type {config.get('model_type')!r} is not one of {', '.join(supported_model_types())}"
        )
    return family


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(FAMILIES))


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
