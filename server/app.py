"""create_app(): the FastAPI application; its lifespan loads the model and starts the engine.

Loading runs in a background thread so the server answers at once: ``/health`` says 503
until the engine runs, then 200.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from adapters.peft_format import load_adapter_dir
from adapters.registry import AdapterRegistry
from server import __version__
from server.api import generate, health
from server.api.errors import install_error_handlers
from server.config import Settings
from server.engine.base_model import LoadedBase, load_base
from server.engine.engine import Engine, EngineConfig

log = logging.getLogger(__name__)

BaseLoader = Callable[[Settings], LoadedBase]


def default_loader(settings: Settings) -> LoadedBase:
    return load_base(settings.model, settings.dtype, settings.device, settings.cache_dir)


def engine_config(settings: Settings, base: LoadedBase) -> EngineConfig:
    model_max = getattr(base.model.config, "max_position_embeddings", None) or settings.max_total_tokens
    max_total = min(settings.max_total_tokens, int(model_max))
    return EngineConfig(
        max_batch=settings.max_batch,
        max_input_tokens=min(settings.max_input_tokens, max_total - 1),
        max_total_tokens=max_total,
        max_loaded_adapters=settings.max_loaded_adapters,
        max_prefill_tokens=settings.max_prefill_tokens,
        kernel=settings.kernel,
    )


def build_engine(settings: Settings, base: LoadedBase, registry: AdapterRegistry) -> Engine:
    """Wrap the model for LoRA, register the start-up adapters, start the engine thread."""
    if settings.mode != "unmerged":
        raise ValueError(f"--mode {settings.mode} is not implemented yet; use --mode unmerged.")
    engine = Engine(base.model, base.tokenizer, engine_config(settings, base))
    for adapter_id, path in settings.adapter_specs():
        adapter = load_adapter_dir(path, adapter_id, engine.base_shapes, max_rank=settings.max_rank)
        registry.add(adapter)
        log.info("adapter %s loaded from %s (rank %d, %d layers)", adapter_id, path, adapter.max_rank,
                 len(adapter.layers))
    engine.start()
    return engine


def create_app(settings: Settings | None = None, loader: BaseLoader = default_loader) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.registry = AdapterRegistry()
        app.state.engine = None
        app.state.load_error = None

        def load() -> None:
            try:
                base = loader(settings)
                app.state.base = base
                app.state.engine = build_engine(settings, base, app.state.registry)
                log.info("ready: %s on %s (%s)", base.name, base.device, str(base.dtype))
            except Exception as exc:
                app.state.load_error = str(exc)
                log.exception("start-up failed")

        loading = asyncio.create_task(asyncio.to_thread(load))
        app.state.loading = loading
        try:
            yield
        finally:
            await asyncio.gather(loading, return_exceptions=True)
            if app.state.engine is not None:
                app.state.engine.shutdown()

    app = FastAPI(title="loraplex", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(generate.router)
    return app
