"""The compiled decode-layer functions (server/engine/native/fused_cpu.py) against PyTorch, and
the native model's small-batch decode path that runs them (base rows in one call, adapter rows
between compiled steps, merged weights) against Hugging Face, PEFT and the PyTorch path."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from adapters.peft_format import load_adapter_dir
from server.engine import gemv_cpu
from server.engine.decode_threads import DecodeThreads
from server.engine.lora_linear import BASE_SLOT
from server.engine.lora_model import AdapterSlots
from server.engine.merge import MergeManager
from server.engine.native import NativeLlamaRunner, fused_cpu, quant_cpu
from server.engine.runner import DecodeInput, PrefillInput, StepRow
from tests.unit.test_quantized import dot, tolerance

__all__ = ["dot"]  # the --quant-dot fixture (float, then int)

SMALL = dict(
    hidden_size=48, intermediate_size=88, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
    max_position_embeddings=512, eos_token_id=2, pad_token_id=2, bos_token_id=1, vocab_size=300,
)  # fmt: skip
PROMPTS = [[1, 15, 27, 200, 41, 9], [1, 7], [1, *range(40, 75)]]  # 6, 2, 36 tokens: 1 to 3 KV blocks


@pytest.fixture(scope="module")
def kernel() -> fused_cpu.CompiledDecode:
    built = fused_cpu.load()
    assert built is not None, "CI's machine has a C compiler (make setup) and AVX2/FMA"
    return built


@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("width", [1, 7, 37, 576])
def test_rms_norm_and_silu_mul_equal_pytorch(kernel, rows: int, width: int) -> None:
    gen = torch.Generator().manual_seed(rows * 1000 + width)
    x = torch.randn(rows, width + 5, generator=gen)[:, 2 : width + 2]  # a row stride wider than the row
    weight = torch.randn(width, generator=gen)
    torch.testing.assert_close(
        kernel.rms_norm(x, weight, 1e-5, torch.empty(rows, width)), F.rms_norm(x, (width,), weight, 1e-5)
    )
    gate_up = torch.randn(rows, 2 * width, generator=gen) * 5
    got = kernel.silu_mul(gate_up, torch.empty(rows, width))
    torch.testing.assert_close(got, F.silu(gate_up[:, :width]) * gate_up[:, width:])


@pytest.mark.parametrize(
    ("rows", "heads", "kv_heads", "head_dim", "block", "blocks"),
    [
        (1, 9, 3, 64, 16, 1),
        (1, 9, 3, 64, 16, 5),
        (3, 4, 4, 6, 5, 2),
        (4, 6, 2, 10, 4, 3),
        (2, 2, 1, 12, 3, 7),
    ],
)
def test_attend_equals_rotary_kv_write_and_sdpa_over_the_blocks(
    kernel, rows: int, heads: int, kv_heads: int, head_dim: int, block: int, blocks: int
) -> None:
    """Grouped-query heads (and none), head sizes that are not multiples of 8, partial last blocks,
    rows of different lengths over shuffled blocks; q and k rotated in place and the pools written
    exactly as the PyTorch form does."""
    assert fused_cpu._attend_case(
        kernel,
        torch.Generator().manual_seed(rows + heads + blocks),
        rows,
        heads,
        kv_heads,
        head_dim,
        block,
        blocks,
    )


@pytest.mark.parametrize(
    ("counts", "heads", "kv_heads", "head_dim", "block", "blocks"),
    [
        ((5,), 9, 3, 64, 16, 2),  # one verify row of 1 + 4 tokens across a block boundary
        ((3, 3), 6, 2, 10, 4, 3),  # 2 rows x 3 tokens
        ((2, 4, 1, 1), 4, 4, 6, 3, 4),  # ragged, no GQA, blocks of 3
        ((8,), 4, 1, 8, 2, 6),  # 8 tokens over 4 blocks of 2
    ],
)
def test_attend_of_verify_rows_equals_a_causal_reference(
    kernel, counts: tuple[int, ...], heads: int, kv_heads: int, head_dim: int, block: int, blocks: int
) -> None:
    """Several new tokens per sequence, each a row of its own in a shuffled order (its sequence's
    blocks, its own position and context): every token's K and V are written before any token
    attends, so each sees exactly its sequence's positions up to its own."""
    gen = torch.Generator().manual_seed(sum(counts) + block)
    assert fused_cpu._verify_case(kernel, gen, counts, heads, kv_heads, head_dim, block, blocks)


def test_verify_case_detects_tokens_attending_before_their_step_is_written(kernel, monkeypatch) -> None:
    """A kernel that wrote and attended token by token (in the given, shuffled order) would let a
    token miss an earlier token of its own step: the check fails for it."""
    real = kernel.attend

    def token_by_token(qkv, heads, cos, sin, k_pool, v_pool, index, scale, out):
        for r in range(qkv.shape[0]):
            one = fused_cpu.StepIndex(
                *(t[r : r + 1] for t in (index.write_blocks, index.write_offsets, index.block_table, index.lengths)),
                index.pool_blocks, index.block, index.scores,
            )  # fmt: skip
            real(
                qkv[r : r + 1],
                heads,
                cos[r : r + 1],
                sin[r : r + 1],
                k_pool,
                v_pool,
                one,
                scale,
                out[r : r + 1],
            )
        return out

    monkeypatch.setattr(kernel, "attend", token_by_token)
    assert not fused_cpu._verify_case(kernel, torch.Generator().manual_seed(1), (5, 3), 4, 2, 8, 4, 3)


def test_attend_case_detects_a_wrong_kernel(kernel, monkeypatch) -> None:
    """The load-time check fails when the kernel's output is off (so it is not vacuous)."""
    real = kernel.attend

    def off_by_a_bit(*args, **kwargs):
        return real(*args, **kwargs).mul_(1.001)

    monkeypatch.setattr(kernel, "attend", off_by_a_bit)
    assert not fused_cpu._attend_case(kernel, torch.Generator().manual_seed(0), 2, 4, 2, 8, 4, 2)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_whole_layers_in_one_call_equal_the_steps(kernel, threads) -> None:
    """On one thread, and shared out over 2 or 3 (each its run of every projection's blocks,
    meeting between the stages of the step)."""
    assert fused_cpu._layers_agree(kernel, torch.Generator().manual_seed(3), threads)


def test_shapes_that_do_not_fit_are_refused_before_the_c_code_runs(kernel) -> None:
    with pytest.raises(ValueError, match="rms_norm"):
        kernel.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-5, torch.empty(2, 8))
    with pytest.raises(ValueError, match="silu_mul"):
        kernel.silu_mul(torch.randn(2, 8), torch.empty(2, 3))
    pool = torch.zeros(4, 4, 2, 8)  # 4 blocks of 4 positions

    def index(lengths=(3,), table=((0, 1),), writes=((0,), (2,))) -> fused_cpu.StepIndex:
        long = functools.partial(torch.tensor, dtype=torch.long)
        return kernel.step_index(long(writes[0]), long(writes[1]), long(table), long(lengths), 4, 4)

    for wrong in (dict(lengths=(9,)), dict(lengths=(0,)), dict(table=((0, 4),)), dict(writes=((4,), (0,))),
                  dict(writes=((0,), (4,))), dict(writes=((-1,), (0,)))):  # fmt: skip
        with pytest.raises(ValueError, match="outside 4 blocks of 4"):
            index(**wrong)
    trig = (torch.ones(1, 8), torch.zeros(1, 8))
    with pytest.raises(ValueError, match="decode step"):  # qkv narrower than the heads
        kernel.attend(torch.randn(1, 60), 4, *trig, pool, pool.clone(), index(), 1.0, torch.empty(1, 32))
    with pytest.raises(ValueError, match="decode step"):  # pools of another size than the index's
        small = torch.zeros(3, 4, 2, 8)
        kernel.attend(torch.randn(1, 64), 4, *trig, small, small.clone(), index(), 1.0, torch.empty(1, 32))
    out = kernel.attend(torch.randn(1, 64), 4, *trig, pool, pool.clone(), index(), 1.0, torch.empty(1, 32))
    assert out.isfinite().all()


# ----------------------------------------------------------------------------- in the model


def _saved(tmp_path_factory, config, name: str):
    torch.manual_seed(11)
    model = AutoModelForCausalLM.from_config(config).eval()
    for module in model.modules():  # qwen2: make the q/k/v biases matter
        if getattr(module, "bias", None) is not None:
            torch.nn.init.normal_(module.bias, std=0.5)
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def arch(request, tmp_path_factory):
    config = (LlamaConfig if request.param == "llama" else Qwen2Config)(**SMALL)
    return (request.param, *_saved(tmp_path_factory, config, request.param))


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1]


def _counting(monkeypatch, kernel: fused_cpu.CompiledDecode) -> dict[str, int]:
    calls = {"layers": 0, "attend": 0}
    for name in calls:
        real = getattr(kernel, name)

        def counted(*args, name=name, real=real, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(kernel, name, counted)
    return calls


def test_small_decode_steps_equal_hugging_face_peft_and_the_pytorch_path(
    arch, peft_adapter_factory, monkeypatch
) -> None:
    """Base rows (the one-call path), rows with adapters (compiled steps between the LoRA
    backends' updates) and a mixed step, one to three rows, 1 to 3 KV blocks: logits equal HF or
    PEFT, and the same steps with the compiled path switched off."""
    name, model, path = arch
    runners = [NativeLlamaRunner(path, weight_layout="blocked", kv_cache_tokens=512) for _ in range(2)]
    assert runners[0].model.fused is not None
    calls = _counting(monkeypatch, runners[0].model.fused)
    runners[1].model.fused = None  # the PyTorch path
    adapter_dir, peft = peft_adapter_factory(
        model, f"fused-{name}", r=4, lora_alpha=8, target_modules="all-linear"
    )
    slots = []
    for runner in runners:
        adapter = load_adapter_dir(adapter_dir, "all", runner.base_shapes)
        slots.append(AdapterSlots(runner.lora_targets, 2, runner.slots_changed).acquire(adapter))
    plans = [  # (sequence, adapter?) rows per step
        [(0, False)],
        [(1, True)],
        [(0, False), (1, True), (2, True)],
        [(2, True), (0, False)],
    ]
    for runner, slot in zip(runners, slots, strict=True):
        runner.prefill([PrefillInput(i, p, 0, slot if i else BASE_SLOT) for i, p in enumerate(PROMPTS)])
    sequences = [list(p) for p in PROMPTS]
    for step, plan in enumerate(plans * 3):
        token = 10 + 7 * step
        outputs = [
            runner.decode([DecodeInput(seq, token, slot if lora else BASE_SLOT) for seq, lora in plan])
            for runner, slot in zip(runners, slots, strict=True)
        ]
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)
        for row, (seq, lora) in enumerate(plan):
            sequences[seq].append(token)
            want = _logits(peft if lora else model, sequences[seq])
            torch.testing.assert_close(outputs[0][row], want, rtol=1e-4, atol=1e-4)
    assert calls["layers"] == 3  # the base-only steps (plan 0, three times)
    assert calls["attend"] == 9 * SMALL["num_hidden_layers"]  # the others, per layer


def test_merged_weights_are_read_by_the_one_call_path(
    tmp_path_factory, peft_adapter_factory, monkeypatch
) -> None:
    """Merged mode: rows carry no adapter, so the one-call path runs, on the merged (and then
    restored) packed weights."""
    model, path = _saved(tmp_path_factory, LlamaConfig(**SMALL), "merged")
    runner = NativeLlamaRunner(path, weight_layout="blocked", kv_cache_tokens=512)
    calls = _counting(monkeypatch, runner.model.fused)
    adapter_dir, peft = peft_adapter_factory(model, "merged", r=4, lora_alpha=8, target_modules="all-linear")
    manager = MergeManager(runner.weight_targets, path, can_merge=True)
    manager.merge(load_adapter_dir(adapter_dir, "all", runner.base_shapes))
    runner.prefill([PrefillInput(0, PROMPTS[0], 0, BASE_SLOT)])
    got = runner.decode([DecodeInput(0, 33, BASE_SLOT)])[0]
    torch.testing.assert_close(got, _logits(peft, [*PROMPTS[0], 33]), rtol=1e-4, atol=1e-4)
    manager.merge(None)
    runner.prefill([PrefillInput(1, PROMPTS[1], 0, BASE_SLOT)])
    got = runner.decode([DecodeInput(1, 33, BASE_SLOT)])[0]
    torch.testing.assert_close(got, _logits(model, [*PROMPTS[1], 33]), rtol=1e-4, atol=1e-4)
    assert calls["layers"] == 2


def test_steps_above_the_one_thread_rows_keep_pytorch_ops(tmp_path_factory, monkeypatch) -> None:
    _, path = _saved(tmp_path_factory, LlamaConfig(**SMALL), "wide")
    runner = NativeLlamaRunner(path, weight_layout="blocked", kv_cache_tokens=1024)
    calls = _counting(monkeypatch, runner.model.fused)
    rows = gemv_cpu.ONE_THREAD_ROWS + 1
    runner.prefill([PrefillInput(i, PROMPTS[0], 0, BASE_SLOT) for i in range(rows)])
    runner.decode([DecodeInput(i, 5, BASE_SLOT) for i in range(rows)])
    assert calls == {"layers": 0, "attend": 0}
    runner.decode([DecodeInput(i, 5, BASE_SLOT) for i in range(rows - 1)])
    assert calls == {"layers": 1, "attend": 0}


def test_a_layer_table_refuses_weights_of_the_wrong_shape(kernel) -> None:
    hidden, heads, kvh, d, inter, block = 21, 4, 2, 6, 13, 4
    width = (heads + 2 * kvh) * d
    layer = [
        torch.randn(hidden), gemv_cpu.pack(torch.randn(width, hidden)), None,
        gemv_cpu.pack(torch.randn(hidden, heads * d)), torch.randn(hidden),
        gemv_cpu.pack(torch.randn(2 * inter, hidden)), gemv_cpu.pack(torch.randn(hidden, inter)),
        torch.zeros(3, block, kvh, d), torch.zeros(3, block, kvh, d),
    ]  # fmt: skip
    dims = (hidden, heads, kvh, d, inter, block)
    table = kernel.layer_table([layer], dims)
    assert table.addresses.shape == (1, 9) and table.holds(layer) and not table.holds([*layer[:-1], layer[7]])
    for index, wrong in ((1, gemv_cpu.pack(torch.randn(width, hidden + 1))), (6, torch.randn(hidden, inter)),
                         (7, torch.zeros(3, block + 1, kvh, d)), (0, None)):  # fmt: skip
        with pytest.raises(ValueError, match="decode layers"):
            kernel.layer_table([[*layer[:index], wrong, *layer[index + 1 :]]], dims)


def test_small_steps_on_two_threads_give_the_same_logits(tmp_path_factory, monkeypatch) -> None:
    """``LORAPLEX_DECODE_THREADS`` (the runner's ``decode_threads``) changes who computes, not what."""
    model, path = _saved(tmp_path_factory, LlamaConfig(**SMALL), "threads")
    runner = NativeLlamaRunner(path, weight_layout="blocked", kv_cache_tokens=512)
    calls = _counting(monkeypatch, runner.model.fused)
    runner.prefill([PrefillInput(i, PROMPTS[2], 0, BASE_SLOT) for i in range(2)])
    runner.decode_threads = DecodeThreads(1, 2)  # pinned, as LORAPLEX_DECODE_THREADS=1
    one = runner.decode([DecodeInput(0, 9, BASE_SLOT)])[0]
    runner.decode_threads = DecodeThreads(2, 2)  # pinned, as LORAPLEX_DECODE_THREADS=2
    two = runner.decode([DecodeInput(1, 9, BASE_SLOT)])[0]
    torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(two, _logits(model, [*PROMPTS[2], 9]), rtol=1e-4, atol=1e-4)
    assert calls["layers"] == 2


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_small_steps_on_two_threads_give_the_same_logits(
    tmp_path_factory, quantization, dot, monkeypatch
) -> None:
    """The one-region step (each thread its run of every projection's rows, ``gemv_cpu.c``) with
    either dot product's quantized kernels: a base row's logits on one thread and on two are the
    same (each output row's sums are its own, whichever thread computes them), and the step ran
    ``dot``'s kernels (the parts table holds their addresses; switching the dot product changes
    the logits: int8 inputs against float ones)."""
    _, path = _saved(tmp_path_factory, LlamaConfig(**SMALL), f"threads-{quantization}")
    runner = NativeLlamaRunner(path, quantization=quantization, kv_cache_tokens=512)
    fused = runner.model.fused
    assert fused is not None and runner.model.fused_parts is not None
    seen: list[tuple[str, int]] = []  # (the parts table's dot product, threads) per one-call step
    real = fused.parts_layers

    def counted(table: fused_cpu.PartsTable, *args) -> None:
        seen.append((table.dot, args[-1]))
        real(table, *args)

    monkeypatch.setattr(fused, "parts_layers", counted)
    runner.prefill([PrefillInput(i, PROMPTS[2], 0, BASE_SLOT) for i in range(3)])  # 3 same prompts
    runner.decode_threads = DecodeThreads(1, 2)  # pinned, as LORAPLEX_DECODE_THREADS=1
    one = runner.decode([DecodeInput(0, 9, BASE_SLOT)])[0]
    runner.decode_threads = DecodeThreads(2, 2)  # pinned, as LORAPLEX_DECODE_THREADS=2
    two = runner.decode([DecodeInput(1, 9, BASE_SLOT)])[0]
    torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-5)
    assert seen == [(dot, 1), (dot, 2)]
    other_dot = "float" if dot == "int" else "int"
    monkeypatch.setattr(quant_cpu, "DOT", other_dot)
    other = runner.decode([DecodeInput(2, 9, BASE_SLOT)])[0]
    assert seen[-1] == (other_dot, 2)
    assert (other - two).abs().max() > 1e-5  # the other kernels ran


def _verify_step(runner: NativeLlamaRunner, plan, sequences: list[list[int]], slot: int) -> torch.Tensor:
    """One step of verify rows: (sequence, new tokens, adapter?) each; -> every token's logits."""
    rows = [
        StepRow(seq, tokens, len(sequences[seq]), slot if lora else BASE_SLOT, logits=len(tokens),
                drafts=len(tokens) - 1, decoding=True)
        for seq, tokens, lora in plan
    ]  # fmt: skip
    logits = runner.step(rows).logits
    for seq, tokens, _ in plan:  # keep all but the last draft of each row (a rollback each step)
        if len(tokens) > 1:
            runner.commit(seq, len(tokens) - 2)
    return logits


def test_verify_steps_equal_hugging_face_peft_and_the_pytorch_path(
    arch, peft_adapter_factory, monkeypatch
) -> None:
    """Verify steps (rows of 1 + k tokens, speculative decoding) on the compiled path: one row of
    5 tokens, 2 rows x 3, ragged rows mixing base and adapter rows and a row without drafts,
    tokens crossing KV block boundaries and rolled back each step; every token's logits equal HF
    or PEFT on the sequence up to it, and the same steps with the compiled path switched off. A
    step of more than ``fused_cpu.VERIFY_TOKENS`` tokens keeps PyTorch's ops."""
    name, model, path = arch
    runners = [NativeLlamaRunner(path, weight_layout="blocked", kv_cache_tokens=512) for _ in range(2)]
    calls = _counting(monkeypatch, runners[0].model.fused)
    runners[1].model.fused = None  # the PyTorch path
    adapter_dir, peft = peft_adapter_factory(
        model, f"verify-{name}", r=4, lora_alpha=8, target_modules="all-linear"
    )
    slots = []
    for runner in runners:
        adapter = load_adapter_dir(adapter_dir, "all", runner.base_shapes)
        slots.append(AdapterSlots(runner.lora_targets, 2, runner.slots_changed).acquire(adapter))
    prompts = [[1, *range(20, 33)], [1, 7], [1, *range(40, 75)]]  # 14 (2 before a block end), 2, 36
    for runner, slot in zip(runners, slots, strict=True):
        runner.prefill([PrefillInput(i, p, 0, slot if i == 1 else BASE_SLOT) for i, p in enumerate(prompts)])
    sequences = [list(p) for p in prompts]
    plans = [  # (sequence, new tokens, adapter?) per row; 1 + k tokens: the last sampled one + k drafts
        [(0, [11, 12, 13, 14, 15], False)],  # 5 tokens over positions 14-18: block 0 -> 1
        [(1, [21, 22, 23], True), (2, [24, 25, 26], False)],
        [(2, [31, 32, 33, 34], False), (0, [35], False), (1, [36, 37], True)],
        [(0, [41, 42, 43], False), (2, [44, 45], False)],
        [(1, [51, 52, 53, 54, 55], True), (0, [56, 57, 58, 59, 60], False)],  # 10 tokens: PyTorch's ops
    ]
    for plan in plans:
        outputs = [
            _verify_step(runner, plan, sequences, slot) for runner, slot in zip(runners, slots, strict=True)
        ]
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)
        first = 0
        for seq, tokens, lora in plan:
            for j in range(len(tokens)):
                want = _logits(peft if lora else model, [*sequences[seq], *tokens[: j + 1]])
                torch.testing.assert_close(outputs[0][first + j], want, rtol=1e-4, atol=1e-4)
            first += len(tokens)
            sequences[seq].extend(tokens[: max(1, len(tokens) - 1)])
    assert calls["layers"] == 2  # the base-only steps within the token limit (plans 0 and 3)
    assert calls["attend"] == 2 * SMALL["num_hidden_layers"]  # plans 1 and 2, per layer


# ----------------------------------------------------------------------------- quantized projections


@pytest.fixture(scope="module")
def quant() -> quant_cpu.CompiledQuant:
    built = quant_cpu.load()
    assert built is not None, "CI's machine has a C compiler and AVX2/FMA"
    return built


def test_quantized_layers_in_one_call_equal_the_steps(kernel, quant) -> None:
    """Every projection form (int8, int4, Q4_0-like, Q6_K-like, float32 blocked, a stack of
    forms) in the one-call step, one and three rows, against the dequantized dense steps, on 1, 2
    and 3 threads (each thread its run of every part's rows): with float inputs, and with the
    integer kernels against the same steps on int8-quantized inputs."""
    assert quant.int_checked  # parts_agree then checks both dot products
    assert fused_cpu.parts_agree(kernel, quant, threads=(1, 2, 3))
    assert fused_cpu.load_parts() is not None


def test_the_quantized_check_detects_a_wrong_table(kernel, quant, monkeypatch) -> None:
    """The parts' mins dropped (the C code reads them wrong): the check at load says no."""
    real = fused_cpu._part_rows

    def without_mins(*args):
        return [[*row[:4], 0, *row[5:]] for row in real(*args)]

    monkeypatch.setattr(fused_cpu, "_part_rows", without_mins)
    assert not fused_cpu.parts_agree(kernel, quant)


def test_a_parts_table_refuses_weights_that_do_not_fit(kernel, quant) -> None:
    gen = torch.Generator().manual_seed(3)
    hidden, heads, kvh, d, inter, block = 21, 4, 2, 6, 13, 4
    width = (heads + 2 * kvh) * d

    def layer(**changed):
        entries = dict(
            norm=torch.randn(hidden), qkv=fused_cpu.sample_projection(gen, width, hidden, 5), bias=None,
            o=fused_cpu.sample_projection(gen, hidden, heads * d, 1), post=torch.randn(hidden),
            gu=fused_cpu.sample_projection(gen, 2 * inter, hidden, 0),
            down=fused_cpu.sample_projection(gen, hidden, inter, 4),
            k=torch.zeros(3, block, kvh, d), v=torch.zeros(3, block, kvh, d),
        )  # fmt: skip
        return list({**entries, **changed}.values())

    dims = (hidden, heads, kvh, d, inter, block)
    good = layer()
    table = kernel.parts_table([good], dims, quant)
    assert table.layers.shape == (1, 13) and table.parts.shape == (6, 9)  # qkv: a stack of 3
    assert table.holds(good) and not table.holds(layer())
    wrong = (
        dict(qkv=fused_cpu.sample_projection(gen, width, hidden + 1, 0)),  # another input size
        dict(o=fused_cpu.sample_projection(gen, hidden + 1, heads * d, 2)),  # more outputs
        dict(gu=gemv_cpu.pack(torch.randn(2 * inter, hidden + 3))),
        dict(down=torch.randn(hidden, inter)),  # dense, not packed
        dict(k=torch.zeros(3, block + 1, kvh, d)),
        dict(norm=None),
    )
    for changed in wrong:
        with pytest.raises(ValueError, match="decode layers"):
            kernel.parts_table([layer(**changed)], dims, quant)
    with pytest.raises(ValueError, match="without the compiled quantized kernels"):
        kernel.parts_table([good], dims, None)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_verify_steps_in_one_call_equal_the_pytorch_path(
    arch, quantization, dot, monkeypatch
) -> None:
    """Verify steps (1 + k tokens a row) of base rows on quantized weights run the one-call parts
    path; every token's logits equal the same steps with the compiled path switched off (the same
    quantized weights through PyTorch's ops), rolled back each step (with int8 inputs: within
    ``INT_PATHS_TOL``, the two paths' inputs differing by float32 rounding)."""
    _, _, path = arch
    runners = [NativeLlamaRunner(path, quantization=quantization, kv_cache_tokens=512) for _ in range(2)]
    assert runners[0].model.fused_parts is not None
    fused, _ = runners[0].model.fused_parts
    calls = {"parts_layers": 0}
    real = fused.parts_layers

    def counted(*args, **kwargs):
        calls["parts_layers"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(fused, "parts_layers", counted)
    runners[1].model.fused = runners[1].model.fused_parts = None  # the PyTorch path
    prompts = [[1, *range(20, 33)], [1, *range(40, 75)]]
    for runner in runners:
        runner.prefill([PrefillInput(i, p, 0, BASE_SLOT) for i, p in enumerate(prompts)])
    sequences = [list(p) for p in prompts]
    plans = [
        [(0, [11, 12, 13, 14, 15], False)],
        [(0, [21, 22, 23], False), (1, [24, 25, 26], False)],
        [(1, [31], False), (0, [32, 33], False)],
    ]
    for plan in plans:
        outputs = [_verify_step(runner, plan, sequences, BASE_SLOT) for runner in runners]
        assert outputs[0].shape[0] == sum(len(tokens) for _, tokens, _ in plan)
        torch.testing.assert_close(outputs[0], outputs[1], **tolerance(dot))
        for seq, tokens, _ in plan:
            sequences[seq].extend(tokens[: max(1, len(tokens) - 1)])
    assert calls["parts_layers"] == len(plans)
