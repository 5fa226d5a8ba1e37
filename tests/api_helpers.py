"""Run the real FastAPI app in-process on a given model (tiny or embedded)."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from server.engine.base_model import LoadedBase


def loaded_base(
    model: torch.nn.Module, tokenizer, name: str = "tiny-llama", path: Path | None = None
) -> LoadedBase:
    """A LoadedBase around a copy of ``model``; ``path`` is its checkpoint dir, if it has one."""
    return LoadedBase(
        model=copy.deepcopy(model),
        tokenizer=tokenizer,
        name=name,
        path=path or Path("/nonexistent/" + name),
        dtype=torch.float32,
        device=torch.device("cpu"),
    )


def start_client(
    model: torch.nn.Module, tokenizer, tmp_path: Path, *, model_path: Path | None = None, **settings
) -> TestClient:
    """A TestClient whose app runs its lifespan (engine thread) and is ready (/health 200)."""
    settings.setdefault("data_dir", tmp_path / "data")
    settings.setdefault("cache_dir", tmp_path / "cache")
    app = create_app(Settings(**settings), loader=lambda _: loaded_base(model, tokenizer, path=model_path))
    client = TestClient(app)
    client.__enter__()
    deadline = time.monotonic() + 60
    while client.get("/health").status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not ready: {client.get('/health').json()}")
        time.sleep(0.05)
    return client
