"""DoRA, LoRA on the embedding and the LM head, and modules_to_save (lm_head) on the embedded
SmolLM2 (float32, greedy, its embedding tied to its head) against PEFT's own generations: mixed
in one batch with a plain adapter and the base, solo, and in merged mode with the base restored
bit for bit; uploaded over HTTP (201, coverage) and probed (DoRA: KL > 0)."""

from __future__ import annotations

import pytest
import torch

from adapters.peft_format import load_adapter_dir
from server.engine.engine import Engine, EngineConfig
from server.engine.native import NativeLlamaRunner
from tests.api_helpers import start_client
from tests.engine_helpers import run_many, run_one
from tests.integration.test_adapter_probe import _upload_dir
from tests.unit.test_vocab_adapters import make_vocab_adapter

SPECS = {
    "dora": dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True),
    "vocab-lora": dict(target_modules=["q_proj", "embed_tokens", "lm_head"]),
    "saved-head": dict(target_modules=["v_proj"], modules_to_save=["lm_head"]),
    "plain": dict(target_modules=["q_proj", "v_proj"]),
}
TEXTS = ["The capital of France is", "def add(a, b):", "Once upon a time"]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def variants(embedded_model, tokenizer, tmp_path_factory):
    """Each adapter's directory and PEFT's greedy tokens for every prompt (and the base's)."""
    assert embedded_model.config.tie_word_embeddings  # what the modules_to_save case is about
    root = tmp_path_factory.mktemp("variants")
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    references: dict[str | None, list[list[int]]] = {}
    dirs = {}
    for seed, (name, kwargs) in enumerate([(None, None), *SPECS.items()]):
        if name is None:
            model = embedded_model
        else:
            dirs[name] = root / name
            model = make_vocab_adapter(embedded_model, dirs[name], seed=seed, b_scale=0.05, **kwargs)
        references[name] = []
        with torch.no_grad():
            for ids in prompts:
                out = model.generate(
                    torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None
                )
                references[name].append(out[0, len(ids) :].tolist())
        del model
    return dirs, prompts, references


def _engine(embedded_dir, tokenizer, mode: str) -> Engine:
    runner = NativeLlamaRunner(embedded_dir, kv_cache_tokens=2048)
    return Engine(runner, tokenizer, EngineConfig(mode=mode, checkpoint_dir=embedded_dir))


def _assert_like_peft(outcome, reference: list[int], engine: Engine) -> None:
    assert outcome.tokens == reference[: len(outcome.tokens)]  # the engine stops at EOS, PEFT here does not
    assert len(outcome.tokens) == NEW_TOKENS or outcome.tokens[-1] in engine.eos_ids


def test_mixed_batch_and_solo_equal_peft(variants, embedded_dir, tokenizer) -> None:
    dirs, prompts, references = variants
    engine = _engine(embedded_dir, tokenizer, "unmerged")
    adapters = {n: load_adapter_dir(d, n, engine.base_shapes) for n, d in dirs.items()}
    assert adapters["dora"].is_dora and set(adapters["vocab-lora"].vocab) == {"model.embed_tokens", "lm_head"}
    assert adapters["saved-head"].vocab["lm_head"].replacement is not None
    names = [None, *SPECS, None, "dora"]
    jobs = [(prompts[i % 3], adapters.get(n)) for i, n in enumerate(names)]
    for (i, name), outcome in zip(
        enumerate(names), run_many(engine, jobs, max_new_tokens=NEW_TOKENS), strict=True
    ):
        _assert_like_peft(outcome, references[name][i % 3], engine)
    for name, adapter in adapters.items():  # solo
        _assert_like_peft(
            run_one(engine, prompts[0], adapter, max_new_tokens=NEW_TOKENS), references[name][0], engine
        )
    assert references["dora"] != references[None] or references["saved-head"] != references[None]


def test_merged_mode_equals_peft_and_restores_the_base(variants, embedded_dir, tokenizer) -> None:
    dirs, prompts, references = variants
    engine = _engine(embedded_dir, tokenizer, "merged")
    adapters = {n: load_adapter_dir(d, n, engine.base_shapes) for n, d in dirs.items()}
    for round_ in range(2):  # every adapter merged twice, in turn
        for name, adapter in adapters.items():
            outcome = run_one(engine, prompts[round_], adapter, max_new_tokens=NEW_TOKENS)
            _assert_like_peft(outcome, references[name][round_], engine)
    assert engine.merger.stats.swaps >= 2 * len(adapters)
    engine.merger.merge(None)
    assert engine.merger.digest() == engine.merger.digest_at_load and not engine.runner.vocab.merged_active
    _assert_like_peft(
        run_one(engine, prompts[2], None, max_new_tokens=NEW_TOKENS), references[None][2], engine
    )


def test_uploaded_over_http_and_probed(variants, embedded_model, embedded_dir, tokenizer, tmp_path) -> None:
    dirs, _, _ = variants
    client = start_client(embedded_model, tokenizer, tmp_path, model_path=embedded_dir, runner="native")
    try:
        bodies = {}
        for name, path in dirs.items():
            response = _upload_dir(client, path, name)
            assert response.status_code == 201, response.text
            bodies[name] = response.json()
        assert bodies["saved-head"]["coverage"]["vocab"] == {"lm_head": "modules_to_save"}
        assert bodies["vocab-lora"]["coverage"]["vocab"] == {"model.embed_tokens": "lora", "lm_head": "lora"}
        assert bodies["dora"]["coverage"]["modules"] == 90
        probe = client.get("/adapters/dora/probe")
        assert probe.status_code == 200, probe.text
        assert probe.json()["mean_kl"] > 1e-4
        assert client.get("/adapters/saved-head/probe").json()["mean_kl"] > 1e-4
    finally:
        client.__exit__(None, None, None)
