"""Fixtures of the integration tests that run ``loraplex serve`` as a real process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server_process import ServerProcess


@pytest.fixture
def model_dir(tiny_base, tokenizer, tmp_path) -> Path:
    path = tmp_path / "tiny-model"
    tiny_base.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def servers(model_dir, tmp_path) -> Iterator:
    started: list[ServerProcess] = []

    def start(*args: str, **kwargs) -> ServerProcess:
        """``loraplex serve`` on the tiny model and ``tmp_path/data``, with extra flags ``args``."""
        server = ServerProcess(model_dir, tmp_path / "data", tmp_path / "server.log", *args, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.kill()
