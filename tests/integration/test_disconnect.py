"""A client that goes away cancels its request and frees its row (real uvicorn server, loopback)."""

from __future__ import annotations

import time

import httpx
import pytest
import torch
from transformers import LlamaForCausalLM

from tests.conftest import tiny_llama_config
from tests.live_server import start_live_server

LONG = {"max_new_tokens": 4000, "ignore_eos": True}


@pytest.fixture
def server(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer), max_position_embeddings=8192)).eval()
    live = start_live_server(model, tokenizer, tmp_path, max_total_tokens=4096)
    yield live.url, live.app
    live.stop()


def _wait_idle(app, seconds: float = 3.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if app.state.engine.num_running == 0 and app.state.engine.num_waiting == 0:
            return True
        time.sleep(0.02)
    return False


def test_stream_disconnect_frees_the_row(server) -> None:
    url, app = server
    with httpx.stream("POST", url + "/generate_stream", json={"inputs": "Hi", "parameters": LONG}) as r:
        lines = r.iter_lines()
        got = [line for _, line in zip(range(6), lines, strict=False)]
        assert any(line.startswith("data:") for line in got), got
        assert app.state.engine.num_running == 1
    assert _wait_idle(app), "row still running after the client left"


def test_generate_disconnect_frees_the_row(server) -> None:
    url, app = server
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/generate", json={"inputs": "Hi", "parameters": LONG}, timeout=0.5)
    assert _wait_idle(app), "row still running after the client left"
    steps = app.state.engine.steps
    r = httpx.post(url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}})
    assert r.status_code == 200 and app.state.engine.steps > steps
