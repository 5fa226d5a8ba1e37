"""Shared pieces of the benchmarks: machine description, a loraplex server subprocess, stats."""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import torch

from adapters.torch_threads import confine_this_thread, in_passing_thread

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def on_engine_thread(fn: Callable[[], T]) -> T:
    """``fn()`` on a thread of its own, as `loraplex serve` steps its engine (``Engine.start``):
    the process's only OpenMP team (``adapters/torch_threads.py``). libgomp spins at a region's end
    only while the process holds no more OpenMP threads than cores, so a bench that loaded its
    models with a team on the main thread and stepped beside it measured every parallel op with a
    futex wake-up (a batch-16 step of the embedded model 66-74 ms against 46 ms), which the server
    no longer pays. So a bench calls :func:`teamless_main_thread` first and runs its loads and
    measurements here: the thread ends, and its team with it."""
    return in_passing_thread(fn, "bench-engine")


def teamless_main_thread() -> None:
    """The main thread runs PyTorch on one thread from here on: it opens no OpenMP team beside the
    measured threads' (:func:`on_engine_thread`)."""
    confine_this_thread()


def machine_description() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    # PyTorch's count on a new thread (the engine's): a bench's main thread may be confined to one
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem_gb:.0f} GiB RAM{gpu}, Python {platform.python_version()}, "
        f"torch {torch.__version__} ({in_passing_thread(torch.get_num_threads, 'probe')} threads)"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(values: list[float]) -> float:
    return statistics.median(values)


@dataclass
class ServerProcess:
    """``loraplex serve`` in a subprocess on loopback, for end-to-end measurements."""

    process: subprocess.Popen
    url: str
    log: Path  # the server's stderr (its log): a file, never a pipe nobody reads

    @classmethod
    def start(cls, args: list[str], timeout: float = 180.0, cwd: Path = ROOT) -> ServerProcess:
        """The log goes to a temporary file: a pipe read by no one fills after ~64 KiB of access
        lines, and the server then blocks on its next log write (a long bench's requests stall)."""
        port = free_port()
        cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
        log = Path(tempfile.mkstemp(prefix="loraplex-bench-server-", suffix=".log")[1])
        with log.open("w") as stderr:
            process = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        server = cls(process, f"http://127.0.0.1:{port}", log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()[-4000:]}")
            try:
                if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        server.stop()
        raise RuntimeError("server did not become ready")

    def memory_kib(self, field: str) -> int:
        """``VmRSS`` (now) or ``VmHWM`` (peak) of the server process, from /proc."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.unlink(missing_ok=True)


@contextlib.contextmanager
def server_on_fresh_data(model: str | None) -> Iterator[tuple[ServerProcess, list[str]]]:
    """``loraplex serve`` (warning-level log) on a data directory made for it and removed after;
    yields the server and its arguments (for the report)."""
    with tempfile.TemporaryDirectory() as tmp:
        serve_args = ["--data-dir", str(Path(tmp) / "data"), "--log-level", "warning"]
        serve_args += ["--model", model] if model else []
        server = ServerProcess.start(serve_args)
        try:
            yield server, serve_args
        finally:
            server.stop()


def write_random_adapter(
    shapes: dict, out_dir: Path, *, seed: int, r: int, lora_alpha: float, b_scale: float = 0.02
) -> Path:
    """A random all-linear PEFT LoRA adapter for a base with these layer ``shapes`` (name ->
    ``BaseLinearShape``), written straight in PEFT's format: no model object needed, so it works
    for a runner that never builds a Hugging Face model (and for large random bases). Only the
    linear layers: a runner's shapes also name its embedding and LM head, which ``all-linear``
    does not select (as in PEFT)."""
    import json

    from safetensors.torch import save_file

    from adapters.peft_format import linear_shapes

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in sorted(linear_shapes(shapes).items()):
        a = torch.randn(r, shape.in_features, generator=generator) / shape.in_features**0.5
        b = torch.randn(shape.out_features, r, generator=generator) * b_scale
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": lora_alpha, "target_modules": "all-linear"}
    (out_dir / "adapter_config.json").write_text(json.dumps(config))
    return out_dir


RANDOM_PRESETS = {
    # the embedded model's shapes
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
    ),
    # Llama-3-8B's shapes
    "llama3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
    ),
}  # fmt: skip


def write_random_llama(out_dir: Path, preset: str, dtype: torch.dtype, device: str = "cpu") -> Path:
    """A Llama checkpoint with random weights and the shapes of ``preset``, plus a word-level
    tokenizer ``t0 .. t<V-1>`` (no download: speed depends on shapes, not on trained values)."""
    import json

    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    c = RANDOM_PRESETS[preset]
    h, inter, heads, kv = (
        c["hidden_size"],
        c["intermediate_size"],
        c["num_attention_heads"],
        c["num_key_value_heads"],
    )
    d = h // heads
    generator = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (
            (torch.randn(*shape, generator=generator, device=device, dtype=torch.float32) * 0.02)
            .to(dtype)
            .cpu()
        )

    tensors = {
        "model.embed_tokens.weight": rand(c["vocab_size"], h),
        "model.norm.weight": torch.ones(h, dtype=dtype),
    }
    if not c["tie_word_embeddings"]:
        tensors["lm_head.weight"] = rand(c["vocab_size"], h)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        for name, shape in (
            ("self_attn.q_proj", (heads * d, h)), ("self_attn.k_proj", (kv * d, h)), ("self_attn.v_proj", (kv * d, h)),
            ("self_attn.o_proj", (h, heads * d)), ("mlp.gate_proj", (inter, h)), ("mlp.up_proj", (inter, h)),
            ("mlp.down_proj", (h, inter)),
        ):  # fmt: skip
            tensors[f"{p}.{name}.weight"] = rand(*shape)
        tensors[f"{p}.input_layernorm.weight"] = torch.ones(h, dtype=dtype)
        tensors[f"{p}.post_attention_layernorm.weight"] = torch.ones(h, dtype=dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"))
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": str(dtype)[6:], **c,
    }  # fmt: skip
    (out_dir / "config.json").write_text(json.dumps(config))
    vocab = {f"t{i}": i for i in range(c["vocab_size"])}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level, unk_token="t0", pad_token="t0", eos_token="t2"
    )
    tokenizer.save_pretrained(out_dir)
    return out_dir
