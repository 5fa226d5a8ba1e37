"""guidellm (the ``guidellm run`` command, ``openai_http`` backend) against a live ``loraplex serve``
on the embedded SmolLM2 model: synthetic prompts of a fixed token count with a fixed output token
count, which guidellm asks for with vLLM's ``ignore_eos`` (issue 32). Every request must come back
with exactly that many output tokens, by guidellm's own JSON report, on the base model and on an
adapter.

So that the fixed lengths prove something, the runs are greedy and the same requests are replayed
without ``ignore_eos``: some of them then stop on the end-of-sequence token before the limit.
guidellm runs offline: its synthetic data is tokenized with the embedded model's own tokenizer
(a local directory), with ``HF_HUB_OFFLINE=1``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from bench.common import ServerProcess
from tests.synthetic import make_random_peft_adapter

pytestmark = pytest.mark.integration

ADAPTER = "near-base"
PROMPT_TOKENS = 24
OUTPUT_TOKENS = 64
REQUESTS = 3


@pytest.fixture(scope="module")
def served(embedded_model, embedded_dir, tmp_path_factory):
    """The embedded model (``--cache-dir`` where it lies) and one uploaded adapter; yields the URL and
    the base model's name."""
    root = tmp_path_factory.mktemp("guidellm-server")
    # A random adapter close to the base (small B): it changes the replies, yet like the base it
    # ends some of them early, which the replay without ignore_eos needs to show.
    adapter_dir = root / "adapter"
    make_random_peft_adapter(
        embedded_model, adapter_dir, seed=7, b_scale=0.2, r=8, target_modules=["q_proj", "v_proj"]
    )
    server = ServerProcess.start(
        ["--data-dir", str(root / "data"), "--cache-dir", str(embedded_dir.parent), "--log-level", "warning"]
    )
    try:
        files = [
            ("files", (name, (adapter_dir / name).read_bytes()))
            for name in ("adapter_config.json", "adapter_model.safetensors")
        ]
        uploaded = httpx.post(server.url + "/adapters", data={"adapter_id": ADAPTER}, files=files, timeout=60)
        assert uploaded.status_code == 201, uploaded.text
        models = httpx.get(server.url + "/v1/models", timeout=10).json()["data"]
        base = next(m["id"] for m in models if m["parent"] is None)
        yield server.url, base
    finally:
        server.stop()


def _guidellm(url: str, model: str, tokenizer_dir: Path, workdir: Path) -> dict:
    """One ``guidellm run`` (REQUESTS requests, all at once, greedy) on ``/v1/completions``; returns
    its single benchmark from the JSON report."""
    report = workdir / "benchmarks.json"
    scenario = {
        "spec": {
            "backend": {
                "kind": "openai_http",
                "target": url,
                "model": model,
                "request_format": "/v1/completions",
                "extras": {"body": {"temperature": 0}},
                "timeout": 240,
            },
            "profile": {"kind": "concurrent", "streams": REQUESTS},
            "constraints": [{"kind": "max_requests", "count": REQUESTS}],
            "tokenizer": {"kind": "huggingface_auto", "model": str(tokenizer_dir)},
            "data": [
                {"kind": "synthetic_text", "prompt_tokens": PROMPT_TOKENS, "output_tokens": OUTPUT_TOKENS}
            ],
            "outputs": [{"kind": "json", "path": str(report)}],
        }
    }
    config = workdir / "scenario.json"
    config.write_text(json.dumps(scenario))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(workdir / "hf"),  # nothing read from or written to the user's cache
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [sys.executable, "-m", "guidellm", "run", "--config", str(config), "--disable-console"]
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    benchmarks = json.loads(report.read_text())["benchmarks"]
    assert len(benchmarks) == 1
    return benchmarks[0]


def test_guidellm_fixed_length_outputs(served, embedded_dir, tmp_path) -> None:
    url, base = served
    outputs: dict[str, list[str]] = {}
    for model in (base, ADAPTER):
        workdir = tmp_path / model
        workdir.mkdir()
        benchmark = _guidellm(url, model, embedded_dir, workdir)
        requests = benchmark["requests"]
        assert requests["errored"] == [] and requests["incomplete"] == [], requests
        assert len(requests["successful"]) == REQUESTS
        early_stops = 0
        for stats in requests["successful"]:
            body = json.loads(stats["request_args"])["body"]
            assert body["model"] == model and body["ignore_eos"] is True
            assert body["max_tokens"] == OUTPUT_TOKENS
            assert stats["prompt_tokens"] == PROMPT_TOKENS
            # from the server's own usage (the streamed usage chunk), as guidellm reports it
            assert stats["output_tokens"] == OUTPUT_TOKENS, stats
            assert stats["output"]
            # the same request without ignore_eos: greedy, so the same reply up to its natural end
            replay = {k: v for k, v in body.items() if k not in ("ignore_eos", "stream", "stream_options")}
            reply = httpx.post(url + "/v1/completions", json=replay, timeout=240).json()
            used = reply["usage"]["completion_tokens"]
            if reply["choices"][0]["finish_reason"] == "stop":
                assert used < OUTPUT_TOKENS
                early_stops += 1
            else:
                assert used == OUTPUT_TOKENS
        # without ignore_eos some replies end early: the fixed lengths are ignore_eos's doing
        assert early_stops >= 1, f"{model}: no reply ends before {OUTPUT_TOKENS} tokens without ignore_eos"
        outputs[model] = [s["output"] for s in requests["successful"]]
    # the same seeded prompts on both: the adapter changes the replies
    assert sorted(outputs[base]) != sorted(outputs[ADAPTER])
