"""Run the real FastAPI app in-process on a given model (tiny or embedded)."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from server.engine.base_model import LoadedBase, load_native


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


def native_loader(model_path: Path):
    """A loader that runs the checkpoint in ``model_path`` on the native runner (float32, CPU)."""

    def load(settings: Settings) -> LoadedBase:
        return load_native(
            str(model_path), "float32", "cpu", settings.cache_dir, lora_backend=settings.lora_backend,
            kv_cache_tokens=settings.kv_cache_tokens, max_batch=settings.max_batch,
            max_seq_len=settings.max_total_tokens,
        )  # fmt: skip

    return load


def start_client(
    model: torch.nn.Module,
    tokenizer,
    tmp_path: Path,
    *,
    model_path: Path | None = None,
    runner: str = "hf",
    **settings,
) -> TestClient:
    """A TestClient whose app runs its lifespan (engine thread) and is ready (/health 200).

    ``runner="native"`` serves ``model_path`` on the native runner instead of a copy of ``model``.
    """
    settings.setdefault("data_dir", tmp_path / "data")
    settings.setdefault("cache_dir", tmp_path / "cache")
    if runner == "native":
        assert model_path is not None, "the native runner loads a checkpoint directory"
        loader = native_loader(model_path)
    else:
        loader = lambda _: loaded_base(model, tokenizer, path=model_path)  # noqa: E731
    app = create_app(Settings(**settings), loader=loader)
    client = TestClient(app, base_url="http://localhost")  # a loopback Host (--allowed-hosts)
    client.__enter__()
    deadline = time.monotonic() + 60
    while client.get("/health").status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not ready: {client.get('/health').json()}")
        time.sleep(0.05)
    return client
