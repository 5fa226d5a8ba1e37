"""`loraplex` command line. Every `serve` flag is also an env var LORAPLEX_<NAME>."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clients.cli import register as register_client_commands

app = typer.Typer(help="loraplex: one base model, many LoRA adapters.", no_args_is_help=True)


@app.callback()
def _root() -> None:
    """loraplex command line."""


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port.")] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Local HF causal-LM directory; default: embedded SmolLM2-135M-Instruct."),
    ] = None,
    adapter: Annotated[
        list[str] | None, typer.Option(help="ID=PATH of a PEFT LoRA directory, repeatable.")
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, float32, bfloat16, float16.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N.")] = None,
    mode: Annotated[str | None, typer.Option(help="auto (default), unmerged or merged.")] = None,
    max_batch: Annotated[int | None, typer.Option(help="Most requests decoded together (32).")] = None,
    max_input_tokens: Annotated[int | None, typer.Option(help="Longest prompt in tokens (2048).")] = None,
    max_total_tokens: Annotated[int | None, typer.Option(help="Prompt + new tokens (4096).")] = None,
    max_loaded_adapters: Annotated[int | None, typer.Option(help="Adapter slots in memory (64).")] = None,
    max_rank: Annotated[int | None, typer.Option(help="Largest LoRA rank accepted (256).")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Adapter storage directory (./data).")] = None,
    adapter_source: Annotated[
        list[str] | None,
        typer.Option(help="s3://BUCKET/PREFIX to fetch adapters the store lacks from, repeatable, in order."),
    ] = None,
    adapter_source_refresh: Annotated[
        float | None, typer.Option(help="Seconds before a fetched adapter is re-checked on use (0: never).")
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Cache directory (~/.cache/loraplex).")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error.")] = None,
    switch_wait: Annotated[
        float | None, typer.Option(help="Merged mode: seconds another adapter's request waits (0.5).")
    ] = None,
    max_upload_mb: Annotated[int | None, typer.Option(help="Largest adapter upload in MB (512).")] = None,
    host_cache_mb: Annotated[int | None, typer.Option(help="Host-memory adapter cache in MB (1024).")] = None,
    max_queue: Annotated[
        int | None, typer.Option(help="Running + waiting requests before new ones get 429 (256).")
    ] = None,
    request_timeout: Annotated[
        float | None, typer.Option(help="Seconds per generation request before 504 (default: none).")
    ] = None,
    log_format: Annotated[
        str | None, typer.Option(help="text (default) or json (one object per line).")
    ] = None,
    lora_backend: Annotated[
        str | None,
        typer.Option(
            help="How adapters are applied: auto (default: compiled-cpu on the CPU in float32 where it "
            "builds, else grouped), grouped, compiled-cpu, segmented, gathered."
        ),
    ] = None,
    kernel: Annotated[str | None, typer.Option(hidden=True, help="Replaced by --lora-backend.")] = None,
    cpu_kernel: Annotated[str | None, typer.Option(hidden=True, help="Replaced by --lora-backend.")] = None,
    runner: Annotated[
        str | None, typer.Option(help="auto (default: native where supported), native or hf.")
    ] = None,
    kv_cache_tokens: Annotated[int | None, typer.Option(help="Native runner: KV memory in tokens.")] = None,
    kv_cache_memory: Annotated[
        str | None, typer.Option(help="Native runner: KV memory budget, e.g. 512MiB, 2GiB.")
    ] = None,
    compile: Annotated[
        str | None,
        typer.Option(
            help="Native runner: auto (CUDA graphs on CUDA, eager on CPU), on (also torch.compile on CPU), off."
        ),
    ] = None,
    weight_layout: Annotated[
        str | None,
        typer.Option(
            help="Native runner: auto (compiled kernel's blocks on the CPU), blocked, packed or dense."
        ),
    ] = None,
    quantization: Annotated[
        str | None,
        typer.Option(help="Native runner, CPU: none (default), int8, int4 or gguf (the GGUF file's blocks)."),
    ] = None,
    quant_dot: Annotated[
        str | None,
        typer.Option(help="With --quantization: float (default, float32 inputs) or int (int8 inputs)."),
    ] = None,
    prefix_cache: Annotated[
        str | None,
        typer.Option(help="Native runner: on (default: reuse cached KV blocks of a prompt prefix) or off."),
    ] = None,
    speculate: Annotated[
        int | None,
        typer.Option(
            help="Native runner: draft tokens proposed per step by prompt lookup, at most (default 4; 0: off)."
        ),
    ] = None,
    speculate_max_batch: Annotated[
        int | None,
        typer.Option(help="With --speculate: no drafts in steps with more running rows than this (4)."),
    ] = None,
    max_prefill_tokens: Annotated[
        int | None,
        typer.Option(help="Prompt tokens prefilled per engine step (4096); longer prompts are chunked."),
    ] = None,
    shutdown_timeout: Annotated[
        float | None,
        typer.Option(help="On SIGTERM: seconds running requests get to finish before exit (30)."),
    ] = None,
    upload_timeout: Annotated[
        float | None,
        typer.Option(help="Seconds a client may take to send a whole upload before 408 (300)."),
    ] = None,
    max_body_kb: Annotated[
        int | None, typer.Option(help="Largest request body but uploads, KiB (2048); 413 above.")
    ] = None,
    max_prompt_chars: Annotated[
        int | None, typer.Option(help="Longest prompt in characters, checked before tokenizing (262144).")
    ] = None,
    allowed_hosts: Annotated[
        list[str] | None,
        typer.Option(help="Host names served besides loopback and --host while no API key is set; '*': any."),
    ] = None,
    ray: Annotated[
        bool, typer.Option("--ray", help="Serve on Ray Serve: --replicas engines behind one endpoint.")
    ] = False,
    replicas: Annotated[int, typer.Option(min=1, help="With --ray: engine replicas (1).")] = 1,
    ray_address: Annotated[
        str | None, typer.Option(help="With --ray: join this Ray cluster (e.g. auto, ray://head:10001).")
    ] = None,
) -> None:
    """Start the HTTP server. Each option is also an env var LORAPLEX_<NAME> (flags win)."""
    options = {
        "host": host, "port": port, "model": model, "adapter": adapter, "dtype": dtype, "device": device,
        "mode": mode, "max_batch": max_batch, "max_input_tokens": max_input_tokens,
        "max_total_tokens": max_total_tokens, "max_loaded_adapters": max_loaded_adapters, "max_rank": max_rank,
        "data_dir": data_dir, "cache_dir": cache_dir, "log_level": log_level, "switch_wait": switch_wait,
        "max_upload_mb": max_upload_mb, "host_cache_mb": host_cache_mb, "max_queue": max_queue,
        "request_timeout": request_timeout, "log_format": log_format, "lora_backend": lora_backend, "kernel": kernel,
        "cpu_kernel": cpu_kernel, "runner": runner,
        "kv_cache_tokens": kv_cache_tokens, "kv_cache_memory": kv_cache_memory, "compile": compile,
        "weight_layout": weight_layout, "max_prefill_tokens": max_prefill_tokens, "shutdown_timeout": shutdown_timeout,
        "upload_timeout": upload_timeout, "adapter_source": adapter_source,
        "adapter_source_refresh": adapter_source_refresh, "quantization": quantization, "quant_dot": quant_dot,
        "prefix_cache": prefix_cache,
        "speculate": speculate, "speculate_max_batch": speculate_max_batch,
        "max_body_kb": max_body_kb, "max_prompt_chars": max_prompt_chars, "allowed_hosts": allowed_hosts,
    }  # fmt: skip
    import uvicorn
    from pydantic import ValidationError

    from server.api.drain import DrainingServer
    from server.app import create_app
    from server.config import Settings
    from server.logs import configure_logging

    given = {name: value for name, value in options.items() if value is not None}
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        raise typer.BadParameter(str(exc)) from exc
    configure_logging(settings.log_level, settings.log_format)
    if ray or ray_address is not None or replicas != 1:
        _serve_on_ray(settings, ray, replicas, ray_address)
        return
    application = create_app(settings)
    config = uvicorn.Config(
        application,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        log_config=None,  # configure_logging did it: text or JSON, with request ids
        access_log=False,  # RequestContextMiddleware writes the access line, with the request id
    )
    server = DrainingServer(config, application.state.drain)  # SIGTERM drains, then exits 0
    server.run()
    if not server.started:
        raise typer.Exit(3)  # start-up failed (uvicorn's own exit status for it)


def _serve_on_ray(settings, ray: bool, replicas: int, ray_address: str | None) -> None:
    """``serve --ray``: the cluster of ``server.cluster`` (needs the ``loraplex[ray]`` extra)."""
    if not ray:
        raise typer.BadParameter("--replicas and --ray-address need --ray.")
    try:
        from server.cluster.app import run
    except ImportError as exc:
        typer.echo(f"error: --ray needs Ray Serve: pip install 'loraplex[ray]' ({exc})", err=True)
        raise typer.Exit(2) from exc
    run(settings, replicas, ray_address)


@app.command()
def analyze(
    path: Annotated[Path, typer.Argument(help="Local PEFT adapter directory.")],
    base: Annotated[
        str | None, typer.Option(help="Local HF base model directory (default: the embedded model).")
    ] = None,
) -> None:
    """Spectral analysis of a local adapter against its base model: no server needed."""
    from adapters.errors import AdapterError
    from adapters.report import format_report
    from server.analyze_local import analyze_local

    try:
        result = analyze_local(path, base)
    except (AdapterError, FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(format_report(result))


register_client_commands(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
