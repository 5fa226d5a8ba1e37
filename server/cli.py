"""`loraplex` command line. Every `serve` flag is also an env var LORAPLEX_<NAME>."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(help="loraplex: one base model, many LoRA adapters.", no_args_is_help=True)


@app.callback()
def _root() -> None:
    """loraplex command line."""


@app.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help="Address to listen on.")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port.")] = None,
    model: Annotated[
        Optional[str], typer.Option(help="Local HF causal-LM directory; default: embedded SmolLM2-135M-Instruct.")
    ] = None,
    adapter: Annotated[
        Optional[list[str]], typer.Option(help="ID=PATH of a PEFT LoRA directory, repeatable.")
    ] = None,
    dtype: Annotated[Optional[str], typer.Option(help="auto, float32, bfloat16, float16.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N.")] = None,
    mode: Annotated[Optional[str], typer.Option(help="unmerged (merged and auto are not implemented yet).")] = None,
    max_batch: Annotated[Optional[int], typer.Option(help="Most requests decoded together (32).")] = None,
    max_input_tokens: Annotated[Optional[int], typer.Option(help="Longest prompt in tokens (2048).")] = None,
    max_total_tokens: Annotated[Optional[int], typer.Option(help="Prompt + new tokens (4096).")] = None,
    max_loaded_adapters: Annotated[Optional[int], typer.Option(help="Adapter slots in memory (64).")] = None,
    max_rank: Annotated[Optional[int], typer.Option(help="Largest LoRA rank accepted (256).")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Adapter storage directory (./data).")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Cache directory (~/.cache/loraplex).")] = None,
    log_level: Annotated[Optional[str], typer.Option(help="debug, info, warning, error.")] = None,
) -> None:
    """Start the HTTP server. Each option is also an env var LORAPLEX_<NAME> (flags win)."""
    options = {
        "host": host, "port": port, "model": model, "adapter": adapter, "dtype": dtype, "device": device,
        "mode": mode, "max_batch": max_batch, "max_input_tokens": max_input_tokens,
        "max_total_tokens": max_total_tokens, "max_loaded_adapters": max_loaded_adapters, "max_rank": max_rank,
        "data_dir": data_dir, "cache_dir": cache_dir, "log_level": log_level,
    }  # fmt: skip
    import uvicorn
    from pydantic import ValidationError

    from server.app import create_app
    from server.config import Settings

    given = {name: value for name, value in options.items() if value is not None}
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        raise typer.BadParameter(str(exc)) from exc
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level.lower())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
