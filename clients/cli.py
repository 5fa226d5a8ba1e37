"""The client side of the ``loraplex`` command: ``upload``, ``generate``, ``adapters list|show|delete``.

Each command talks to ``--url`` (env ``LORAPLEX_URL``) through :class:`LoraplexClient`. Keys come
from ``--api-key`` / ``--admin-key`` or, better (flags show in ``ps``), the same env vars the
server reads: ``LORAPLEX_API_KEY``, ``LORAPLEX_ADMIN_KEY``. Admin commands (upload, delete) send
the admin key when one is given, the others the API key; either falls back to the other.
``server.cli`` registers these commands next to ``serve`` and ``analyze``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from clients._calls import DEFAULT_URL
from clients.client import LoraplexClient
from clients.errors import LoraplexError
from clients.types import AdapterSummary

UrlOption = Annotated[str, typer.Option("--url", envvar="LORAPLEX_URL", help="Server address.")]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key", envvar="LORAPLEX_API_KEY", help="API key (prefer the env var).", show_default=False
    ),
]
AdminKeyOption = Annotated[
    str | None,
    typer.Option(
        "--admin-key", envvar="LORAPLEX_ADMIN_KEY", help="Admin key (prefer the env var).", show_default=False
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]

adapters_app = typer.Typer(help="Stored adapters: list, show, delete.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add the client commands to the ``loraplex`` app."""
    app.command()(upload)
    app.command()(generate)
    app.add_typer(adapters_app, name="adapters")


@contextmanager
def _client(url: str, key: str | None) -> Iterator[LoraplexClient]:
    """A client whose errors end the command with the server's message (exit code 1)."""
    try:
        with LoraplexClient(url, api_key=key) as client:
            yield client
    except LoraplexError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


def upload(
    path: Annotated[Path, typer.Argument(help="PEFT adapter directory, or a .zip/.tar/.tar.gz archive.")],
    adapter_id: Annotated[
        str | None, typer.Option("--id", help="Adapter id (default: derived by the server from the name).")
    ] = None,
    replace: Annotated[bool, typer.Option("--replace", help="Replace an adapter with the same id.")] = False,
    url: UrlOption = DEFAULT_URL,
    admin_key: AdminKeyOption = None,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Upload an adapter to the server (shows the bytes sent)."""
    with _client(url, admin_key or api_key) as client:
        summary = client.upload_adapter(
            path, adapter_id=adapter_id, replace=replace, progress=_ByteProgress()
        )
    if as_json:
        typer.echo(json.dumps(_summary_json(summary), indent=2))
    else:
        typer.echo(
            f"uploaded {summary.id}: rank {summary.rank}, {summary.layers} layers, "
            f"{summary.parameters:,} parameters, {_size(summary.bytes)}"
        )


def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt, used as given (no chat template).")],
    adapter: Annotated[
        str | None, typer.Option("--adapter", help="Adapter id (default: the base model).")
    ] = None,
    stream: Annotated[bool, typer.Option("--stream", help="Print tokens as they are generated.")] = False,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", min=1, help="Most tokens to generate.")
    ] = 64,
    temperature: Annotated[
        float | None, typer.Option(help="Sample at this temperature (default: greedy).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed for sampling.")] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    admin_key: AdminKeyOption = None,
) -> None:
    """Generate text (POST /generate, or /generate_stream with --stream)."""
    params = {
        "adapter_id": adapter,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "seed": seed,
    }
    with _client(url, api_key or admin_key) as client:
        if stream:
            for token in client.generate_stream(prompt, **params):
                if not token.special:
                    typer.echo(token.text, nl=False)
            typer.echo()
        else:
            typer.echo(client.generate(prompt, **params).generated_text)


@adapters_app.command("list")
def list_adapters(
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    admin_key: AdminKeyOption = None,
    as_json: JsonOption = False,
    prefix: Annotated[str | None, typer.Option(help="Only adapters whose id starts with this.")] = None,
) -> None:
    """List the stored adapters (read from the server page by page)."""
    with _client(url, api_key or admin_key) as client:
        summaries = client.list_adapters(prefix=prefix)
    if as_json:
        typer.echo(json.dumps([_summary_json(s) for s in summaries], indent=2))
        return
    if not summaries:
        typer.echo("no adapters; upload one with: loraplex upload PATH")
        return
    rows = [("ID", "RANK", "ALPHA", "LAYERS", "PARAMETERS", "SIZE", "CREATED")]
    rows += [
        (
            s.id,
            str(s.rank),
            f"{s.lora_alpha:g}",
            str(s.layers),
            f"{s.parameters:,}",
            _size(s.bytes),
            s.created_at,
        )
        for s in summaries
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@adapters_app.command("show")
def show_adapter(
    adapter_id: Annotated[str, typer.Argument(help="Adapter id.")],
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    admin_key: AdminKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one adapter's summary."""
    with _client(url, api_key or admin_key) as client:
        summary = client.get_adapter(adapter_id)
    data = _summary_json(summary)
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    pad = max(len(k) for k in data)
    for key, value in data.items():
        typer.echo(f"{key.ljust(pad)}  {value}")


@adapters_app.command("delete")
def delete_adapter(
    adapter_id: Annotated[str, typer.Argument(help="Adapter id.")],
    url: UrlOption = DEFAULT_URL,
    admin_key: AdminKeyOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Delete an adapter (requests already running on it finish)."""
    with _client(url, admin_key or api_key) as client:
        client.delete_adapter(adapter_id)
    typer.echo(f"deleted {adapter_id}")


def _summary_json(summary: AdapterSummary) -> dict:
    data = asdict(summary)
    data.pop("raw", None)
    return data


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


class _ByteProgress:
    """``progress(sent, total)`` for uploads: a live counter on a terminal, one final line otherwise."""

    def __init__(self, min_interval: float = 0.1) -> None:
        self.interactive = sys.stderr.isatty()
        self.min_interval = min_interval
        self._last = 0.0

    def __call__(self, sent: int, total: int) -> None:
        done = sent >= total
        now = time.monotonic()
        if not done and (not self.interactive or now - self._last < self.min_interval):
            return
        self._last = now
        percent = 100 * sent / total if total else 100
        line = f"sent {_size(sent)} of {_size(total)} ({percent:.0f}%)"
        if self.interactive:
            typer.echo("\r" + line, err=True, nl=done)
        elif done:
            typer.echo(line, err=True)
