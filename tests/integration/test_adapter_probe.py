"""Screening at upload and GET /adapters/{id}/probe on the embedded SmolLM2 (float32, CPU).

The zero-B adapter (PEFT's own initialisation: lora_B = 0) loads with a ``no_effect`` warning and
probes at KL 0 and top-1 agreement 1 exactly; a trained-looking (random) adapter probes at KL > 0;
an adapter whose target modules match nothing of the base is a 422 naming them. Both runners.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
import torch

from server.api.probe import BUILTIN_PROMPTS, MAX_PROMPT_TOKENS, compare_distributions
from tests.adapter_files import files_parts
from tests.api_helpers import start_client
from tests.conftest import make_peft_adapter


def _zip_dir(path: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            zf.write(path / name, f"{path.name}/{name}")
    return buffer.getvalue()


def _upload_dir(client, path: Path, adapter_id: str, *, replace: bool = False):
    files = [("archive", (f"{adapter_id}.zip", _zip_dir(path), "application/zip"))]
    params = {"replace": "true"} if replace else None
    return client.post("/adapters", files=files, data={"adapter_id": adapter_id}, params=params)


def _zero_b_adapter(base: torch.nn.Module, out: Path) -> None:
    """A PEFT adapter as get_peft_model initialises it: lora_B is zero (it changes nothing)."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    model.save_pretrained(out)


@pytest.fixture(scope="module")
def adapter_dirs(embedded_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("probe-adapters")
    _zero_b_adapter(embedded_model, root / "zero")
    make_peft_adapter(embedded_model, root / "random", seed=5, b_scale=0.05, r=8, lora_alpha=16,
                      target_modules=["q_proj", "v_proj", "down_proj"])  # fmt: skip
    make_peft_adapter(embedded_model, root / "other", seed=6, b_scale=0.05, r=8, lora_alpha=16,
                      target_modules=["q_proj"])  # fmt: skip
    return {p.name: p for p in root.iterdir()}


@pytest.fixture(scope="module", params=["native", "hf"])
def client(request, embedded_model, tokenizer, embedded_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"probe-{request.param}")
    client = start_client(embedded_model, tokenizer, tmp, model_path=embedded_dir, runner=request.param)
    yield client
    client.__exit__(None, None, None)


def test_zero_b_adapter_warns_and_probes_at_kl_zero(client, adapter_dirs) -> None:
    r = _upload_dir(client, adapter_dirs["zero"], "zero")
    assert r.status_code == 201, r.text
    body = r.json()
    assert [w["type"] for w in body["warnings"]] == ["no_effect"]
    assert body["coverage"]["modules"] == 60 and body["coverage"]["of"] == 30 * 7
    assert body["coverage"]["layers"]["0"] == {"modules": ["q_proj", "v_proj"], "of": 7}
    assert client.get("/adapters/zero").json()["warnings"] == body["warnings"]

    probe = client.get("/adapters/zero/probe")
    assert probe.status_code == 200, probe.text
    doc = probe.json()
    assert doc["mean_kl"] == 0.0 and doc["max_kl"] == 0.0 and doc["top1_agreement"] == 1.0
    assert doc["cached"] is False and len(doc["prompts"]) == len(BUILTIN_PROMPTS)
    assert doc["tokens"] == sum(p["tokens"] for p in doc["prompts"]) > 4 * len(BUILTIN_PROMPTS)


def test_random_adapter_probe_is_cached_per_version(client, adapter_dirs) -> None:
    r = _upload_dir(client, adapter_dirs["random"], "rnd")
    assert r.status_code == 201, r.text
    assert "no_effect" not in [w["type"] for w in r.json()["warnings"]]
    assert r.json()["coverage"]["module_types"] == {"down_proj": 30, "q_proj": 30, "v_proj": 30}
    first = client.get("/adapters/rnd/probe").json()
    assert first["mean_kl"] > 1e-4 and first["cached"] is False
    assert 0.0 <= first["top1_agreement"] <= 1.0 and first["max_kl"] >= first["mean_kl"]
    again = client.get("/adapters/rnd/probe").json()
    assert again["cached"] is True and again["mean_kl"] == first["mean_kl"]

    # a replace is a new version: probed anew, and a different adapter gives other numbers
    r = _upload_dir(client, adapter_dirs["other"], "rnd", replace=True)
    assert r.status_code == 201, r.text
    replaced = client.get("/adapters/rnd/probe").json()
    assert replaced["cached"] is False and replaced["version"] != first["version"]
    assert replaced["mean_kl"] != first["mean_kl"]


def test_caller_prompts_are_probed_after_the_builtin_ones(client, adapter_dirs) -> None:
    _upload_dir(client, adapter_dirs["random"], "mine")
    doc = client.get("/adapters/mine/probe", params={"prompt": ["Hello, my name is", "2 + 2 ="]}).json()
    assert [p["prompt"] for p in doc["prompts"]] == [*BUILTIN_PROMPTS, "Hello, my name is", "2 + 2 ="]
    assert doc["tokens"] == sum(p["tokens"] for p in doc["prompts"])
    assert client.get("/adapters/mine/probe", params={"prompt": [""]}).status_code == 422
    assert client.get("/adapters/mine/probe", params={"prompt": ["x" * 2001]}).status_code == 422
    one = client.get("/adapters/mine/probe", params={"prompt": ["Hi"]}).json()  # one token: no position
    assert one["prompts"][-1]["tokens"] == 0 and one["prompts"][-1]["mean_kl"] is None
    assert one["tokens"] == sum(p["tokens"] for p in one["prompts"][:-1])
    long = client.get("/adapters/mine/probe", params={"prompt": ["one two three " * 100]}).json()
    assert long["prompts"][-1]["tokens"] == MAX_PROMPT_TOKENS - 1  # cut at 64 tokens: 63 positions
    too_many = client.get("/adapters/mine/probe", params={"prompt": ["a b c"] * 5})
    assert too_many.status_code == 422
    assert client.get("/adapters/nope/probe").status_code == 404


def test_targets_matching_nothing_are_a_422_naming_them(client, embedded_model) -> None:
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"]}
    from safetensors.torch import save

    tensors = {"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(4, 576),
               "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": torch.zeros(576, 4)}  # fmt: skip
    r = client.post("/adapters", files=files_parts(json.dumps(config).encode(), save(tensors)),
                    data={"adapter_id": "gpt2ish"})  # fmt: skip
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error_type"] == "incompatible"
    for word in ("c_attn", "c_fc", "match no module", "q_proj", "transformer.h.0.attn.c_attn"):
        assert word in body["error"], body
    assert client.get("/adapters/gpt2ish").status_code == 404


def test_compare_distributions_definitions() -> None:
    base = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]]), -1)
    mine = torch.log_softmax(torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0]]), -1)
    kl, agree = compare_distributions(mine, base)
    p = mine[0].double().exp()
    assert kl[0].item() == pytest.approx(float((p * (mine[0].double() - base[0].double())).sum()))
    assert kl[1].item() == 0.0 and agree.tolist() == [False, True]


def test_probe_in_merged_mode_matches_unmerged(
    embedded_model, tokenizer, embedded_dir, adapter_dirs, tmp_path
) -> None:
    """--mode merged: the probe's adapter rows run on the merged weights, its base rows after the
    switch back; the numbers are the unmerged ones (float32 rounding apart), and the zero-B adapter
    is still exactly KL 0."""
    numbers = {}
    for mode in ("unmerged", "merged"):
        client = start_client(embedded_model, tokenizer, tmp_path / mode, model_path=embedded_dir,
                              runner="native", mode=mode, switch_wait=0.2)  # fmt: skip
        try:
            for name in ("zero", "random"):
                assert _upload_dir(client, adapter_dirs[name], name).status_code == 201
            numbers[mode] = {n: client.get(f"/adapters/{n}/probe").json() for n in ("zero", "random")}
            assert client.post("/admin/verify-base").json()["intact"] is True
        finally:
            client.__exit__(None, None, None)
    merged, unmerged = numbers["merged"], numbers["unmerged"]
    assert merged["zero"]["mean_kl"] == 0.0 and merged["zero"]["top1_agreement"] == 1.0
    assert merged["random"]["tokens"] == unmerged["random"]["tokens"]
    assert merged["random"]["mean_kl"] == pytest.approx(unmerged["random"]["mean_kl"], rel=1e-3)
    assert merged["random"]["top1_agreement"] == pytest.approx(unmerged["random"]["top1_agreement"], abs=0.05)
