"""Adapter composition and per-request scale over HTTP, on the embedded SmolLM2 (native runner).

``parameters.merged_adapters`` equals PEFT's ``add_weighted_adapter`` (``cat`` for linear, ``ties``)
token for token; ``POST /adapters/compose`` stores a PEFT adapter that PEFT loads back with the same
outputs; ``adapter_scale`` 0 is the base model and 1 the adapter, in one concurrent batch.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import io
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
import torch
from peft import PeftModel

from tests.api_helpers import native_loader
from tests.conftest import make_peft_adapter
from tests.integration.test_embedded import chat
from tests.live_server import start_live_server

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = str(ROOT / "examples/adapters")
QUESTIONS = ["What is 12 plus 30?", "Name three colors."]
N = 12


@pytest.fixture(scope="module")
def served(embedded_model, tokenizer, embedded_dir, tmp_path_factory):
    """The embedded model with the two demo adapters (q, v; r 8) and a random one on other modules (r 4)."""
    root = tmp_path_factory.mktemp("compose")
    make_peft_adapter(embedded_model, root / "od", seed=4, b_scale=0.02, r=4, lora_alpha=8,
                      target_modules=["o_proj", "down_proj"])  # fmt: skip
    folders = {"caps": f"{EXAMPLES}/caps", "pirate": f"{EXAMPLES}/pirate", "od": str(root / "od")}
    specs = [f"{name}={path}" for name, path in folders.items()]
    live = start_live_server(
        embedded_model, tokenizer, root, loader=native_loader(embedded_dir), adapter=specs
    )
    assert live.app.state.engine.runner.name == "native"
    with httpx.Client(base_url=live.url, timeout=120) as client:
        yield client, folders, live
    live.stop()


def _tokens(client, prompt: str, **parameters) -> list[int]:
    r = client.post("/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": N, "details": True,
                                                                        **parameters}})  # fmt: skip
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


def _peft_tokens(model, tokenizer, prompt: str) -> list[int]:
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=N, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def _peft_mix(base, folders, names, weights, combination_type, **kwargs) -> PeftModel:
    model = PeftModel.from_pretrained(copy.deepcopy(base), folders[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(folders[name], adapter_name=name)
    model.add_weighted_adapter(names, weights, "mix", combination_type=combination_type, **kwargs)
    model.set_adapter("mix")
    return model.eval()


@pytest.mark.parametrize(
    ("names", "weights", "strategy", "peft_type", "extra"),
    [
        (["caps", "pirate", "od"], [0.6, 0.5, 1.0], "linear", "cat", {}),
        (["caps", "pirate"], [2.0, 1.0], "ties", "ties", {"density": 0.7}),
    ],
)
def test_merged_adapters_equal_peft_add_weighted_adapter(
    served, embedded_model, tokenizer, names, weights, strategy, peft_type, extra
) -> None:
    client, folders, _ = served
    merged = {"ids": names, "weights": weights, "merge_strategy": strategy, "density": 1.0, **extra}
    peft = _peft_mix(embedded_model, folders, names, weights, peft_type, **extra)
    changed = []
    for question in QUESTIONS:
        prompt = chat(tokenizer, question)
        ours = _tokens(client, prompt, merged_adapters=merged)
        assert ours == _peft_tokens(peft, tokenizer, prompt), (strategy, question)
        changed.append(ours != _tokens(client, prompt))
    assert any(changed), "the composition changes the answers"


def test_a_composition_is_composed_once_and_batches_with_other_rows(served, tokenizer) -> None:
    client, _, live = served
    service_before = getattr(live.app.state, "compositions", None)
    before = service_before.compositions if service_before is not None else 0
    merged = {"ids": ["caps", "pirate"], "weights": [0.5, 0.5], "merge_strategy": "dare_ties", "density": 0.7}
    prompt = chat(tokenizer, QUESTIONS[0])
    jobs = [dict(merged_adapters=merged), {}, dict(adapter_id="caps"), dict(adapter_id="caps", adapter_scale=0.0),
            dict(merged_adapters=merged), dict(adapter_id="pirate", adapter_scale=1.0)]  # fmt: skip
    solo = [_tokens(client, prompt, **job) for job in jobs]
    engine = live.app.state.engine
    engine.stats.peak_batch = 0
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: _tokens(client, prompt, **job), jobs))
    assert together == solo
    assert engine.peak_batch >= 4  # they really ran together
    assert live.app.state.compositions.compositions == before + 1  # DARE seeded: one composition, cached
    assert solo[3] == solo[1] and solo[2] != solo[1]  # scale 0: the base; scale 1: the adapter
    reply = client.post(
        "/generate", json={"inputs": prompt, "parameters": {"merged_adapters": merged}}
    ).json()
    assert reply["details"]["adapter_id"].startswith("merged:")
    metrics = client.get("/metrics").text  # one label for every composition, not one per mix
    assert (
        'loraplex_requests_total{adapter="__merged__",route="/generate",status="200",tenant="_admin"}'
        in metrics
    )


def test_a_composition_with_a_json_schema_gives_valid_json(served, tokenizer) -> None:
    """merged_adapters and response_format in one request (built separately: they meet here)."""
    client, _, _ = served
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer"}, "words": {"type": "string", "maxLength": 40}},
        "required": ["answer", "words"],
        "additionalProperties": False,
    }
    merged = {"ids": ["caps", "pirate"], "weights": [0.7, 0.3], "merge_strategy": "linear"}
    parameters = {"merged_adapters": merged, "max_new_tokens": 60, "details": True,
                  "response_format": {"type": "json_object", "schema": schema}}  # fmt: skip
    reply = client.post("/generate", json={"inputs": chat(tokenizer, QUESTIONS[0]), "parameters": parameters})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["details"]["adapter_id"].startswith("merged:")
    assert body["details"]["finish_reason"] == "eos_token", body
    value = json.loads(body["generated_text"])
    assert set(value) == {"answer", "words"} and isinstance(value["answer"], int), value
    assert len(value["words"]) <= 40


def test_compose_endpoint_round_trip_through_peft(served, embedded_model, tokenizer, tmp_path) -> None:
    client, _, _ = served
    body = {"sources": [{"id": "caps", "weight": 0.6}, {"id": "pirate", "weight": 0.5}, {"id": "od", "weight": 1.0}],
            "strategy": "linear", "new_id": "caps-pirate-od"}  # fmt: skip
    r = client.post("/adapters/compose", json=body)
    assert r.status_code == 201, r.text
    stored = r.json()
    assert stored["id"] == "caps-pirate-od" and stored["rank"] == 16 and stored["target_modules"] == [
        "down_proj", "o_proj", "q_proj", "v_proj"
    ]  # fmt: skip
    assert (
        stored["compose"]["max_relative_error"] == 0.0
        and len(stored["compose"]["layers"]) == stored["layers"]
    )
    download = client.get("/adapters/caps-pirate-od/download")
    with zipfile.ZipFile(io.BytesIO(download.content)) as zf:
        zf.extractall(tmp_path)
    peft = PeftModel.from_pretrained(copy.deepcopy(embedded_model), tmp_path / "caps-pirate-od").eval()
    merged = {"ids": ["caps", "pirate", "od"], "weights": [0.6, 0.5, 1.0], "density": 1.0}
    for question in QUESTIONS:
        prompt = chat(tokenizer, question)
        served_tokens = _tokens(client, prompt, adapter_id="caps-pirate-od")
        assert served_tokens == _peft_tokens(peft, tokenizer, prompt)
        assert served_tokens == _tokens(client, prompt, merged_adapters=merged)
    analysis = client.get("/adapters/caps-pirate-od/analysis", params={"layers": r"layers\.0\.self_attn"})
    assert analysis.status_code == 200 and len(analysis.json()["layers"]) == 3  # q, v, o


def test_compose_with_rank_recompresses_and_reports_the_error(served) -> None:
    client, _, _ = served
    body = {"sources": [{"id": "caps", "weight": 1.0}, {"id": "pirate", "weight": 1.0}], "strategy": "linear",
            "new_id": "caps-pirate-r4", "rank": 4}  # fmt: skip
    r = client.post("/adapters/compose", json=body)
    assert r.status_code == 201, r.text
    report = r.json()["compose"]
    assert r.json()["rank"] == 4 and report["rank"] == 4
    assert all(row["rank"] == 16 and row["stored_rank"] == 4 for row in report["layers"])
    errors = [row["relative_error"] for row in report["layers"]]
    assert all(0 < e < 1 for e in errors) and report["max_relative_error"] == max(errors)
    assert min(errors) < report["relative_error"] < max(errors)  # of the whole update
    prompt = "Hello"
    assert len(_tokens(client, prompt, adapter_id="caps-pirate-r4")) == N  # servable


def test_composition_errors_are_clear(served) -> None:
    client, _, _ = served
    merged = {"ids": ["caps", "pirate"], "weights": [1.0, 1.0], "density": 1.0}

    def generate(**changes):
        return client.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2, **changes}})

    cases = [
        (generate(merged_adapters={**merged, "ids": ["caps", "nope"]}), 404, "adapter_not_found", "'nope'"),
        (generate(merged_adapters={**merged, "weights": [1.0]}), 422, "invalid_composition", "one weight per"),
        (generate(merged_adapters={**merged, "merge_strategy": "svd"}), 422, "validation", "merge_strategy"),
        (generate(merged_adapters={**merged, "density": 1.5}), 422, "validation", "density"),
        (generate(merged_adapters={**merged, "merge_strategy": "ties", "density": 0.0}), 422,
         "invalid_composition", "density"),
        (generate(merged_adapters={**merged, "ids": ["caps", "od"], "merge_strategy": "dare_linear"}), 200, None, ""),
        (generate(merged_adapters=merged, adapter_id="caps"), 422, "validation", "not both"),
        (generate(adapter_id="caps", adapter_scale=11), 422, "validation", "adapter_scale"),
    ]  # fmt: skip
    for response, status, error_type, words in cases:
        assert response.status_code == status, response.text
        if error_type is not None:
            assert response.json()["error_type"] == error_type and words in response.json()["error"], (
                response.text
            )
    compose = {"sources": [{"id": "caps"}], "new_id": "caps"}
    assert client.post("/adapters/compose", json=compose).status_code == 409
    unknown = client.post("/adapters/compose", json={**compose, "new_id": "x1", "sources": [{"id": "nope"}]})
    assert unknown.status_code == 404 and unknown.json()["error_type"] == "adapter_not_found"
    too_big = client.post("/adapters/compose", json={**compose, "new_id": "x2", "rank": 100_000})
    assert too_big.status_code == 422 and "--max-rank" in too_big.json()["error"]
    assert client.get("/adapters/x1").status_code == 404 and client.get("/adapters/x2").status_code == 404


def _docs_block(marker: str, language: str) -> str:
    page = (ROOT / "docs" / "composition.md").read_text()
    match = re.search(rf"<!-- {marker}:.*?-->\n```{language}\n(.*?)```", page, flags=re.S)
    assert match, f"docs/composition.md lost its {marker} block"
    return match.group(1)


def test_docs_compose_blocks_run_as_written(served) -> None:
    """docs/composition.md's curl block and its LoRAX / OpenAI block, against the live server (caps and pirate)."""
    _, _, live = served
    port = live.url.rsplit(":", 1)[1]
    script = _docs_block("compose", "bash").replace("localhost:8080", f"127.0.0.1:{port}")
    done = subprocess.run(["bash", "-e", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    replies = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    linear, ties, half, stored, served_stored = replies
    assert (
        linear["details"]["adapter_id"].startswith("merged:")
        and ties["details"]["adapter_id"] != linear["details"]["adapter_id"]
    )
    assert half["details"]["adapter_id"] == "pirate"
    assert stored["id"] == "caps-pirate" and stored["rank"] == 8 and stored["compose"]["rank"] == 8
    assert 0 < stored["compose"]["relative_error"] <= stored["compose"]["max_relative_error"] < 1
    assert all(r["generated_text"] for r in (linear, ties, half, served_stored))
    print(
        *(r["generated_text"] for r in (linear, ties, half, served_stored)), sep="\n"
    )  # -s: docs/composition.md quotes
    clients = _docs_block("compose-clients", "python").replace("http://127.0.0.1:8080", live.url)
    done = subprocess.run([sys.executable, "-c", clients], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [linear["generated_text"], half["generated_text"]]
