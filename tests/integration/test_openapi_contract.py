"""``schemathesis run --checks all`` against a live server's /openapi.json finds no failure.

Bounded: a few examples per operation (every operation included), one worker, a two-minute
limit. The only rule no schema can state (a prompt's length in tokens) is applied by
``tests/schemathesis_hooks.py``; the upload's content by ``schemathesis.toml`` beside this file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_peft_adapter
from tests.live_server import start_live_server

ROOT = Path(__file__).resolve().parents[2]
MAX_TOTAL, MAX_INPUT = 64, 32


@pytest.fixture(scope="module")
def server(tiny_base, tokenizer, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("contract")
    make_peft_adapter(tiny_base, workdir / "qv", seed=3, r=4, lora_alpha=8, target_modules=["q_proj"])
    live = start_live_server(tiny_base, tokenizer, workdir, adapter=[f"qv={workdir / 'qv'}"],
                             max_total_tokens=MAX_TOTAL, max_input_tokens=MAX_INPUT)  # fmt: skip
    yield live
    live.stop()


def test_schema_states_the_limits(server) -> None:
    schema = httpx.get(server.url + "/openapi.json").json()
    params = schema["components"]["schemas"]["GenerateParameters"]["properties"]
    assert {"maximum": MAX_TOTAL - 1}.items() <= params["max_new_tokens"]["anyOf"][0].items()
    generate = schema["paths"]["/generate"]["post"]["responses"]
    assert {"200", "401", "404", "422", "424", "429", "503", "504"} <= set(generate)
    assert set(schema["paths"]["/adapters"]["post"]["responses"]) >= {
        "201",
        "400",
        "401",
        "403",
        "409",
        "413",
        "422",
    }
    # issue 31, finding 14: the upload states its required parts; every body route its 413
    upload = schema["paths"]["/adapters"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert upload["oneOf"] == [{"required": ["files"]}, {"required": ["archive"]}]
    assert upload["properties"]["files"]["minItems"] == upload["properties"]["files"]["maxItems"] == 2
    assert httpx.post(server.url + "/adapters", files={"adapter_id": (None, "x")}).status_code == 400
    for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
        assert "413" in schema["paths"][path]["post"]["responses"]
    r = httpx.request("OPTIONS", server.url + "/adapters")
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"


def test_schemathesis_finds_no_failure(server, embedded_dir) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks",
        "LORAPLEX_TEST_TOKENIZER": str(embedded_dir),
        "LORAPLEX_TEST_MAX_TOTAL_TOKENS": str(MAX_TOTAL),
        "LORAPLEX_TEST_MAX_INPUT_TOKENS": str(MAX_INPUT),
    }
    cli = Path(sys.executable).parent / "schemathesis"
    command = [str(cli), "--config-file", str(Path(__file__).with_name("schemathesis.toml")), "run",
               server.url + "/openapi.json", "--checks", "all", "--max-examples", "8", "--seed", "1",
               "--workers", "1", "--request-timeout", "30", "--generation-database", "none"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout[-12000:] + done.stderr[-3000:]
