"""A real uvicorn server on 127.0.0.1 (a free port), in a thread, for clients that need a URL.

Used by the tests of the ``openai`` SDK, the Python client and the CLI: they speak real HTTP
over loopback, so streaming, disconnects and headers behave as in production.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import torch
import uvicorn
from fastapi import FastAPI

from server.app import BaseLoader, create_app
from server.config import Settings
from tests.api_helpers import loaded_base
from tests.conftest import make_peft_adapter


@dataclass
class LiveServer:
    url: str
    app: FastAPI
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_live_server(
    model: torch.nn.Module | None, tokenizer, workdir: Path, loader: BaseLoader | None = None, **settings
) -> LiveServer:
    """Serve a copy of ``model`` (named ``tiny-llama``), or what ``loader`` loads; returns once /health
    says 200."""
    port = free_port()
    settings.setdefault("data_dir", workdir / "data")
    settings.setdefault("cache_dir", workdir / "cache")
    loader = loader or (lambda _: loaded_base(model, tokenizer))
    app = create_app(Settings(port=port, **settings), loader=loader)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return LiveServer(url, app, server, thread)
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError(f"server on {url} did not become ready")
        time.sleep(0.05)


@contextmanager
def served_with_qv_adapter(
    model: torch.nn.Module, tokenizer, workdir: Path, **settings
) -> Iterator[LiveServer]:
    """``model`` served with one q/v adapter registered as ``qv`` (rank 8, seed 3), the set-up the
    OpenAI-protocol tests share; stopped on exit."""
    make_peft_adapter(model, workdir / "qv", seed=3, b_scale=0.5, r=8, lora_alpha=16,
                      target_modules=["q_proj", "v_proj"])  # fmt: skip
    live = start_live_server(model, tokenizer, workdir, adapter=[f"qv={workdir / 'qv'}"], **settings)
    try:
        yield live
    finally:
        live.stop()


@contextmanager
def openai_client(live: LiveServer) -> Iterator[openai.OpenAI]:
    """The official SDK pointed at ``live``'s /v1, with no retries (a failure shows at once)."""
    with openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0) as client:
        yield client
