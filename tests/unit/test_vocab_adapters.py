"""Adapters' own token embedding and LM head (PEFT's ``modules_to_save`` for them, and LoRA on
them) against PEFT itself: parsing and refusals, rows mixed with plain LoRA and base rows on both
runners (tied and untied embeddings), graph steps, merged mode (the base embedding and head are
never written), ``adapter_scale``, the engine's three modes, compose/shrink refusals, screening."""

from __future__ import annotations

import copy
import json
import random
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from adapters.analysis import ShrinkError, check_shrink_request
from adapters.compose import CompositionSpec, compose
from adapters.errors import AdapterError
from adapters.host_cache import adapter_nbytes
from adapters.peft_format import build_adapter, load_adapter_dir, load_safetensors_bytes, parse_adapter_config
from adapters.screening import screen
from server.engine.engine import Engine, EngineConfig
from server.engine.hf_runner import HFRunner
from server.engine.lora_linear import BASE_SLOT
from server.engine.lora_model import AdapterSlots
from server.engine.merge import MergeManager
from server.engine.runner import DecodeInput, PrefillInput
from tests.engine_helpers import run_many
from tests.synthetic import make_random_peft_adapter
from tests.unit.test_graphed_decode import _cuda_graph_stand_in
from tests.unit.test_native_runner import PROMPTS, SMALL, _runner

SPECS = {
    "saved": dict(target_modules=["q_proj"], modules_to_save=["lm_head", "embed_tokens"]),
    "saved_head": dict(target_modules=["v_proj"], modules_to_save=["lm_head"]),
    "lora": dict(target_modules=["q_proj", "lm_head", "embed_tokens"]),
    "plain": dict(target_modules=["q_proj", "v_proj"]),
}
ROWS = [None, "saved", "lora", "plain", "saved_head", None, "lora"]


@pytest.fixture(scope="module", params=["untied", "tied"])
def base(request, tmp_path_factory):
    torch.manual_seed(7)
    config = LlamaConfig(vocab_size=512, tie_word_embeddings=request.param == "tied", **SMALL)
    model = AutoModelForCausalLM.from_config(config).eval()
    path = tmp_path_factory.mktemp(f"vocab-{request.param}")
    model.save_pretrained(path)
    return model, path


def make_vocab_adapter(base_model, out, *, seed: int, **kwargs) -> torch.nn.Module:
    """A PEFT adapter with random factors whose modules_to_save copies are moved off the base's
    (PEFT starts them as copies: they would change nothing)."""
    peft = make_random_peft_adapter(base_model, out, seed=seed, r=4, lora_alpha=8, **kwargs)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.3 * torch.randn_like(param))
    peft.save_pretrained(out)
    return peft


def _load(model, runner, tmp_path, specs) -> tuple[dict, dict]:
    adapters, pefts = {}, {}
    for seed, (name, kwargs) in enumerate(specs.items()):
        out = tmp_path / f"{name}-{random.random()}"
        pefts[name] = make_vocab_adapter(model, out, seed=seed, **kwargs)
        adapters[name] = load_adapter_dir(out, name, runner.base_shapes)
    return adapters, pefts


def _reference(model, pefts, name, ids) -> torch.Tensor:
    with torch.no_grad():
        return (model if name is None else pefts[name])(input_ids=torch.tensor([ids])).logits[0]  # [T, V]


def _check_rows(runner, model, adapters, pefts, slots) -> None:
    """A mixed prefill (with prompt logprobs) and a decode step of ROWS against PEFT."""
    inputs = [
        PrefillInput(i, PROMPTS[i % 3], 0, BASE_SLOT if a is None else slots.acquire(adapters[a]), True)
        for i, a in enumerate(ROWS)
    ]
    output = runner.prefill(inputs)
    for i, name in enumerate(ROWS):
        ids = PROMPTS[i % 3]
        ref = _reference(model, pefts, name, ids)
        torch.testing.assert_close(output.logits[i], ref[-1], rtol=1e-4, atol=1e-4)
        logprobs = torch.log_softmax(ref[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        torch.testing.assert_close(output.token_logprobs[i], logprobs, rtol=1e-4, atol=1e-4)
        if name is not None:  # the adapter changes the outputs (the check above could not pass by chance)
            assert (ref[-1] - _reference(model, pefts, None, ids)[-1]).abs().max() > 1e-2
    decoded = runner.decode([DecodeInput(i.seq_id, 5, i.slot) for i in inputs])
    for i, name in enumerate(ROWS):
        ref = _reference(model, pefts, name, [*PROMPTS[i % 3], 5])[-1]
        torch.testing.assert_close(decoded[i], ref, rtol=1e-4, atol=1e-4)


def test_parsing_keeps_the_embedding_and_head_changes_and_refuses_what_it_cannot_serve(
    base, tmp_path
) -> None:
    model, path = base
    runner = _runner(path)
    shapes = runner.base_shapes
    assert shapes["lm_head"].kind == "head" and shapes["model.embed_tokens"].kind == "embedding"
    adapters, _ = _load(model, runner, tmp_path, SPECS)
    saved, lora = adapters["saved"], adapters["lora"]
    assert {m: v.replacement is not None for m, v in saved.vocab.items()} == {
        "lm_head": True,
        "model.embed_tokens": True,
    }
    assert saved.vocab["lm_head"].replacement.shape == (512, 64) and list(saved.layers) == [
        f"model.layers.{i}.self_attn.q_proj" for i in range(2)
    ]
    assert lora.vocab["model.embed_tokens"].A.shape == (4, 512) and lora.vocab["lm_head"].B.shape == (512, 4)
    assert adapter_nbytes(saved) >= 2 * 512 * 64 * 4  # both whole matrices are counted
    out = tmp_path / "for-errors"
    make_vocab_adapter(model, out, seed=0, **SPECS["saved"])
    config = (out / "adapter_config.json").read_bytes()
    tensors = load_safetensors_bytes((out / "adapter_model.safetensors").read_bytes())
    head_key = "base_model.model.lm_head.weight"
    cases = [
        ({"modules_to_save": ["lm_head", "score"]}, tensors, "unsupported", "modules_to_save names 'score'"),
        ({}, {**tensors, head_key: torch.ones(600, 64)}, "incompatible", "needs [512, 64]"),
        ({}, {k: v for k, v in tensors.items() if k != head_key}, "invalid_weights", "no 'lm_head.weight'"),
        ({"modules_to_save": ["embed_tokens"]}, tensors, "incompatible", "modules_to_save does not name it"),
        ({}, {**tensors, head_key: torch.full((512, 64), float("inf"))}, "invalid_weights", "NaN, Inf"),
    ]
    for change, weights, error_type, words in cases:
        spec = parse_adapter_config({**json.loads(config), **change})
        with pytest.raises(AdapterError, match=re.escape(words)) as refused:
            build_adapter("x", spec, weights, shapes)
        assert refused.value.error_type == error_type


def test_rows_equal_peft_on_the_native_runner(base, tmp_path) -> None:
    model, path = base
    runner = _runner(path)
    slots = AdapterSlots(runner.lora_targets, 8, runner.slots_changed, None, runner.vocab)
    adapters, pefts = _load(model, runner, tmp_path, SPECS)
    _check_rows(runner, model, adapters, pefts, slots)


def test_rows_equal_peft_on_the_hf_runner(base, tmp_path) -> None:
    model, _ = base
    runner = HFRunner(copy.deepcopy(model))
    slots = AdapterSlots(runner.lora_targets, 8, runner.slots_changed, None, runner.vocab)
    adapters, pefts = _load(model, runner, tmp_path, SPECS)
    _check_rows(runner, model, adapters, pefts, slots)


def test_graph_steps_with_such_rows_run_eagerly(base, tmp_path) -> None:
    model, path = base
    runner = _runner(path, compile="off")
    graphs = _cuda_graph_stand_in(runner)
    slots = AdapterSlots(runner.lora_targets, 8, runner.slots_changed, None, runner.vocab)
    adapters, pefts = _load(model, runner, tmp_path, {"plain": SPECS["plain"], "saved": SPECS["saved"]})
    plain, saved = slots.acquire(adapters["plain"]), slots.acquire(adapters["saved"])
    runner.prefill([PrefillInput(0, PROMPTS[0], 0, plain), PrefillInput(1, PROMPTS[1], 0, saved)])
    captures = graphs.captures
    runner.decode([DecodeInput(0, 5, plain)])
    assert graphs.captures == captures + 1  # plain LoRA only: a graph
    logits = runner.decode([DecodeInput(0, 6, plain), DecodeInput(1, 5, saved)])
    assert graphs.captures == captures + 1  # an adapter with its own head: eager
    for row, (name, ids) in enumerate((("plain", [*PROMPTS[0], 5, 6]), ("saved", [*PROMPTS[1], 5]))):
        torch.testing.assert_close(logits[row], _reference(model, pefts, name, ids)[-1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["blocked", "dense"])
def test_merged_mode_serves_them_and_never_writes_the_base_embedding_or_head(base, layout, tmp_path) -> None:
    model, path = base
    runner = _runner(path, weight_layout=layout)
    head = runner.model.logits(torch.eye(64)).clone()  # [64, V]: the base head, read through its kernel
    embedding = runner.model.embed_tokens(torch.arange(512)).clone()  # [V, H]
    merger = MergeManager(runner.weight_targets, path, can_merge=True, vocab=runner.vocab)
    adapters, pefts = _load(model, runner, tmp_path, SPECS)
    rng = random.Random(0)
    for step in range(12):
        name = rng.choice([*SPECS, None])
        merger.merge(None if name is None else adapters[name])
        got = runner.prefill([PrefillInput(step, PROMPTS[step % 3], 0, BASE_SLOT)]).logits[0]
        ref = _reference(model, pefts, name, PROMPTS[step % 3])[-1]
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    merger.merge(None)
    assert merger.digest() == merger.digest_at_load and not runner.vocab.merged_active
    assert torch.equal(runner.model.logits(torch.eye(64)), head)
    assert torch.equal(runner.model.embed_tokens(torch.arange(512)), embedding)


def test_adapter_scale_blends_the_embedding_and_head(base, tmp_path) -> None:
    """adapter_scale t: base + t·(adapted − base) for the embedding and the head, 0 is the base,
    and the unmerged rows equal the merged ``adapter.scaled(t)``."""
    model, path = base
    runner = _runner(path)
    merger = MergeManager(runner.weight_targets, path, can_merge=True, vocab=runner.vocab)
    slots = AdapterSlots(runner.lora_targets, 4, runner.slots_changed, None, runner.vocab)
    adapters, pefts = _load(model, runner, tmp_path, {"saved": SPECS["saved"]})
    slot = slots.acquire(adapters["saved"])
    scales = [0.0, 0.5, 1.0]
    logits = runner.prefill(
        [PrefillInput(i, PROMPTS[0], 0, slot, scale=t) for i, t in enumerate(scales)]
    ).logits
    torch.testing.assert_close(
        logits[0], _reference(model, pefts, None, PROMPTS[0])[-1], rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        logits[2], _reference(model, pefts, "saved", PROMPTS[0])[-1], rtol=1e-4, atol=1e-4
    )
    assert (logits[1] - logits[0]).abs().max() > 1e-2 and (logits[1] - logits[2]).abs().max() > 1e-2
    for i, t in enumerate(scales):
        merger.merge(adapters["saved"].scaled(t))
        merged = runner.prefill([PrefillInput(10 + i, PROMPTS[0], 0, BASE_SLOT)]).logits[0]
        torch.testing.assert_close(logits[i], merged, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["unmerged", "merged", "auto"])
def test_engine_serves_them_like_peft_in_every_mode(base, tokenizer, mode, tmp_path) -> None:
    model, path = base
    engine = Engine(
        _runner(path, kv_cache_tokens=4096),
        tokenizer,
        EngineConfig(mode=mode, checkpoint_dir=path, auto_min_uniform_steps=1),
    )
    adapters, pefts = _load(model, engine.runner, tmp_path, {"saved": SPECS["saved"], "lora": SPECS["lora"]})
    jobs = [(PROMPTS[i % 3], adapters.get(n)) for i, n in enumerate([None, "saved", "lora", "saved"])]
    outcomes = run_many(engine, jobs, max_new_tokens=6)
    for (ids, adapter), got in zip(jobs, outcomes, strict=True):
        reference = model if adapter is None else pefts[adapter.adapter_id]
        with torch.no_grad():
            ref = reference.generate(
                torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=2
            )
        want = ref[0, len(ids) :].tolist()
        assert got.tokens == want[: len(got.tokens)]  # the engine stops early at the tokenizer's EOS only
        assert len(got.tokens) == 6 or got.tokens[-1] in engine.eos_ids
    if (
        mode != "auto"
    ):  # auto may merge "saved" for the tail where only its rows run (loads stagger admission)
        assert (engine.merger.stats.swaps > 0) == (mode == "merged")


def test_compose_and_shrink_refuse_them_and_screening_names_them(base, tmp_path) -> None:
    model, path = base
    runner = _runner(path)
    adapters, _ = _load(model, runner, tmp_path, {"saved": SPECS["saved"], "plain": SPECS["plain"]})
    with pytest.raises(AdapterError, match="'saved' changes the token embedding or the LM head"):
        compose([adapters["plain"], adapters["saved"]], [1.0, 1.0], CompositionSpec(), adapter_id="c")
    with pytest.raises(ShrinkError, match="changes the token embedding or the LM head"):
        check_shrink_request(adapters["saved"], "rank", 2)
    report = screen(adapters["saved"], runner.base_shapes)
    assert report["coverage"]["vocab"] == {
        "lm_head": "modules_to_save",
        "model.embed_tokens": "modules_to_save",
    }
    assert report["coverage"]["of"] == 14  # the linear layers (2 x 7)
