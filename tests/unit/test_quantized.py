"""Quantized base weights (server/engine/native/quantized.py, quant_cpu.c, gguf_blocks.py).

- the compiled kernels against the dense product of the reference dequantization, on ragged
  shapes (partial 32-groups, odd widths, partial row tiles, batch 1..64), and the PyTorch form;
  the integer kernels (--quant-dot int, each instruction set this CPU runs) against the same
  product with the input rows quantized to int8 blocks as they do, and against float inputs
  within the error that quantization allows;
- a runner with --quantization int8/int4/gguf equals a Hugging Face model holding the dequantized
  weights, bare and with mixed adapters (dequantized weights + s·B·A), with adapter_scale, to
  float32 rounding: with --quant-dot int that model's projections quantize their inputs to int8
  as the integer kernels do (``int8_inputs``; the adapters' updates stay on float inputs);
- merged mode is refused, auto runs unmerged, analysis reads the dequantized weights;
- GGUF blocks are kept as shipped; hostile GGUF files are clear errors.
"""

from __future__ import annotations

import copy
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize
from transformers import AutoModelForCausalLM

from adapters.peft_format import load_adapter_dir
from server.engine import cpu_build
from server.engine.engine import Engine, EngineConfig
from server.engine.lora_linear import BASE_SLOT
from server.engine.lora_model import AdapterSlots
from server.engine.native import NativeLlamaRunner, quant_cpu, quantized
from server.engine.native.gguf_blocks import GgufError
from server.engine.native.layers import QuantizedWriteError
from server.engine.native.quantized import Int8Weight, Q4Weight
from server.engine.runner import DecodeInput, PrefillInput
from tests.conftest import tiny_llama_config


@pytest.fixture
def _avx2_fma_present() -> None:
    """The kernel tests fail, never skip, on a CPU without AVX2/FMA (CI's has them)."""
    if not cpu_build.cpu_supports_avx2_fma():
        pytest.fail("the compiled kernel needs an AVX2/FMA CPU, as CI has")


needs_kernel = pytest.mark.usefixtures("_avx2_fma_present")

DOTS = ["float", "int"]
EXACT = {"rtol": 1e-4, "atol": 1e-4}
# Two paths through the same quantized weights (the one-call compiled step, PyTorch's ops between
# the projections) see inputs that differ by float32 rounding. With --quant-dot int each
# projection's input rows are then quantized to int8 (blocks of 32), and an input that lands on the
# other side of a rounding boundary in one path moves by one step (max|x| / 127 of its block) times
# its weights: measured at most 1.4e-3 on these tests' logits (std ~0.16), where float inputs agree
# to 1e-4. INT_PATHS_TOL leaves about five times that. (Against a reference the comparisons stay
# EXACT: ``int8_inputs`` quantizes the reference's inputs the same way.)
INT_PATHS_TOL = {"rtol": 0.0, "atol": 7e-3}


def tolerance(dot: str) -> dict[str, float]:
    """Logits tolerance between two compiled paths under --quant-dot ``dot`` (see INT_PATHS_TOL)."""
    return EXACT if dot == "float" else INT_PATHS_TOL


def int8_inputs(
    model: torch.nn.Module, names: list[str], deltas: dict[str, torch.Tensor] | None = None
) -> None:
    """Make ``model`` (a Hugging Face model holding the dequantized weights) the reference of
    --quant-dot int: each named Linear multiplies its weight by its input rows quantized to int8
    blocks as the integer kernels do (``quantized.quantized_activations``), and adds ``deltas[name]``
    (an adapter's s·B·A) times the float input, as the unmerged LoRA update is computed."""
    deltas = deltas or {}

    def forward(module: torch.nn.Linear, name: str, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        y = quantized.quantized_activations(rows) @ module.weight.t()
        if name in deltas:
            y = y + rows @ deltas[name].t()
        return y.reshape(*x.shape[:-1], -1)

    for name in names:
        module = model.get_submodule(name)
        assert isinstance(module, torch.nn.Linear) and module.bias is None, name
        module.forward = lambda x, m=module, n=name: forward(m, n, x)  # type: ignore[method-assign]


def quantized_names(runner: NativeLlamaRunner) -> list[str]:
    """The reference's Linear modules that the runner multiplies with the quantized kernels."""
    return list(runner.weight_targets) + (["lm_head"] if runner.model.head_q is not None else [])


@pytest.fixture(params=DOTS)
def dot(request, monkeypatch) -> str:
    """Runs the test under --quant-dot float, then int (``quant_cpu.DOT``); with int, a
    reference model needs ``int8_inputs``."""
    monkeypatch.setattr(quant_cpu, "DOT", request.param)
    kernel = quant_cpu.load()
    if request.param == "int" and cpu_build.cpu_supports_avx2_fma():
        assert kernel is not None and kernel.int_checked, "the integer kernels must pass their check here"
    return request.param


def _forms(out: int, k: int, seed: int) -> dict[str, quantized.QuantizedWeight]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, k, generator=gen)
    int4 = quantized.quantize_int4(w)
    groups = int4.scale.shape[1]
    return {
        "int8": quantized.quantize_int8(w),
        "int4": int4,
        "q4_0-like": Q4Weight(int4.q, torch.rand(out, groups, generator=gen), None, -8, k),
        "q4_1-like": Q4Weight(
            int4.q, torch.rand(out, groups, generator=gen), torch.randn(out, groups, generator=gen), 0, k
        ),
        "q8_0-like": Int8Weight(quantized.quantize_int8(w).q, torch.rand(out, groups, generator=gen), 32, k),
        "q6_k-like": Int8Weight(  # groups of 16, float16 scales
            quantized.quantize_int8(w).q, torch.rand(out, 2 * groups, generator=gen).half(), 16, k
        ),
        "q5_k-like": Int8Weight(  # a min per group
            quantized.quantize_int8(w).q.abs() % 32,
            torch.rand(out, groups, generator=gen),
            32,
            k,
            -torch.rand(out, groups, generator=gen),
        ),
        "q4_1-half": Q4Weight(int4.q, int4.scale.half(), None if int4.min is None else int4.min.half(), 0, k),
    }


def _kernels() -> list[tuple[str, str | None]]:
    """(dot, instruction set) of every compiled kernel this CPU runs: float, then int per set."""
    kernel = quant_cpu.load()
    assert kernel is not None, "AVX2/FMA and a C compiler are here: the kernel must build"
    assert kernel.int_checked and kernel.int_isa == kernel.isas[-1], (
        "every integer kernel must pass its check"
    )
    return [("float", None)] + [("int", isa) for isa in kernel.isas]


def _check_kernel(
    x: torch.Tensor, form: quantized.QuantizedWeight, dot: str, isa: str | None, name: str
) -> None:
    """One kernel on x against the dense product: float inputs for the float kernels; for the
    integer ones, the inputs quantized as they do (and, separately, the float product within the
    error that quantization allows)."""
    kernel = quant_cpu.load()
    assert kernel is not None
    n, out = x.shape[0], form.shape[0]
    w = form.dequantize().double()
    xs = x if dot == "float" else quantized.quantized_activations(x)
    expected = xs.double() @ w.t()  # [n, out]
    bound = 1e-5 * (xs.double().abs() @ w.abs().t()) + 1e-6  # float32 summation error, any order
    got = torch.full((n, out), float("nan"))
    quantized.run_kernel(kernel, x, form, got, False, dot, isa)  # type: ignore[arg-type]
    assert ((got.double() - expected).abs() <= bound).all(), (name, dot, isa)
    if dot == "int":  # against float inputs: each moved by at most half its block's step
        exact = x.double() @ w.t()
        allowed = quantized.activation_error_bound(x, form).double() * (1 + 1e-5) + bound
        assert ((got.double() - exact).abs() <= allowed).all(), (name, isa)
    base = torch.randn(n, out + 3)
    acc = base.clone()
    quantized.run_kernel(kernel, x, form, acc[:, 1 : out + 1], True, dot, isa)  # type: ignore[arg-type]
    assert ((acc[:, 1 : out + 1].double() - base[:, 1 : out + 1] - expected).abs() <= bound + 1e-5).all()
    assert torch.equal(acc[:, 0], base[:, 0]) and torch.equal(acc[:, -2:], base[:, -2:])


@needs_kernel
@pytest.mark.parametrize("out,k", [(1, 32), (5, 45), (13, 77), (64, 576), (33, 200), (7, 333), (9, 1536)])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 16, 33, 64, 65])
def test_compiled_kernels_equal_the_dense_reference(out: int, k: int, n: int) -> None:
    """Every layout on ragged shapes (partial groups; the integer kernels' superblocks of 8
    blocks, tail pairs and a single last block), every kernel this CPU runs."""
    x = torch.randn(n, k)
    for name, form in _forms(out, k, seed=n).items():
        for dot, isa in _kernels():
            _check_kernel(x, form, dot, isa, name)


@needs_kernel
def test_integer_kernels_at_every_row_count() -> None:
    """1 to 64 input rows (every streaming tile and batched tile with its remainders), every
    layout, each instruction set, on an input width of 11 blocks (a superblock, a pair, a single
    block) with 14 outputs (partial passes and panels)."""
    gen = torch.Generator().manual_seed(11)
    forms = _forms(14, 333, seed=5)
    for n in range(1, 65):
        x = torch.randn(n, 333, generator=gen) * torch.logspace(-2, 2, n)[:, None]  # rows of every size
        for name, form in forms.items():
            for dot, isa in _kernels():
                if dot == "int":
                    _check_kernel(x, form, dot, isa, name)


@needs_kernel
def test_integer_kernels_quantize_inputs_as_the_reference_does() -> None:
    """The C input quantization equals ``quantized.quantize_activations`` bit for bit: ties at a
    half step (round to even), a zero block, a block below ``TINY``, huge and tiny values; an inf
    or NaN in a block makes that row's outputs NaN (as a float product would)."""
    kernel = quant_cpu.load()
    assert kernel is not None
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 333, generator=gen) * torch.logspace(-30, 30, 6)[:, None]
    x[0, :32] = torch.arange(32) - 15.5  # ...; max 16.5: steps of 16.5 / 127
    x[0, 32:64] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5] + [0.0] * 26)  # exact halves: to even
    x[1, 64:96] = 0
    x[2, 96:128] = 1e-31
    q, d = kernel.quantize_activations(x, 352)
    want_q, want_d = quantized.quantize_activations(x, 352)
    assert torch.equal(q, want_q) and torch.equal(d, want_d)
    assert q[0, 33:38].tolist() == [0, 2, 2, 0, -2] and (q[1, 64:96] == 0).all() and d[2, 3] == 0
    form = quantized.quantize_int4(torch.randn(5, 333, generator=gen))
    bad = torch.randn(3, 333, generator=gen)
    bad[1, 40], bad[2, 300] = float("inf"), float("nan")
    for _, isa in _kernels()[1:]:
        got = torch.zeros(3, 5)
        quantized.run_kernel(kernel, bad, form, got, False, "int", isa)  # type: ignore[arg-type]
        assert torch.isfinite(got[0]).all() and got[1:].isnan().all(), isa


def test_the_pytorch_form_equals_the_dense_reference(monkeypatch) -> None:
    monkeypatch.setattr(quant_cpu, "load", lambda: None)
    x = torch.randn(70, 77)  # more rows than the kernel takes, too
    for form in _forms(9, 77, seed=1).values():
        torch.testing.assert_close(quantized.linear(x, form), x @ form.dequantize().t(), rtol=1e-5, atol=1e-5)


def test_float16_scales_cover_every_weight_and_fall_back_to_float32_when_out_of_range() -> None:
    gen = torch.Generator().manual_seed(4)
    # rows: ordinary, tiny (subnormal float16 scales), one all-equal group, huge (1e7: no float16)
    w = torch.randn(4, 200, generator=gen) * torch.tensor([[0.02], [1e-7], [1.0], [1e7]])
    w[2, 32:64] = 0.5
    for kind in ("int8", "int4"):
        form = quantized.quantize(w[:3], kind)  # type: ignore[arg-type]
        assert form.scale.dtype == torch.float16 and (form.scale.float() > 0).all(), kind
        per = form.q.shape[1] * (2 if kind == "int4" else 1) // form.scale.shape[1]  # weights per scale
        scale = form.scale.float().repeat_interleave(per, dim=1)[:, :200]
        err = (form.dequantize() - w[:3]).abs()
        assert (err <= scale * 0.5 * (1 + 1e-5)).all(), kind  # the nearest level: nothing clamped
        huge = quantized.quantize(w, kind)  # type: ignore[arg-type]
        assert huge.scale.dtype == torch.float32, kind  # a scale past float16: the whole weight float32
        one = quantized.quantize_int8 if kind == "int8" else quantized.quantize_int4
        assert torch.equal(huge.dequantize(), one(w, half=False).dequantize())  # as before float16 scales
    assert torch.equal(quantized.quantize_int4(w[:3]).dequantize()[2, 32:64], w[2, 32:64])  # exact: 0.5 fits
    old = quantized.quantize_int4(w, half=False)
    assert old.scale.dtype == torch.float32 and old.nbytes == 4 * 224 // 2 + 4 * 7 * 8


def test_quantizers_round_to_the_nearest_level() -> None:
    w = torch.randn(6, 77) * torch.logspace(-3, 1, 6)[:, None]
    q8, q4 = quantized.quantize_int8(w), quantized.quantize_int4(w)
    assert q8.dequantize().shape == q4.dequantize().shape == w.shape
    assert q8.scale.dtype == q4.scale.dtype == q4.min.dtype == torch.float16  # type: ignore[union-attr]
    err8 = (q8.dequantize() - w).abs()
    assert (err8 <= q8.scale.float() * 0.5 + 1e-7).all()
    err4 = (q4.dequantize() - w).abs()  # [6, 77] against each group's scale
    scale = q4.scale.float().repeat_interleave(32, dim=1)[:, :77]
    assert (err4 <= scale * 0.5 + 1e-6).all()
    # float16 scales and mins: 2 bytes each, no float matrix kept
    assert q4.nbytes == 6 * 96 // 2 + 6 * 3 * 4 and q8.nbytes == 6 * 96 + 6 * 2
    zeros = quantized.quantize_int4(torch.zeros(2, 40))
    assert torch.equal(zeros.dequantize(), torch.zeros(2, 40))


# ---------------------------------------------------------------------------------------- runner


def _save(tmp_path_factory, tied: bool, seed: int = 3):
    torch.manual_seed(seed)
    # odd widths: an intermediate size that leaves a partial 32-group (down_proj's input)
    config = tiny_llama_config(512, intermediate_size=200, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(config).eval()
    path = tmp_path_factory.mktemp("tied" if tied else "untied")
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def saved(request, tmp_path_factory):
    return _save(tmp_path_factory, request.param)


def _dequantized_reference(model, runner: NativeLlamaRunner):
    """The Hugging Face model with every weight the runner holds quantized set to its dequantization."""
    ref = copy.deepcopy(model)
    for name, target in runner.weight_targets.items():
        ref.get_submodule(name).weight.data = target.read().clone()
    if runner.model.embed_q is not None:
        ref.model.embed_tokens.weight.data = runner.model.embed_q.dequantize().clone()
        assert runner.model.head_q is not None
        ref.lm_head.weight.data = runner.model.head_q.dequantize().clone()
    return ref


ADAPTERS = {
    "qv": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "all": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
}  # fmt: skip
PROMPTS = [[1, 15, 27, 300, 41, 9], [1, 7], [1, 99, 98, 97, 96, 95, 94, 93, 92, 91, 90, 89]]


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_adapters_on_a_quantized_base_equal_the_dequantized_dense_reference(
    saved, kind, dot, peft_adapter_factory
) -> None:
    model, path = saved
    runner = NativeLlamaRunner(path, quantization=kind, kv_cache_tokens=1024)
    assert runner.weight_layout == "quantized" and not runner.can_merge
    # the float32 layouts (blocked, oneDNN) never apply: the int8 head, the quantized projections
    assert runner.model.layout is None and runner.model.head_blocks is None
    assert all(p.layout is None and p._packed is None for p in runner.model.projections())
    ref = _dequantized_reference(model, runner)
    slots = AdapterSlots(runner.lora_targets, 4, runner.slots_changed)
    adapters = {}
    for seed, (name, kwargs) in enumerate(ADAPTERS.items()):
        adapter_dir, _ = peft_adapter_factory(model, f"{kind}-{name}", seed=seed, **kwargs)
        adapters[name] = load_adapter_dir(adapter_dir, name, runner.base_shapes)
    rows = [(None, 1.0), ("qv", 1.0), ("all", 0.5), ("all", 1.0), (None, 1.0), ("qv", -1.0)]
    inputs = [
        PrefillInput(i, PROMPTS[i % 3], 0, BASE_SLOT if a is None else slots.acquire(adapters[a]), scale=s)
        for i, (a, s) in enumerate(rows)
    ]
    logits = runner.prefill(inputs).logits
    decoded = runner.decode([DecodeInput(i.seq_id, 5, i.slot, i.scale) for i in inputs])
    for i, (name, scale) in enumerate(rows):
        dense = copy.deepcopy(ref)
        deltas = {}
        if name is not None:  # W_dequantized + scale · s · B A
            deltas = {module: scale * w.scale * (w.B @ w.A) for module, w in adapters[name].layers.items()}
        if dot == "int":  # the base weights on int8 inputs, the adapters' updates on float ones
            int8_inputs(dense, quantized_names(runner), deltas)
        else:
            for module, delta in deltas.items():
                dense.get_submodule(module).weight.data += delta
        with torch.no_grad():
            expected = dense(torch.tensor([[*PROMPTS[i % 3], 5]])).logits[0]
        torch.testing.assert_close(logits[i], expected[-2], **EXACT)
        torch.testing.assert_close(decoded[i], expected[-1], **EXACT)


def test_int4_stays_close_to_the_float_model(saved) -> None:
    model, path = saved
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        exact = model(ids).logits[0].log_softmax(-1)
    for kind, bound in (("int8", 0.05), ("int4", 0.5)):
        runner = NativeLlamaRunner(path, quantization=kind, kv_cache_tokens=256)
        got = runner.prefill([PrefillInput(0, PROMPTS[2], 0, BASE_SLOT, want_token_logprobs=True)])
        assert (got.logits[0].log_softmax(-1) - exact[-1]).abs().max() < bound, kind


def test_merged_mode_is_refused_and_auto_stays_unmerged(saved, tokenizer) -> None:
    _, path = saved
    runner = NativeLlamaRunner(path, quantization="int8", kv_cache_tokens=256)
    with pytest.raises(ValueError, match="--mode merged cannot be used with a quantized base"):
        Engine(runner, tokenizer, EngineConfig(mode="merged"))
    assert Engine(runner, tokenizer, EngineConfig(mode="auto")).config.mode == "unmerged"
    target = next(iter(runner.weight_targets.values()))
    before = target.read().clone()
    with pytest.raises(QuantizedWriteError, match="run unmerged"):
        target.write(torch.zeros_like(before))
    assert torch.equal(target.read(), before)  # analysis reads the dequantized weight, unchanged


def test_settings_refuse_merged_with_quantization() -> None:
    from pydantic import ValidationError

    from server.config import Settings

    with pytest.raises(ValidationError, match="cannot be folded into quantized blocks"):
        Settings(quantization="int4", mode="merged")
    assert Settings(quantization="int4").mode == "auto"


def test_the_dot_product_is_a_setting(monkeypatch) -> None:
    """--quant-dot / LORAPLEX_QUANT_DOT: float by default (the dequantized weights' exact products;
    int8 inputs can turn near-tied greedy tokens, docs/quantization.md), int on request, anything
    else refused; the kernels follow ``quant_cpu.DOT`` (what the server configures at start-up)."""
    from pydantic import ValidationError

    from server.config import Settings

    monkeypatch.delenv("LORAPLEX_QUANT_DOT", raising=False)
    assert Settings().quant_dot == "float" and Settings(quant_dot="int").quant_dot == "int"
    assert quant_cpu._dot_from_env() == "float"
    monkeypatch.setenv("LORAPLEX_QUANT_DOT", "int")
    assert Settings().quant_dot == "int" and quant_cpu._dot_from_env() == "int"
    with pytest.raises(ValidationError, match="quant_dot"):
        Settings(quant_dot="int4")
    kernel = quant_cpu.load()
    if kernel is not None and kernel.int_checked:
        monkeypatch.setattr(quant_cpu, "DOT", "float")
        assert kernel.dot() == "float" and quant_cpu.describe() == "float"
        monkeypatch.setattr(quant_cpu, "DOT", "int")
        assert kernel.dot() == "int" and quant_cpu.describe() == f"int ({kernel.int_isa})"
        assert kernel.q4_address() != kernel.q4_address("float")


def test_quantization_needs_the_cpu_float32_eager_path(saved) -> None:
    _, path = saved
    with pytest.raises(ValueError, match="float32"):
        NativeLlamaRunner(path, quantization="int8", dtype=torch.bfloat16, kv_cache_tokens=256)
    with pytest.raises(ValueError, match="packed"):
        NativeLlamaRunner(path, quantization="int4", weight_layout="packed", kv_cache_tokens=256)
    with pytest.raises(ValueError, match="--weight-layout blocked keeps float32 weights"):
        NativeLlamaRunner(path, quantization="int8", weight_layout="blocked", kv_cache_tokens=256)
    with pytest.raises(ValueError, match="gguf needs a GGUF file"):
        NativeLlamaRunner(path, quantization="gguf", kv_cache_tokens=256)


# ---------------------------------------------------------------------------------------- GGUF

GGUF_NAMES = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
}  # fmt: skip


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf row permutation of q and k."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(
    model, path: Path, kinds: dict[str, str], shape_lie: bool = False, head: str | None = None
) -> Path:
    """The model's projections as GGUF blocks of ``kinds[module]`` (default Q4_1), q and k
    permuted as llama.cpp's converter does; ``head``: the embedding and LM head as
    ``token_embd.weight`` and ``output.weight`` blocks of that type too."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    if head is not None:
        kind = getattr(gguf.GGMLQuantizationType, head)
        for name, matrix in (("token_embd", model.model.embed_tokens), ("output", model.lm_head)):
            writer.add_tensor(
                f"{name}.weight", quantize(matrix.weight.detach().numpy(), kind), raw_dtype=kind
            )
    for i, layer in enumerate(model.model.layers):
        for module, short in GGUF_NAMES.items():
            part = "self_attn" if short.startswith("attn") else "mlp"
            w = getattr(getattr(layer, part), module).weight.detach().numpy().astype(np.float32)
            if module in ("q_proj", "k_proj"):
                heads = c.num_attention_heads if module == "q_proj" else c.num_key_value_heads
                w = _llama_cpp_permute(w, heads)
            if shape_lie and i == 1 and module == "up_proj":
                w = w[:-32]
            kind = getattr(gguf.GGMLQuantizationType, kinds.get(module, "Q4_1"))
            data = w if kind.name in ("F32", "F16") else quantize(w, kind)
            writer.add_tensor(
                f"blk.{i}.{short}.weight",
                data.astype(np.float16) if kind.name == "F16" else data,
                raw_dtype=kind,
            )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def gguf_base(tmp_path_factory):
    torch.manual_seed(5)
    config = tiny_llama_config(512, hidden_size=64, intermediate_size=96)
    model = AutoModelForCausalLM.from_config(config).eval()
    path = tmp_path_factory.mktemp("gguf")
    model.save_pretrained(path)
    return model, path


@pytest.mark.parametrize(
    "kinds", [{}, {"q_proj": "Q8_0", "k_proj": "Q8_0", "v_proj": "Q8_0", "down_proj": "Q4_0"}]
)
def test_gguf_blocks_are_served_as_shipped(gguf_base, kinds, dot, tmp_path) -> None:
    model, path = gguf_base
    file = _write_gguf(model, tmp_path / "m.gguf", kinds)
    runner = NativeLlamaRunner(path, quantization="gguf", gguf_file=file, kv_cache_tokens=256)
    for name, target in runner.weight_targets.items():  # exactly gguf's own dequantization, unpermuted
        module = model.get_submodule(name)
        short = name.split(".")[-1]
        kind = getattr(gguf.GGMLQuantizationType, kinds.get(short, "Q4_1"))
        w = module.weight.detach().numpy()
        expected = torch.from_numpy(dequantize(quantize(w, kind), kind))  # rows quantize independently
        assert torch.equal(target.read(), expected), name
    ref = _dequantized_reference(model, runner)
    if dot == "int":
        int8_inputs(ref, quantized_names(runner))
    logits = runner.prefill([PrefillInput(0, PROMPTS[0], 0, BASE_SLOT)]).logits
    with torch.no_grad():
        torch.testing.assert_close(logits[0], ref(torch.tensor([PROMPTS[0]])).logits[0, -1], **EXACT)


@pytest.mark.parametrize("head", ["Q8_0", "Q4_0", "F32"])
def test_gguf_embedding_and_head_of_a_supported_type_serve_from_their_blocks(
    gguf_base, head, dot, tmp_path
) -> None:
    """The embedding's and LM head's blocks (a supported type) replace the float32 matrices: the
    logits are the dense reference's with both dequantized as gguf does; F32 ones leave the
    float32 matrices."""
    model, path = gguf_base
    file = _write_gguf(model, tmp_path / "m.gguf", {}, head=head)
    runner = NativeLlamaRunner(path, quantization="gguf", gguf_file=file, kv_cache_tokens=256)
    ref = _dequantized_reference(model, runner)
    if head == "F32":
        assert runner.model.head_q is None and runner.model.embed_q is None
    else:
        kind = getattr(gguf.GGMLQuantizationType, head)
        assert runner.model.head_q is not None and runner.model.embed_q is not None
        assert (
            runner.model.lm_head is None
            and runner.model.embed is not None
            and runner.model.embed.numel() == 0
        )
        for module, weight in (
            (ref.model.embed_tokens, runner.model.embed_q),
            (ref.lm_head, runner.model.head_q),
        ):
            expected = torch.from_numpy(dequantize(quantize(module.weight.detach().numpy(), kind), kind))
            assert torch.equal(weight.dequantize(), expected)
            module.weight.data = expected.clone()
    if dot == "int":
        int8_inputs(ref, quantized_names(runner))
    for n in (1, 3):  # the kernel's streaming path, then its batched one
        logits = runner.prefill([PrefillInput(10 * n + i, PROMPTS[i], 0, BASE_SLOT) for i in range(n)]).logits
        with torch.no_grad():
            for i in range(n):
                expected_logits = ref(torch.tensor([PROMPTS[i]])).logits[0, -1]
                torch.testing.assert_close(logits[i], expected_logits, **EXACT)


def _tensor_type_offset(data: bytes, name: str) -> int:
    """Where the named tensor's type field sits in a GGUF header (name, n_dims, dims, type)."""
    encoded = name.encode()
    at = data.index(struct.pack("<Q", len(encoded)) + encoded) + 8 + len(encoded)
    n_dims = struct.unpack_from("<I", data, at)[0]
    return at + 4 + 8 * n_dims


def test_hostile_gguf_files_are_clear_errors(gguf_base, tmp_path) -> None:
    model, path = gguf_base
    good = _write_gguf(model, tmp_path / "good.gguf", {}).read_bytes()

    def runner_on(data: bytes):
        file = tmp_path / "bad.gguf"
        file.write_bytes(data)
        return NativeLlamaRunner(path, quantization="gguf", gguf_file=file, kv_cache_tokens=256)

    with pytest.raises(GgufError, match="not a readable GGUF file"):
        runner_on(good[: len(good) // 2])  # truncated
    with pytest.raises(GgufError, match="not a readable GGUF file"):
        runner_on(b"GGUF" + b"\xff" * 60)  # garbage header
    unknown = bytearray(good)
    struct.pack_into("<I", unknown, _tensor_type_offset(good, "blk.0.attn_v.weight"), 977)
    with pytest.raises(GgufError, match="not a readable GGUF file"):
        runner_on(bytes(unknown))
    with pytest.raises(GgufError, match=r"blk\.1\.ffn_up\.weight is \(64, 64\).*needs \(96, 64\)"):
        runner_on(_write_gguf(model, tmp_path / "lie.gguf", {}, shape_lie=True).read_bytes())
    with pytest.raises(GgufError, match=r"blk\.0\.ffn_gate\.weight is F16.*supported: Q8_0, Q4_0, Q4_1"):
        runner_on(_write_gguf(model, tmp_path / "f16.gguf", {"gate_proj": "F16"}).read_bytes())


def test_quantizing_in_row_chunks_equals_one_pass() -> None:
    w = torch.randn(37, 77)
    for kind, one in (("int8", quantized.quantize_int8), ("int4", quantized.quantize_int4)):
        assert torch.equal(quantized.quantize(w, kind, rows=8).dequantize(), one(w).dequantize()), kind
    with pytest.raises(ValueError, match="int8 or int4"):
        quantized.quantize(w, "gguf")


def test_the_read_checkpoint_equals_the_mapped_one(saved, tmp_path) -> None:
    from server.engine.native.model import Checkpoint, ReadCheckpoint

    _, path = saved
    mapped, read = Checkpoint(path), ReadCheckpoint(path)
    assert set(mapped) == set(read) and len(read) == len(mapped)
    for name in mapped:
        assert read[name].dtype == mapped[name].dtype and torch.equal(read[name], mapped[name]), name
    cut = tmp_path / "cut"
    cut.mkdir()
    data = next(path.glob("*.safetensors")).read_bytes()
    (cut / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated"):
        truncated = ReadCheckpoint(cut)
        for name in truncated:
            truncated[name]
    (cut / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        ReadCheckpoint(cut)


def test_serve_refuses_merged_mode_with_quantization_before_loading_anything(monkeypatch) -> None:
    from typer.testing import CliRunner

    from server.cli import app

    monkeypatch.setenv("LORAPLEX_QUANTIZATION", "gguf")  # the env var is read too
    result = CliRunner().invoke(app, ["serve", "--mode", "merged", "--port", "18999"])
    assert result.exit_code == 2
    assert "--mode merged cannot be used with --quantization gguf" in " ".join(result.output.split())


# ------------------------------------------------------------------ the compiled small decode step


def _count_parts_layers(monkeypatch, runner: NativeLlamaRunner) -> list[int]:
    assert runner.model.fused is not None and runner.model.fused_parts is not None
    calls: list[int] = []
    fused = runner.model.fused
    real = fused.parts_layers
    monkeypatch.setattr(fused, "parts_layers", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _three_paths_agree(runners: list[NativeLlamaRunner], adapter_slot: int, dot: str) -> None:
    """runners: the one-call path, the compiled steps with the projections from Python, PyTorch's
    ops. Five sequences, 2 and 4 with an adapter; base-only steps, steps with adapter rows, and one
    above ``ONE_THREAD_ROWS``: equal logits (with int8 inputs: within ``INT_PATHS_TOL``)."""
    slots = [BASE_SLOT, BASE_SLOT, adapter_slot, BASE_SLOT, adapter_slot]
    plans = [[0], [1, 3], [0, 2], [3, 4, 1], [0, 1, 2, 3, 4]]  # sequences per step
    for runner in runners:
        runner.prefill([PrefillInput(i, PROMPTS[i % 3], 0, slots[i]) for i in range(5)])
    for step, plan in enumerate(plans * 2):
        rows = [DecodeInput(seq, 9 + step, slots[seq]) for seq in plan]
        outputs = [runner.decode(rows) for runner in runners]
        for other in outputs[1:]:
            torch.testing.assert_close(outputs[0], other, **tolerance(dot))


@needs_kernel
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_small_quantized_decode_steps_in_one_call_equal_the_unfused_steps(
    saved, kind, dot, peft_adapter_factory, monkeypatch
) -> None:
    model, path = saved
    runners = [NativeLlamaRunner(path, quantization=kind, kv_cache_tokens=1024) for _ in range(3)]
    calls = _count_parts_layers(monkeypatch, runners[0])
    runners[1].model.fused_parts = None  # the compiled steps between projections run from Python
    runners[2].model.fused = None  # PyTorch's ops
    adapter_dir, _ = peft_adapter_factory(model, f"one-call-{kind}", **ADAPTERS["all"])
    slot = [
        AdapterSlots(r.lora_targets, 2, r.slots_changed).acquire(
            load_adapter_dir(adapter_dir, "all", r.base_shapes)
        )
        for r in runners
    ]
    assert len(set(slot)) == 1
    _three_paths_agree(runners, slot[0], dot)
    assert len(calls) == 2 * 2  # the base-only steps: [0] and [1, 3], twice


@needs_kernel
def test_small_gguf_decode_steps_in_one_call_equal_the_unfused_steps(
    gguf_base, tmp_path, dot, peft_adapter_factory, monkeypatch
) -> None:
    """A GGUF file mixing block types inside a fused projection (Q4_1 q and v beside a Q8_0 k: a
    stacked qkv; a Q4_0 down): the one-call step equals the unfused ones."""
    model, path = gguf_base
    file = _write_gguf(model, tmp_path / "m.gguf", {"k_proj": "Q8_0", "down_proj": "Q4_0"})
    runners = [
        NativeLlamaRunner(path, quantization="gguf", gguf_file=file, kv_cache_tokens=1024) for _ in range(3)
    ]
    assert isinstance(runners[0].model.layers[0].qkv.quantized_weight(), quantized.StackedWeight)
    calls = _count_parts_layers(monkeypatch, runners[0])
    runners[1].model.fused_parts = None
    runners[2].model.fused = None
    adapter_dir, _ = peft_adapter_factory(model, "one-call-gguf", **ADAPTERS["qv"])
    slot = [
        AdapterSlots(r.lora_targets, 2, r.slots_changed).acquire(
            load_adapter_dir(adapter_dir, "qv", r.base_shapes)
        )
        for r in runners
    ]
    _three_paths_agree(runners, slot[0], dot)
    assert len(calls) == 2 * 2
