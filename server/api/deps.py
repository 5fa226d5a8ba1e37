"""FastAPI dependencies: the objects the lifespan put on ``app.state``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from adapters.registry import AdapterRegistry
from server.api.errors import ApiError
from server.config import Settings
from server.engine.base_model import LoadedBase
from server.engine.engine import Engine


def get_engine(request: Request) -> Engine:
    engine = getattr(request.app.state, "engine", None)
    if engine is None or not engine.running:
        raise ApiError(503, "the model is still loading; retry in a few seconds.", "not_ready")
    return engine


def get_registry(request: Request) -> AdapterRegistry:
    return request.app.state.registry


def get_base(request: Request) -> LoadedBase:
    return request.app.state.base


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


EngineDep = Annotated[Engine, Depends(get_engine)]
RegistryDep = Annotated[AdapterRegistry, Depends(get_registry)]
BaseDep = Annotated[LoadedBase, Depends(get_base)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
