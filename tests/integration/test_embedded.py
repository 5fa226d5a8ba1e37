"""The embedded SmolLM2-135M: loraplex equals PEFT token for token, and batching changes nothing."""

from __future__ import annotations

import concurrent.futures as cf

import pytest
import torch

from tests.api_helpers import start_client

ADAPTERS = {
    "qv": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "all": dict(r=16, lora_alpha=32, target_modules="all-linear"),
    "rs": dict(r=4, lora_alpha=8, target_modules=["o_proj", "down_proj"], use_rslora=True),
    "pattern": dict(
        r=8,
        lora_alpha=8,
        target_modules=["k_proj", "up_proj"],
        rank_pattern={"up_proj": 4},
        alpha_pattern={"k_proj": 32},
    ),
}
QUESTIONS = [
    "What is the capital of France?",
    "Name three colors.",
    "Write a haiku about the sea.",
    "What is 2 + 2?",
]


def chat(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


@pytest.fixture(scope="module", params=["native", "hf"])
def served(embedded_model, tokenizer, embedded_dir, tmp_path_factory, request):
    """A running app with four PEFT-made adapters on the embedded model (on each runner), plus the PEFT models."""
    from tests.conftest import make_peft_adapter

    root = tmp_path_factory.mktemp("embedded")
    peft_models, specs = {}, []
    for seed, (name, kwargs) in enumerate(ADAPTERS.items()):
        peft_models[name] = make_peft_adapter(embedded_model, root / name, seed=seed, b_scale=0.02, **kwargs)
        specs.append(f"{name}={root / name}")
    client = start_client(
        embedded_model, tokenizer, root, adapter=specs, model_path=embedded_dir, runner=request.param
    )
    info = client.get("/info").json()
    assert info["runner"] == request.param
    # the native runner serves the CPU from the compiled kernel's blocks; every check below runs on them
    assert info["decode"]["weights"] == ("blocked" if request.param == "native" else "dense")
    # and its adapters through the compiled LoRA backend (--lora-backend auto on the CPU in float32)
    assert info["lora_backend"] == info["decode"]["lora_backend"] == "compiled-cpu"
    yield client, peft_models
    client.__exit__(None, None, None)


def _generate(client, prompt: str, adapter: str | None, n: int = 16) -> list[int]:
    r = client.post(
        "/generate",
        json={"inputs": prompt, "parameters": {"adapter_id": adapter, "max_new_tokens": n, "details": True}},
    )
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


def test_base_answers_sensibly(served, tokenizer) -> None:
    client, _ = served
    r = client.post(
        "/generate", json={"inputs": chat(tokenizer, QUESTIONS[0]), "parameters": {"max_new_tokens": 20}}
    )
    assert r.json()["generated_text"] == "The capital of France is Paris."
    assert r.json()["details"]["finish_reason"] == "eos_token"


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_greedy_equals_peft_generate(served, tokenizer, name) -> None:
    client, peft_models = served
    for question in QUESTIONS[:2]:
        prompt = chat(tokenizer, question)
        ours = _generate(client, prompt, name)
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = peft_models[name].generate(**inputs, max_new_tokens=16, do_sample=False)
        theirs = out[0, inputs["input_ids"].shape[1] :].tolist()
        assert ours == theirs[: len(ours)] and len(ours) == len(theirs), (name, question)


def test_sixteen_concurrent_requests_equal_their_solo_outputs(served, tokenizer) -> None:
    client, _ = served
    jobs = [(chat(tokenizer, QUESTIONS[i % 4]), [None, *ADAPTERS][i % 5]) for i in range(16)]
    solo = [_generate(client, prompt, adapter) for prompt, adapter in jobs]
    assert len({tuple(s) for s in solo}) > 5  # adapters really differ
    engine = client.app.state.engine
    engine.stats.peak_batch = 0
    with cf.ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(lambda job: _generate(client, *job), jobs))
    assert concurrent == solo
    assert engine.peak_batch >= 8  # they really ran together
