"""--quantization on the embedded model, through the real loader and the HTTP API.

gguf serves the shipped Q4_1 blocks, the values float32 serves (converted from the same blocks):
with --quant-dot float (the default: float32 inputs; named explicitly here) greedy tokens equal
float32's, bare and with adapters (and adapter_scale). int8 and int4 start, report themselves in
/info, and generate; with float inputs int4 still answers the capital of France. With --quant-dot
int (each projection's inputs quantized to int8 blocks) every form starts, reports it and
generates, bare and with adapters. Greedy text is not compared there: int8 inputs move the logits by a few hundredths,
and the France prompt's first token is a near tie in float32 itself ("The" against "L", 0.08 nats
apart), which int4 with int8 inputs turns ("L'Étoile, ..."); a rounding difference between two
paths to the same logits (the prompt's prefix from the prefix cache the second time: other
attention calls) can move an input across a quantization step, so even the same request twice
may turn such a tie differently. The integer kernels' values are checked against a reference in
tests/unit/test_quantized.py, where they equal it to float32 rounding.
"""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from tests.integration.test_embedded import QUESTIONS, chat

ADAPTERS = {
    "qv": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "all": dict(r=16, lora_alpha=32, target_modules="all-linear"),
}


@pytest.fixture(scope="module")
def adapter_specs(embedded_model, tmp_path_factory) -> list[str]:
    from tests.conftest import make_peft_adapter

    root = tmp_path_factory.mktemp("quantized-adapters")
    for seed, (name, kwargs) in enumerate(ADAPTERS.items()):
        make_peft_adapter(embedded_model, root / name, seed=seed, b_scale=0.02, **kwargs)
    return [f"{name}={root / name}" for name in ADAPTERS]


@pytest.fixture(autouse=True)
def _dot_restored(monkeypatch) -> None:
    """The server sets ``quant_cpu.DOT`` process-wide at start-up (``configure_dot``): put back
    what it was after each test, so that an int test leaves no int8 inputs to later tests."""
    from server.engine.native import quant_cpu

    monkeypatch.setattr(quant_cpu, "DOT", quant_cpu.DOT)


def _serve(quantization: str, embedded_dir, adapter_specs, tmp_path, quant_dot: str = "float") -> TestClient:
    settings = Settings(
        quantization=quantization, device="cpu", cache_dir=embedded_dir.parent, data_dir=tmp_path / quantization,
        adapter=adapter_specs, kv_cache_tokens=2048, quant_dot=quant_dot,
    )  # fmt: skip
    client = TestClient(create_app(settings), base_url="http://localhost")  # a loopback Host
    client.__enter__()
    deadline = time.monotonic() + 120
    while client.get("/health").status_code != 200:
        assert time.monotonic() < deadline, client.get("/health").json()
        time.sleep(0.1)
    return client


def _greedy(client, prompt: str, adapter: str | None, scale: float = 1.0, n: int = 24) -> list[int]:
    parameters = {"adapter_id": adapter, "max_new_tokens": n, "details": True}
    if adapter is not None:
        parameters["adapter_scale"] = scale
    r = client.post("/generate", json={"inputs": prompt, "parameters": parameters})
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


CASES = [(None, 1.0), ("qv", 1.0), ("all", 1.0), ("all", 0.5)]


@pytest.fixture(scope="module")
def float32_tokens(embedded_dir, adapter_specs, tmp_path_factory, tokenizer) -> dict:
    client = _serve("none", embedded_dir, adapter_specs, tmp_path_factory.mktemp("none"))
    try:
        assert "quant_dot" not in client.get("/info").json()["decode"]  # no quantization: no dot product
        return {(q, a, s): _greedy(client, chat(tokenizer, q), a, s) for q in QUESTIONS[:2] for a, s in CASES}
    finally:
        client.__exit__(None, None, None)


def test_gguf_serves_exactly_what_float32_serves(
    float32_tokens, embedded_dir, adapter_specs, tmp_path, tokenizer
) -> None:
    client = _serve("gguf", embedded_dir, adapter_specs, tmp_path, quant_dot="float")
    try:
        decode = client.get("/info").json()["decode"]
        assert decode["quantization"] == "gguf" and decode["weights"] == "quantized"
        assert decode["quant_dot"] == "float"
        assert client.get("/info").json()["mode"] == "unmerged"  # auto stays unmerged
        for (question, adapter, scale), expected in float32_tokens.items():
            assert _greedy(client, chat(tokenizer, question), adapter, scale) == expected, (question, adapter)
        # analysis reads the dequantized base weights
        r = client.get("/adapters/qv/analysis")
        assert r.status_code == 200 and r.json()["layers"], r.text
    finally:
        client.__exit__(None, None, None)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_int8_and_int4_serve_with_adapters(
    quantization, embedded_dir, adapter_specs, tmp_path, tokenizer
) -> None:
    client = _serve(quantization, embedded_dir, adapter_specs, tmp_path, quant_dot="float")
    try:
        assert client.get("/info").json()["decode"]["quantization"] == quantization
        r = client.post(
            "/generate", json={"inputs": chat(tokenizer, QUESTIONS[0]), "parameters": {"max_new_tokens": 20}}
        )
        assert r.status_code == 200 and "Paris" in r.json()["generated_text"], r.text
        # mixed rows (the adapters' correctness on a quantized base: tests/unit/test_quantized.py)
        for adapter in (None, "qv", "all"):
            assert _greedy(client, chat(tokenizer, QUESTIONS[1]), adapter), adapter
    finally:
        client.__exit__(None, None, None)


@pytest.mark.parametrize("quantization", ["int8", "int4", "gguf"])
def test_every_form_serves_with_int8_inputs(
    quantization, embedded_dir, adapter_specs, tmp_path, tokenizer
) -> None:
    """--quant-dot int: the integer kernels serve (/info says which instruction set),
    bare and with adapters (see the module docstring for why the text is not compared)."""
    from server.engine.native import quant_cpu

    client = _serve(quantization, embedded_dir, adapter_specs, tmp_path, quant_dot="int")
    try:
        decode = client.get("/info").json()["decode"]
        assert decode["quantization"] == quantization
        kernel = quant_cpu.load()
        assert kernel is not None and decode["quant_dot"] == f"int ({kernel.int_isa})"
        for question in QUESTIONS[:2]:
            for adapter, scale in CASES:
                tokens = _greedy(client, chat(tokenizer, question), adapter, scale)
                assert len(tokens) == 24 or tokens[-1] == tokenizer.eos_token_id, (question, adapter)
    finally:
        client.__exit__(None, None, None)
