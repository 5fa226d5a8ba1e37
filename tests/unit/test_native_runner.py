"""The native runner against Hugging Face's model code, PEFT and the dense W + s·B·A reference."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from adapters.peft_format import load_adapter_dir
from server.engine import gemv_cpu
from server.engine.decode_threads import WARM_UP, WINDOW, DecodeThreads
from server.engine.engine import Engine, EngineConfig
from server.engine.hf_runner import HFRunner
from server.engine.lora_linear import BASE_SLOT
from server.engine.lora_model import AdapterSlots
from server.engine.merge import MergeManager
from server.engine.native import NativeLlamaRunner, onednn, supports
from server.engine.runner import DecodeInput, PrefillInput, StepRow
from tests.engine_helpers import outcome, run_many, run_one, submit
from tests.lora_backends import LORA_BACKENDS

SMALL = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, eos_token_id=2, pad_token_id=2, bos_token_id=1,
)  # fmt: skip
LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32, "rope_theta": 500000.0,
}  # fmt: skip
ARCHITECTURES = {
    "llama": lambda v: LlamaConfig(vocab_size=v, **SMALL),
    "llama3-rope-tied": lambda v: LlamaConfig(
        vocab_size=v, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True, **SMALL
    ),
    "mistral": lambda v: MistralConfig(vocab_size=v, sliding_window=None, **SMALL),
    "qwen2": lambda v: Qwen2Config(vocab_size=v, **SMALL),
}
PROMPTS = [
    [1, 15, 27, 300, 41, 9],
    [1, 7],
    [1, 99, 98, 97, 96, 95, 94, 93, 92, 91, 90, 89, 88, 87, 86, 85, 84, 83, 2],
]


def _saved(tmp_path_factory, name: str, vocab: int = 512):
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(ARCHITECTURES[name](vocab)).eval()
    if name == "qwen2":  # make the q/k/v biases matter
        for module in model.modules():
            if getattr(module, "bias", None) is not None:
                torch.nn.init.normal_(module.bias, std=0.5)
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def arch(request, tmp_path_factory):
    return (request.param, *_saved(tmp_path_factory, request.param))


@pytest.fixture(params=["blocked", "packed", "dense"])
def layout(request) -> str:
    """The projections' layout (``--weight-layout``): the equality tests run on both."""
    return request.param


def _runner(path, **kwargs) -> NativeLlamaRunner:
    kwargs.setdefault("kv_cache_tokens", 1024)
    return NativeLlamaRunner(path, **kwargs)


def _hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]  # [T, V]


def test_supports_by_model_type() -> None:
    assert supports({"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1,
                     "intermediate_size": 8, "vocab_size": 8})  # fmt: skip
    assert not supports({"model_type": "gpt2"})
    config = ARCHITECTURES["llama"](64).to_dict() | {"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}
    assert not supports(config)  # unsupported RoPE kinds fall back to the HF runner


def test_prefill_and_decode_logits_equal_hugging_face(arch, layout) -> None:
    _, model, path = arch
    runner = _runner(path, weight_layout=layout)
    assert runner.weight_layout == layout
    out = runner.prefill([PrefillInput(i, p, 0, BASE_SLOT) for i, p in enumerate(PROMPTS)])
    for i, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(out.logits[i], _hf_logits(model, prompt)[-1], rtol=1e-4, atol=1e-4)
    sequences = [list(p) for p in PROMPTS]
    for step in range(5):  # decode a few tokens for every sequence together
        nxt = [(7 * step + 3 * i) % 500 + 3 for i in range(len(PROMPTS))]
        logits = runner.decode([DecodeInput(i, t, BASE_SLOT) for i, t in enumerate(nxt)])
        for i, token in enumerate(nxt):
            sequences[i].append(token)
            torch.testing.assert_close(logits[i], _hf_logits(model, sequences[i])[-1], rtol=1e-4, atol=1e-4)


def test_bfloat16_logits_track_hugging_face_in_bfloat16(arch) -> None:
    """The dtype GPU users serve in: both implementations round differently, so the check is that
    the native runner is as close to the float32 truth as Hugging Face's own bfloat16 forward."""
    _, model, path = arch
    runner = _runner(path, dtype=torch.bfloat16)
    hf16 = copy.deepcopy(model).to(torch.bfloat16)
    out = runner.prefill([PrefillInput(i, p, 0, BASE_SLOT) for i, p in enumerate(PROMPTS)])
    sequences = [list(p) for p in PROMPTS]
    steps = [out.logits]
    for step in range(3):
        nxt = [(5 * step + 11 * i) % 500 + 3 for i in range(len(PROMPTS))]
        steps.append(runner.decode([DecodeInput(i, t, BASE_SLOT) for i, t in enumerate(nxt)]))
        for i, token in enumerate(nxt):
            sequences[i].append(token)
    for i in range(len(PROMPTS)):
        for step, logits in enumerate(steps):
            ids = sequences[i][: len(PROMPTS[i]) + step]
            truth = _hf_logits(model, ids)[-1]
            hf_error = (_hf_logits(hf16, ids)[-1].float() - truth).abs().max()
            native_error = (logits[i].float() - truth).abs().max()
            assert logits[i].dtype == torch.bfloat16
            assert native_error <= 2 * hf_error + 1e-2, (i, step, float(native_error), float(hf_error))


def test_weight_layout_is_blocked_for_eager_float32_on_the_cpu_and_refused_elsewhere(
    tmp_path_factory, monkeypatch
) -> None:
    _, path = _saved(tmp_path_factory, "llama")
    assert onednn.available()  # the CPU build of PyTorch that `make setup` installs has oneDNN
    assert gemv_cpu.load() is not None  # and CI's machine has a C compiler and AVX2/FMA
    runner = _runner(path)
    assert runner.weight_layout == "blocked"
    assert runner.model.lm_head is None and runner.model.embed is not None  # untied: both matrices
    tied = _runner(_saved(tmp_path_factory, "llama3-rope-tied")[1]).model
    assert tied.lm_head is None and tied.embed is None  # tied: the packed head only, read as the embedding
    qkv = runner.model.layers[0].qkv
    assert qkv.weight_targets()["model.layers.0.self_attn.k_proj"].live is None  # no dense copy kept
    assert _runner(path, dtype=torch.bfloat16).weight_layout == "dense"
    for layout in ("blocked", "packed"):
        with pytest.raises(ValueError, match="float32"):
            _runner(path, dtype=torch.bfloat16, weight_layout=layout)
    monkeypatch.setattr(gemv_cpu, "load", lambda: None)  # no C compiler or no AVX2/FMA here
    assert _runner(path).weight_layout == "packed"
    with pytest.raises(ValueError, match="compiled linear kernel"):
        _runner(path, weight_layout="blocked")
    # a target's rows read back exactly what was written, and only those rows change
    target = qkv.weight_targets()["model.layers.0.self_attn.k_proj"]
    before = qkv.weight.clone()
    rows = torch.randn(target.shape)
    target.write(rows)
    assert torch.equal(target.read(), rows)
    start = runner.config.q_size
    after = qkv.weight
    assert torch.equal(after[:start], before[:start]) and torch.equal(
        after[start + len(rows) :], before[start + len(rows) :]
    )


@pytest.mark.parametrize("layout", ["blocked", "packed"])
def test_packed_merge_copies_unpack_only_rows_read_before_they_are_written(
    tmp_path_factory, monkeypatch, layout
) -> None:
    """A swap rewrites every part of a projection before reading it: no unpack, one pack. Rows
    left unwritten come back from the packed weight when the copy is packed again."""
    _, path = _saved(tmp_path_factory, "llama")
    qkv = _runner(path, weight_layout=layout).model.layers[1].qkv
    unpacks: list[torch.Tensor] = []
    original = qkv.layout.unpack
    monkeypatch.setattr(qkv.layout, "unpack", lambda w, n: unpacks.append(w) or original(w, n))

    def unpack(packed: torch.Tensor) -> torch.Tensor:
        return original(packed, qkv.out_features)

    targets = qkv.weight_targets()
    q, k, v = targets
    written = {name: torch.randn(t.shape) for name, t in targets.items()}
    for name, target in targets.items():
        target.write(written[name])
    assert torch.equal(targets[k].read(), written[k]) and not unpacks
    targets[q].flush()
    assert not unpacks and torch.equal(unpack(qkv._packed), torch.cat(list(written.values())))
    targets[k].write(torch.zeros(targets[k].shape))  # one part only: the others are unpacked at the flush
    targets[k].flush()
    assert len(unpacks) == 1
    expected = torch.cat([written[q], torch.zeros(targets[k].shape), written[v]])
    assert torch.equal(unpack(qkv._packed), expected)
    targets[v].read()  # a read alone opens nothing (other threads may read) and packs nothing
    assert not qkv._edits.is_open(qkv)
    packed = qkv._packed
    targets[v].flush()
    assert qkv._packed is packed


def test_chunked_prefill_equals_one_shot_and_token_logprobs(arch) -> None:
    _, model, path = arch
    prompt = PROMPTS[2]
    runner = _runner(path)
    whole = runner.prefill([PrefillInput(0, prompt, 0, BASE_SLOT, want_token_logprobs=True, top_n=3)])
    runner.prefill([PrefillInput(1, prompt[:5], 0, BASE_SLOT)])
    runner.prefill([PrefillInput(1, prompt[5:12], 5, BASE_SLOT), PrefillInput(2, prompt[:3], 0, BASE_SLOT)])
    last = runner.prefill([PrefillInput(1, prompt[12:], 12, BASE_SLOT)])
    torch.testing.assert_close(last.logits[0], whole.logits[0], rtol=1e-4, atol=1e-4)
    ref = _hf_logits(model, prompt).log_softmax(-1)
    expected = ref[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    torch.testing.assert_close(whole.token_logprobs[0], expected, rtol=1e-4, atol=1e-4)
    values, ids = whole.token_top[0]  # [T-1, 3] each: the prompt's top entries (echo with logprobs)
    top = ref[:-1].topk(3, dim=-1)
    torch.testing.assert_close(values, top.values, rtol=1e-4, atol=1e-4)
    assert torch.equal(ids, top.indices)
    with pytest.raises(ValueError, match="starts at"):
        runner.prefill([PrefillInput(1, [5], 3, BASE_SLOT)])


def test_hf_runner_prompt_logprobs_and_top_entries(arch) -> None:
    """The HF runner's prefill (left-padded next to a longer prompt) reports the same as the reference."""
    _, model, _ = arch
    runner = HFRunner(copy.deepcopy(model))
    prompt, longer = PROMPTS[0], PROMPTS[2]
    out = runner.prefill([PrefillInput(0, prompt, 0, BASE_SLOT, want_token_logprobs=True, top_n=2),
                          PrefillInput(1, longer, 0, BASE_SLOT)])  # fmt: skip
    ref = _hf_logits(model, prompt).log_softmax(-1)[:-1]  # [T-1, V]
    expected = ref.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    torch.testing.assert_close(out.token_logprobs[0], expected, rtol=1e-4, atol=1e-4)
    values, ids = out.token_top[0]
    torch.testing.assert_close(values, ref.topk(2, dim=-1).values, rtol=1e-4, atol=1e-4)
    assert torch.equal(ids, ref.topk(2, dim=-1).indices) and 1 not in out.token_top


ADAPTERS = {
    "all": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "qv": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "patterns": dict(
        r=8, lora_alpha=16, target_modules=["k_proj", "o_proj", "down_proj", "up_proj"],
        rank_pattern={"o_proj": 2}, alpha_pattern={"up_proj": 5.0},
    ),
    "layers": dict(r=6, lora_alpha=3, target_modules=["gate_proj", "q_proj"], layers_to_transform=[1]),
}  # fmt: skip


def _dense(base, adapter):
    model = copy.deepcopy(base)
    for name, w in adapter.layers.items():
        linear = model.get_submodule(name)
        linear.weight.data = (linear.weight.double() + w.scale * (w.B.double() @ w.A.double())).float()
    return model


@pytest.mark.parametrize("backend", LORA_BACKENDS)
def test_mixed_adapter_rows_equal_peft_and_the_dense_reference(
    arch, backend, layout, peft_adapter_factory
) -> None:
    name, model, path = arch
    runner = _runner(path, lora_backend=backend, weight_layout=layout)
    slots = AdapterSlots(runner.lora_targets, 8, runner.slots_changed)
    adapters, pefts = {}, {}
    for seed, (adapter_name, kwargs) in enumerate(ADAPTERS.items()):
        adapter_dir, pefts[adapter_name] = peft_adapter_factory(
            model, f"{name}-{adapter_name}", seed=seed, **kwargs
        )
        adapters[adapter_name] = load_adapter_dir(adapter_dir, adapter_name, runner.base_shapes)
    rows = [None, *ADAPTERS, None, "qv"]
    inputs = [
        PrefillInput(i, PROMPTS[i % 3], 0, BASE_SLOT if a is None else slots.acquire(adapters[a]))
        for i, a in enumerate(rows)
    ]
    logits = runner.prefill(inputs).logits
    for i, adapter_name in enumerate(rows):
        ids = torch.tensor([PROMPTS[i % 3]])
        with torch.no_grad():
            if adapter_name is None:
                ref = model(ids).logits[0, -1]
            else:
                ref = pefts[adapter_name](input_ids=ids).logits[0, -1]
                dense = _dense(model, adapters[adapter_name])(ids).logits[0, -1]
                torch.testing.assert_close(logits[i], dense, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits[i], ref, rtol=1e-4, atol=1e-4)
    decoded = runner.decode([DecodeInput(i.seq_id, 5, i.slot) for i in inputs])
    for i, adapter_name in enumerate(rows):
        ids = torch.tensor([[*PROMPTS[i % 3], 5]])
        with torch.no_grad():
            ref = (model if adapter_name is None else pefts[adapter_name])(input_ids=ids).logits[0, -1]
        torch.testing.assert_close(decoded[i], ref, rtol=1e-4, atol=1e-4)


def test_kv_memory_accounting_at_the_boundary(tmp_path_factory) -> None:
    _, path = _saved(tmp_path_factory, "llama")
    runner = _runner(path, kv_cache_tokens=64)  # 4 blocks of 16
    assert runner.kv_usage().capacity == 64 and runner.kv_usage().bytes_reserved > 0
    assert runner.can_admit(64) and not runner.can_admit(65) and not runner.can_admit(60, num_sequences=2)
    runner.prefill([PrefillInput(0, list(range(3, 35)), 0, BASE_SLOT)])  # 32 tokens: 2 blocks
    runner.prefill([PrefillInput(1, list(range(3, 19)), 0, BASE_SLOT)])  # 16 tokens: 1 block
    assert runner.kv_usage().used_tokens == 48 and runner.can_admit(16) and not runner.can_admit(17)
    assert runner.can_decode([0]) and not runner.can_decode([0, 1])  # each needs a new block; 1 is free
    runner.prefill([PrefillInput(2, [3, 4], 0, BASE_SLOT)])  # takes the last block
    assert not runner.can_decode([0]) and runner.can_decode([2])
    runner.release([0])
    assert runner.can_decode([1, 2]) and runner.kv_usage().used_tokens == 18
    runner.release([1, 2])
    assert runner.kv_usage().used_tokens == 0 and runner.kv.free_blocks == 4


def test_merging_into_fused_weights_restores_the_base_bit_for_bit(
    tmp_path_factory, peft_adapter_factory, layout
) -> None:
    model, path = _saved(tmp_path_factory, "qwen2")
    runner = _runner(path, weight_layout=layout)
    adapters = []
    for seed, (name, kwargs) in enumerate(ADAPTERS.items()):
        adapter_dir, _ = peft_adapter_factory(model, f"m-{name}", seed=seed, **kwargs)
        adapters.append(load_adapter_dir(adapter_dir, name, runner.base_shapes))
    fused = [p.weight.clone() for p in runner.model.projections()]
    manager = MergeManager(runner.weight_targets, path, can_merge=True)
    assert manager.restored_from_checkpoint == len(runner.weight_targets)
    unmerged_slots = AdapterSlots(runner.lora_targets, 4, runner.slots_changed)
    slot = unmerged_slots.acquire(adapters[0])
    want = runner.prefill([PrefillInput(0, PROMPTS[0], 0, slot)]).logits[0]
    manager.merge(adapters[0])
    got = runner.prefill([PrefillInput(1, PROMPTS[0], 0, BASE_SLOT)]).logits[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # merged = unmerged
    rng = random.Random(0)
    for _ in range(200):
        manager.merge(rng.choice([*adapters, None]))
    manager.merge(None)
    assert manager.digest() == manager.digest_at_load
    for before, projection in zip(fused, runner.model.projections(), strict=True):
        assert torch.equal(before, projection.weight)


# ----------------------------------------------------------------------------- through the engine


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tokenizer):
    torch.manual_seed(1234)
    from tests.conftest import tiny_llama_config

    model = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer))).eval()
    path = tmp_path_factory.mktemp("engine-llama")
    model.save_pretrained(path)
    return model, path


def _jobs(tokenizer, adapters):
    texts = [
        "Hello there, how are",
        "The quick brown fox",
        "A",
        "Once upon a time in a land far away there lived",
    ]
    names = [None, *adapters, None]
    return [
        (tokenizer(texts[i % 4])["input_ids"], adapters.get(n) if n else None)
        for i, n in enumerate(names * 2)
    ]


def test_engine_outputs_equal_the_hf_runner_and_peft(llama, tokenizer, peft_adapter_factory) -> None:
    model, path = llama
    native = Engine(_runner(path, kv_cache_tokens=4096), tokenizer, EngineConfig(mode="unmerged"))
    hf = Engine.for_hf_model(copy.deepcopy(model), tokenizer, EngineConfig(mode="unmerged"))
    adapters, pefts = {}, {}
    for seed, (name, kwargs) in enumerate(ADAPTERS.items()):
        adapter_dir, pefts[name] = peft_adapter_factory(model, name, seed=seed, **kwargs)
        adapters[name] = load_adapter_dir(adapter_dir, name, native.base_shapes)
    jobs = _jobs(tokenizer, adapters)
    mixed = run_many(native, jobs, max_new_tokens=10)
    assert [o.tokens for o in mixed] == [o.tokens for o in run_many(hf, jobs, max_new_tokens=10)]
    for (ids, adapter), got in zip(jobs, mixed, strict=True):
        assert got.tokens == run_one(native, ids, adapter, max_new_tokens=10).tokens  # solo = mixed
        reference = model if adapter is None else pefts[adapter.adapter_id]
        with torch.no_grad():
            ref = reference.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                                     pad_token_id=2)  # fmt: skip
        assert got.tokens == ref[0, len(ids) :].tolist()


def test_more_requests_than_the_kv_memory_holds_all_complete_correctly(llama, tokenizer) -> None:
    _, path = llama
    reference = Engine(_runner(path, kv_cache_tokens=4096), tokenizer, EngineConfig(mode="unmerged"))
    jobs = _jobs(tokenizer, {})
    solo = [run_one(reference, ids, None, max_new_tokens=24).tokens for ids, _ in jobs]
    small = _runner(path, kv_cache_tokens=96)  # 6 blocks: the 8 requests need ~16
    engine = Engine(small, tokenizer, EngineConfig(mode="unmerged", max_prefill_tokens=16))
    pending = [submit(engine, ids, None, max_new_tokens=24)[1] for ids, _ in jobs]
    peak = 0
    for _ in range(10_000):
        engine._drain_inbox(block=False)
        if not engine.busy:
            break
        engine.step()
        peak = max(peak, small.kv.used_tokens)
    assert [outcome(events).tokens for events in pending] == solo
    assert engine.stats.preemptions >= 1 and peak <= 96 and small.kv.free_blocks == 6


@pytest.mark.parametrize("kwargs", [dict(weight_layout="blocked"), dict(quantization="int8")])
def test_small_decode_steps_run_the_kernels_on_the_chosen_count(
    tmp_path_factory, monkeypatch, kwargs
) -> None:
    """``LORAPLEX_DECODE_THREADS=auto``: each decode step of up to ``ONE_THREAD_ROWS`` rows runs
    PyTorch's ops on one thread and the kernels on the chooser's count (each count warmed up,
    then timed in turn), timed; the counts are restored after the step; ``describe`` shows the
    estimates."""
    _, path = _saved(tmp_path_factory, "llama")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runner = _runner(path, **kwargs)
        ticks = iter(range(1000))
        runner.decode_threads = DecodeThreads(None, torch.get_num_threads(), lambda: float(next(ticks)))
        runner.prefill([PrefillInput(0, PROMPTS[0], 0, BASE_SLOT)])
        seen: list[tuple[int, int]] = []
        forward = runner.model.forward
        monkeypatch.setattr(
            runner.model,
            "forward",
            lambda *a: seen.append((torch.get_num_threads(), gemv_cpu.SMALL_STEP_THREADS)) or forward(*a),
        )
        kernels = gemv_cpu.SMALL_STEP_THREADS
        sampling = 2 * WARM_UP + 2 * WINDOW  # every step takes 1 s: equal, so WINDOW timings each
        for step in range(sampling + 1):
            runner.decode([DecodeInput(0, 5 + step, BASE_SLOT)])
            assert (torch.get_num_threads(), gemv_cpu.SMALL_STEP_THREADS) == (2, kernels)
        expected = [(1, 1)] * WARM_UP + [(1, 2)] * WARM_UP + [(1, 1), (1, 2)] * WINDOW
        assert seen == [*expected, (1, 1)]  # then the faster: equal, the first
        info = runner.decode_threads.describe()
        assert info["setting"] == "auto" and info["step_ms"] == {"1": {"1": 1000.0, "2": 1000.0}}
    finally:
        torch.set_num_threads(before)


def test_verify_steps_are_timed_by_their_tokens(tmp_path_factory, monkeypatch) -> None:
    """A speculative verify step (a row of 1 + k tokens) is a small step too: its kernels run on
    the chooser's count for its tokens, timed apart from 1-token decode steps (``step_ms`` by
    tokens); a step of more than 8 tokens keeps PyTorch's threads."""
    _, path = _saved(tmp_path_factory, "llama")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runner = _runner(path, weight_layout="blocked")
        runner.decode_threads = DecodeThreads(None, 2, lambda: 0.0)
        runner.prefill([PrefillInput(0, PROMPTS[0], 0, BASE_SLOT)])
        seen: list[tuple[int, int]] = []
        forward = runner.model.forward
        monkeypatch.setattr(
            runner.model,
            "forward",
            lambda *a: seen.append((torch.get_num_threads(), gemv_cpu.SMALL_STEP_THREADS)) or forward(*a),
        )
        start = len(PROMPTS[0])
        for tokens in (1, 5, 5, 9):
            row = StepRow(0, list(range(5, 5 + tokens)), start, BASE_SLOT, logits=tokens, drafts=tokens - 1,
                          decoding=True)  # fmt: skip
            runner.step([row])
            if tokens > 1:
                runner.commit(0, 0)  # the drafts rejected: the next step starts one token on
            start += 1
        assert seen == [
            (1, 1),
            (1, 2),
            (1, 1),
            (2, 1),
        ]  # warm-ups (1 token: 1, 5 tokens: 2), in turn, PyTorch's
        assert torch.get_num_threads() == 2
        assert runner.decode_threads.describe()["step_ms"] == {"5": {"1": 0.0}}
    finally:
        torch.set_num_threads(before)


def test_small_blocked_decode_steps_run_on_one_thread_and_restore_the_count(
    tmp_path_factory, monkeypatch
) -> None:
    """Up to ``gemv_cpu.ONE_THREAD_ROWS`` rows a blocked step runs on the engine thread alone;
    larger ones, and other layouts, keep PyTorch's thread count; the count is restored after."""
    _, path = _saved(tmp_path_factory, "llama")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for layout, rows, expected in (
            ("blocked", 1, 1),
            ("blocked", 4, 1),
            ("blocked", 5, 2),
            ("packed", 1, 2),
        ):
            runner = _runner(path, weight_layout=layout)
            runner.prefill([PrefillInput(i, PROMPTS[0], 0, BASE_SLOT) for i in range(rows)])
            seen: list[int] = []
            forward = runner.model.forward
            monkeypatch.setattr(
                runner.model,
                "forward",
                lambda *a, seen=seen, forward=forward: seen.append(torch.get_num_threads()) or forward(*a),
            )
            runner.decode([DecodeInput(i, 5, BASE_SLOT) for i in range(rows)])
            assert seen == [expected], (layout, rows)
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
