"""Shared fixtures: a tiny random Llama (unit tests) and the embedded SmolLM2 (integration tests).

No test reaches a model hub. The tokenizer of the tiny model is the embedded model's, converted
once into the cache dir (``LORAPLEX_CACHE_DIR`` or ``~/.cache/loraplex``).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from server.engine import sgmv_cpu
from server.engine.base_model import embedded_model_dir
from tests.synthetic import make_random_peft_adapter

CACHE_DIR = Path(os.environ.get("LORAPLEX_CACHE_DIR", "~/.cache/loraplex")).expanduser()

# Tests share 2 cores with nothing else; one intra-op thread avoids oversubscription when
# tests run servers in threads, and keeps timings of tiny ops stable.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _compiled_lora_kernel_back_on():
    """Tests may turn the compiled kernels off (``sgmv_cpu.configure("off")``); the next test starts with them on."""
    yield
    sgmv_cpu.configure("auto")


@pytest.fixture(scope="module")
def single_torch_thread():
    """Tiny matrices gain nothing from threads, and on a busy 2-core box torch's spinning
    intra-op pool (next to numpy's BLAS pool) can slow such tests a hundredfold."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    return embedded_model_dir(CACHE_DIR)


@pytest.fixture(scope="session")
def tokenizer(embedded_dir: Path):
    return AutoTokenizer.from_pretrained(embedded_dir)


def tiny_llama_config(vocab_size: int, **overrides) -> LlamaConfig:
    values = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=2,
        pad_token_id=2,
        bos_token_id=1,
    )
    values.update(overrides)
    return LlamaConfig(**values)


@pytest.fixture(scope="session")
def tiny_base(tokenizer) -> LlamaForCausalLM:
    """A random 2-layer Llama with the embedded tokenizer's vocabulary (never modified: copy it)."""
    torch.manual_seed(1234)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer))).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture
def tiny_model(tiny_base) -> LlamaForCausalLM:
    return copy.deepcopy(tiny_base)


@pytest.fixture(scope="session")
def tiny_base_dir(tiny_base, tokenizer, tmp_path_factory) -> Path:
    """``tiny_base`` saved as a checkpoint with the embedded tokenizer: a folder the native runner
    (and ``loraplex serve --model``) loads."""
    path = tmp_path_factory.mktemp("tiny-base")
    tiny_base.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def embedded_model(embedded_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model


# Kept under this name for the tests; the implementation is shared with the benchmarks.
make_peft_adapter = make_random_peft_adapter


@pytest.fixture
def peft_adapter_factory(tmp_path: Path) -> Callable[..., tuple[Path, torch.nn.Module]]:
    """``factory(base, name, seed=..., **LoraConfig kwargs) -> (adapter dir, PEFT model)``."""

    def factory(base: torch.nn.Module, name: str, *, seed: int = 0, b_scale: float = 0.5, **kwargs):
        out = tmp_path / name
        kwargs.setdefault("r", 8)
        kwargs.setdefault("lora_alpha", 16)
        kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
        return out, make_peft_adapter(base, out, seed=seed, b_scale=b_scale, **kwargs)

    return factory
