"""create_app(): the FastAPI application; its lifespan opens the adapter store, loads the model
and starts the engine.

Loading runs in a background thread so the server answers at once: ``/health`` says 503
until the engine runs, then 200. The store (``--data-dir``) opens first, so stored adapters are
listed during loading; uploads wait for the base model (503) since validation needs its shapes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from adapters.archive import read_adapter_dir
from adapters.sources import AdapterSources
from adapters.store import AdapterStore
from adapters.torch_threads import confined_thread, in_passing_thread, one_thread_pool
from server import __version__
from server.api import (
    adapters,
    admin,
    analysis,
    composition,
    generate,
    health,
    openai,
    probe,
    prometheus,
    responses,
    tenants,
)
from server.api.drain import Drain, DrainMiddleware, refuse_while_draining
from server.api.errors import install_error_handlers
from server.api.load_control import QueueGate, TenantLimits
from server.api.middleware import RequestContextMiddleware
from server.api.openapi_contract import install_openapi_contract
from server.api.security import AccessMiddleware, app_tenants, authorizer, warn_if_open
from server.api.upload_limit import UploadLimitMiddleware
from server.config import Settings
from server.console import install_console
from server.engine import sgmv_cpu
from server.engine.base_model import LoadedBase, choose_runner, load_base, load_native, model_dir_of
from server.engine.describe import EngineSnapshot
from server.engine.engine import Engine, EngineConfig
from server.engine.native import quant_cpu
from server.metrics import Metrics

log = logging.getLogger(__name__)

BaseLoader = Callable[[Settings], LoadedBase]


def default_loader(settings: Settings) -> LoadedBase:
    """The native runner where the model's ``model_type`` allows it (``--runner``), else HF's code."""
    path, _ = model_dir_of(settings.model, settings.cache_dir)
    if choose_runner(settings.runner, path) == "native":
        return load_native(
            settings.model,
            settings.dtype,
            settings.device,
            settings.cache_dir,
            lora_backend=settings.lora_backend,
            kv_cache_tokens=settings.kv_cache_tokens,
            kv_cache_bytes=settings.kv_cache_bytes,
            max_batch=settings.max_batch,
            max_seq_len=settings.max_total_tokens,
            compile=settings.compile,
            weight_layout=settings.weight_layout,
            quantization=settings.quantization,
        )
    if settings.quantization != "none":
        raise ValueError(
            f"--quantization {settings.quantization} needs the native runner (Llama, Mistral, Qwen2); "
            "this model runs on --runner hf"
        )
    return load_base(settings.model, settings.dtype, settings.device, settings.cache_dir)


def engine_config(settings: Settings, base: LoadedBase) -> EngineConfig:
    model_max = base.max_positions or settings.max_total_tokens
    max_total = min(settings.max_total_tokens, int(model_max))
    return EngineConfig(
        max_batch=settings.max_batch,
        max_input_tokens=min(settings.max_input_tokens, max_total - 1),
        max_total_tokens=max_total,
        max_loaded_adapters=settings.max_loaded_adapters,
        max_prefill_tokens=settings.max_prefill_tokens,
        lora_backend=settings.lora_backend,
        mode=settings.mode,
        switch_wait=settings.switch_wait,
        checkpoint_dir=base.path if base.path.is_dir() else None,
        max_prompt_chars=settings.max_prompt_chars,
        prefix_cache=settings.prefix_cache == "on",
        speculate=settings.speculate,
        speculate_max_batch=settings.speculate_max_batch,
    )


def build_engine(settings: Settings, base: LoadedBase, store: AdapterStore) -> Engine:
    """Wrap the model for LoRA, register the start-up adapters, start the engine thread."""
    config = engine_config(settings, base)
    if base.runner is not None:
        engine = Engine(base.runner, base.tokenizer, config, base.eos_ids)
    else:
        assert base.model is not None
        engine = Engine.for_hf_model(base.model, base.tokenizer, config)
    if settings.prefix_cache == "on" and not engine.prefix_cache:
        log.info(
            "prefix caching is off: the %s runner does not support it (the native runner does)",
            engine.describe().runner.name,
        )
    if settings.speculate and not engine.speculate:
        log.info(
            "speculative decoding is off: the %s runner does not verify drafts", engine.describe().runner.name
        )
    store.bind_base(engine.base_shapes, settings.max_rank)
    store.on_retire(engine.retire)  # a replaced or deleted version leaves its slot (the one subscriber)
    register_startup_adapters(settings, store)
    engine.start()
    return engine


def register_startup_adapters(settings: Settings, store: AdapterStore) -> None:
    """``--adapter ID=PATH`` into the store: kept when identical, else replaced."""
    for adapter_id, path in settings.adapter_specs():
        files = read_adapter_dir(path, settings.max_upload_mb << 20)
        record = store.put(adapter_id, files, replace=True, keep_identical=True)
        log.info("adapter %s registered from %s as %s (rank %d, %d layers)", adapter_id, path,
                 record.version, record.rank, record.layers)  # fmt: skip


def open_sources(settings: Settings, store: AdapterStore) -> AdapterSources | None:
    """``--adapter-source``: the S3 locations searched for adapters the store lacks (None: none)."""
    if not settings.adapter_source:
        return None

    sources = AdapterSources.from_uris(
        store,
        settings.adapter_source,
        max_bytes=settings.max_upload_mb << 20,
        refresh_seconds=settings.adapter_source_refresh,
    )  # fmt: skip  (a refreshed adapter's old version is retired by the store's event)
    log.info("adapter sources, searched in order after %s: %s", settings.data_dir, ", ".join(sources.uris))
    return sources


def _tenant(app: FastAPI, tenant_id: str) -> object | None:
    """A tenant's current row (its quotas), None once deleted."""
    tenants = app_tenants(app)
    return tenants.get(tenant_id) if tenants is not None else None


def _engine_snapshot(app: FastAPI) -> EngineSnapshot | None:
    """``Engine.describe()`` for /metrics; None until the model is loaded."""
    engine = getattr(app.state, "engine", None)
    return engine.describe() if engine is not None else None


def create_app(settings: Settings | None = None, loader: BaseLoader = default_loader) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # the engine thread's OpenMP team must be the process's only one (adapters/torch_threads.py):
        # this loop's thread and the workers behind asyncio.to_thread run PyTorch on one thread
        asyncio.get_running_loop().set_default_executor(one_thread_pool(None, "loraplex-worker"))
        with confined_thread():
            async with _serving(app):
                yield

    @asynccontextmanager
    async def _serving(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        warn_if_open(settings)
        store = await asyncio.to_thread(
            AdapterStore, settings.data_dir, host_cache_bytes=settings.host_cache_mb << 20
        )
        app.state.store = app.state.registry = store
        app.state.sources = open_sources(settings, store)
        app.state.engine = None
        app.state.load_error = None

        def load() -> None:
            try:
                sgmv_cpu.configure("auto", settings.cache_dir)  # compiled kernels build under cache_dir
                quant_cpu.configure_dot(settings.quant_dot)  # the quantized kernels' dot product
                base = loader(settings)
                app.state.base = base
                app.state.engine = build_engine(settings, base, store)
                log.info("ready: %s on %s (%s)", base.name, base.device, str(base.dtype))
            except Exception as exc:
                app.state.load_error = str(exc)
                log.exception("start-up failed")

        # on a thread that ends with the load: its OpenMP team (the weights' conversion) ends with it
        loading = asyncio.create_task(asyncio.to_thread(in_passing_thread, load, "loraplex-load"))
        app.state.loading = loading
        try:
            yield
        finally:
            await asyncio.gather(loading, return_exceptions=True)
            if app.state.engine is not None:
                app.state.engine.shutdown()
            if app.state.sources is not None:
                app.state.sources.close()
            store.close()

    app = FastAPI(
        title="loraplex",
        version=__version__,
        lifespan=lifespan,
        dependencies=[Depends(refuse_while_draining), Depends(authorizer(settings))],
    )
    app.state.drain = Drain(settings.shutdown_timeout)
    app.add_middleware(DrainMiddleware, drain=app.state.drain)
    app.add_middleware(
        UploadLimitMiddleware,
        max_bytes=settings.max_upload_mb << 20,
        timeout=settings.upload_timeout,
        body_max_bytes=settings.max_body_kb << 10,
    )
    app.add_middleware(
        AccessMiddleware, settings=settings, tenants=lambda: app_tenants(app)
    )  # before any body
    app.state.gate = QueueGate(settings.max_queue, TenantLimits(lambda tenant_id: _tenant(app, tenant_id)))
    app.state.metrics = Metrics(lambda: (_engine_snapshot(app), getattr(app.state, "store", None)))
    app.add_middleware(  # outermost: request id, access log and metrics cover every answer, 413s too
        RequestContextMiddleware,
        metrics=app.state.metrics,
        gate=app.state.gate,
        request_timeout=settings.request_timeout,
    )
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(generate.router)
    app.include_router(admin.router)
    app.include_router(tenants.router)
    app.include_router(analysis.router)  # before adapters: /adapters/compare is not an id
    app.include_router(probe.router)
    app.include_router(composition.router)
    app.include_router(adapters.router)
    app.include_router(openai.router)
    app.include_router(responses.router)
    app.include_router(prometheus.router)
    install_console(app)  # GET / (the web console) and /console/static/*
    install_openapi_contract(app, settings.max_total_tokens)
    return app
