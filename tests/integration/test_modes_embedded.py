"""Merged and auto modes on the embedded model: same tokens as unmerged, base proven intact."""

from __future__ import annotations

import concurrent.futures as cf

import pytest

from tests.api_helpers import start_client
from tests.integration.test_embedded import ADAPTERS, QUESTIONS, chat


@pytest.fixture(scope="module")
def adapter_specs(embedded_model, tmp_path_factory):
    from tests.conftest import make_peft_adapter

    root = tmp_path_factory.mktemp("modes")
    specs = []
    for seed, (name, kwargs) in enumerate(ADAPTERS.items()):
        make_peft_adapter(embedded_model, root / name, seed=seed, b_scale=0.02, **kwargs)
        specs.append(f"{name}={root / name}")
    return root, specs


@pytest.fixture(scope="module", params=["native", "hf"])
def runner(request) -> str:
    return request.param


def _serve(embedded_model, tokenizer, embedded_dir, adapter_specs, mode: str, runner: str):
    root, specs = adapter_specs
    return start_client(
        embedded_model,
        tokenizer,
        root / f"{mode}-{runner}",
        model_path=embedded_dir,
        runner=runner,
        adapter=specs,
        mode=mode,
        switch_wait=0.2,
    )


def _tokens(client, prompt: str, adapter: str | None) -> list[int]:
    body = {"inputs": prompt, "parameters": {"adapter_id": adapter, "max_new_tokens": 12, "details": True}}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


@pytest.fixture(scope="module")
def unmerged_outputs(embedded_model, tokenizer, embedded_dir, adapter_specs, runner):
    client = _serve(embedded_model, tokenizer, embedded_dir, adapter_specs, "unmerged", runner)
    jobs = [(chat(tokenizer, QUESTIONS[i % 4]), [None, *ADAPTERS][i % 5]) for i in range(10)]
    outputs = [_tokens(client, prompt, adapter) for prompt, adapter in jobs]
    client.__exit__(None, None, None)
    return jobs, outputs


@pytest.mark.parametrize("mode", ["merged", "auto"])
def test_mode_equals_unmerged_solo_and_concurrent(
    embedded_model, tokenizer, embedded_dir, adapter_specs, unmerged_outputs, mode, runner
) -> None:
    jobs, expected = unmerged_outputs
    client = _serve(embedded_model, tokenizer, embedded_dir, adapter_specs, mode, runner)
    try:
        solo = [_tokens(client, prompt, adapter) for prompt, adapter in jobs]
        assert solo == expected
        with cf.ThreadPoolExecutor(len(jobs)) as pool:
            concurrent = list(pool.map(lambda job: _tokens(client, *job), jobs))
        assert concurrent == expected
        info = client.get("/info").json()
        assert info["mode"] == mode and info["swaps"] >= (4 if mode == "merged" else 0)
        proof = client.post("/admin/verify-base").json()
        assert proof["intact"] and proof["sha256_now"] == proof["sha256_at_load"]
        assert proof["swaps_since_load"] == client.get("/info").json()["swaps"]
        assert client.get("/info").json()["merged_adapter"] is None
    finally:
        client.__exit__(None, None, None)
