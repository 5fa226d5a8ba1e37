"""Quantized base weights on the CPU: decode tokens/s, perplexity and peak RSS per --quantization.

One child process per form (none, int8, int4, gguf) and dot product (``--dots``: the quantized
kernels' ``float`` inputs or ``int`` ones, quantized to int8 blocks; ``--quant-dot``) loads the
embedded model on the native runner the way the server does (``load_native``) and measures its
peak RSS (``ru_maxrss``), RSS once loaded and the perplexity of a fixed English text (the
prompt's token log-probabilities): once in one prefill ("perplexity": its 127 rows exceed the
kernels' 64, so PyTorch multiplies the dequantized weights, whatever the dot product) and once
in prefill chunks of 32 tokens ("kernel perplexity": every projection on the compiled kernels, as
decode steps run). Then one process loads every variant and times decode steps at batch 1 and 16
(runner level: one step = every row's next token), the variants alternating step by step so that
a shared machine's load hits each alike; the median of ``--steps`` steps after two warm-up steps.

    nice python -m bench.quantized --steps 20 --out bench/results/quantized-cpu.md

Ratios are only meaningful within one run (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

FORMS = ("none", "int8", "int4", "gguf")
TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden press adapted from those used to make "
    "wine. Books, which had been copied by hand, could now be produced in hundreds of identical "
    "copies. Within fifty years presses were working in more than two hundred cities across Europe, "
    "and the price of books fell sharply. Scholars could compare the same text in different places, "
    "errors were corrected in later editions, and new ideas spread faster than ever before. The "
    "press also changed how people learned to read, since cheap pamphlets and calendars reached "
    "households that had never owned a book."
)


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


CHUNK = 32  # prefill chunk of the kernel perplexity (at most quant_cpu.MAX_ROWS rows a call)


def variant(form: str, dot: str) -> str:
    """A row's name: the form, and for a quantized one its dot product (``int4/int``)."""
    return form if form == "none" else f"{form}/{dot}"


def _parse(name: str) -> tuple[str, str]:
    form, _, dot = name.partition("/")
    return form, dot or "float"


def _load(name: str, cache_dir: Path, kv_tokens: int):
    from server.engine.base_model import load_native
    from server.engine.native import quant_cpu

    form, dot = _parse(name)
    quant_cpu.configure_dot(dot)  # type: ignore[arg-type]
    return load_native(None, "float32", "cpu", cache_dir, quantization=form, kv_cache_tokens=kv_tokens)


def _perplexity(runner, ids: list[int], seq: int, chunk: int) -> float:
    """exp(-mean log p(token | before)) over ids[1:], prefilled ``chunk`` tokens at a time."""
    import torch

    from server.engine.lora_linear import BASE_SLOT
    from server.engine.runner import PrefillInput

    logprobs: list[torch.Tensor] = []
    last = torch.zeros(0)  # the previous chunk's next-token log-probabilities
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        out = runner.prefill([PrefillInput(seq, part, start, BASE_SLOT, want_token_logprobs=True)])
        if start:  # the chunk's first token, from the previous chunk's last logits
            logprobs.append(last[ids[start]].reshape(1))
        logprobs.append(out.token_logprobs[seq].double())
        last = out.logits[0].double().log_softmax(-1)
    runner.release([seq])
    return float(torch.exp(-torch.cat(logprobs).mean()))


def child(name: str, cache_dir: Path) -> dict:
    """Load one variant alone: its load time, RSS and perplexities (memory figures need a process each)."""
    import torch

    from server.engine.native import quant_cpu

    start = time.perf_counter()
    base = _load(name, cache_dir, 1024)  # a small KV budget: the figures are the weights and the runtime
    load_s = time.perf_counter() - start
    runner = base.runner
    assert runner is not None
    loaded_rss = _rss_mib()
    ids = base.tokenizer(TEXT)["input_ids"]
    return {
        "form": name,
        "load_s": load_s,
        "loaded_rss_mib": loaded_rss,
        "perplexity": _perplexity(runner, ids, 0, len(ids)),
        "kernel_perplexity": _perplexity(runner, ids, 1, CHUNK),
        "dot": quant_cpu.describe() if _parse(name)[0] != "none" else "-",
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }


def speed(forms: list[str], steps: int, cache_dir: Path) -> dict[str, dict[str, float]]:
    """Every form loaded in one process; decode steps alternate between forms, round by round, so
    each form sees the same machine load (a shared machine's noise hits every form alike)."""
    from server.engine.lora_linear import BASE_SLOT
    from server.engine.native import quant_cpu
    from server.engine.runner import DecodeInput, PrefillInput

    bases = {form: _load(form, cache_dir, 2048) for form in forms}
    prompt = bases[forms[0]].tokenizer(TEXT)["input_ids"][:32]
    result: dict[str, dict[str, float]] = {form: {} for form in forms}
    for batch in (1, 16):
        seqs = list(range(100, 100 + batch))
        times: dict[str, list[float]] = {form: [] for form in forms}
        for form in forms:
            quant_cpu.configure_dot(_parse(form)[1])  # type: ignore[arg-type]
            bases[form].runner.prefill([PrefillInput(s, prompt, 0, BASE_SLOT) for s in seqs])
        for i in range(steps + 2):
            for form in forms if i % 2 == 0 else reversed(forms):
                quant_cpu.configure_dot(_parse(form)[1])  # type: ignore[arg-type]
                t = time.perf_counter()
                bases[form].runner.decode([DecodeInput(s, 5 + i, BASE_SLOT) for s in seqs])
                times[form].append(time.perf_counter() - t)
        for form in forms:
            bases[form].runner.release(seqs)
            step = statistics.median(times[form][2:])
            result[form][f"step_ms_b{batch}"] = step * 1e3
            result[form][f"tok_s_b{batch}"] = batch / step
    return result


LLAMA3_8B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16",
)  # fmt: skip


def make_llama8b(directory: Path, cache_dir: Path) -> Path:
    """A randomly initialised Llama-3-8B-shaped checkpoint (bfloat16, one shard per layer), with the
    embedded model's tokenizer (its ids all lie inside the vocabulary). Made once; never downloaded."""
    import torch
    from safetensors.torch import save_file

    from server.engine.base_model import embedded_model_dir, load_tokenizer

    if (directory / "done").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    c = LLAMA3_8B
    h, inter, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * 128
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    save_file({"model.embed_tokens.weight": rand(c["vocab_size"], h), "lm_head.weight": rand(c["vocab_size"], h),
               "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}, str(directory / "model-head.safetensors"))  # fmt: skip
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        tensors = {
            f"{p}.self_attn.q_proj.weight": rand(h, h), f"{p}.self_attn.k_proj.weight": rand(kv, h),
            f"{p}.self_attn.v_proj.weight": rand(kv, h), f"{p}.self_attn.o_proj.weight": rand(h, h),
            f"{p}.mlp.gate_proj.weight": rand(inter, h), f"{p}.mlp.up_proj.weight": rand(inter, h),
            f"{p}.mlp.down_proj.weight": rand(h, inter),
            f"{p}.input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            f"{p}.post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        }  # fmt: skip
        save_file(tensors, str(directory / f"model-{i:05d}.safetensors"))
    (directory / "config.json").write_text(json.dumps(c))
    load_tokenizer(embedded_model_dir(cache_dir)).save_pretrained(directory)
    (directory / "done").write_text("")
    return directory


def llama8b_child(directory: Path, steps: int) -> dict:
    """Serve the 8B-shaped checkpoint with int4 and a rank-16 LoRA adapter on q/v: RSS and decode
    tokens/s at batch 1 and 16 (half the rows with the adapter)."""
    import torch

    from server.engine.base_model import load_native
    from server.engine.lora_linear import BASE_SLOT
    from server.engine.runner import DecodeInput, PrefillInput

    start = time.perf_counter()
    base = load_native(str(directory), "float32", "cpu", directory, quantization="int4", kv_cache_tokens=1024)
    load_s = time.perf_counter() - start
    runner = base.runner
    assert runner is not None
    gen = torch.Generator().manual_seed(1)
    for name, target in runner.lora_targets.items():  # an adapter in slot 0 on every q and v
        if name.endswith(("q_proj", "v_proj")):
            A = torch.randn(16, target.in_features, generator=gen) * 0.01
            B = torch.randn(target.out_features, 16, generator=gen) * 0.01
            target.set_slot(0, A, B, 2.0)
    runner.slots_changed()
    result = {"form": "int4 Llama-3-8B-shaped", "load_s": load_s, "loaded_rss_mib": _rss_mib()}
    for batch in (1, 16):
        seqs = list(range(batch))
        slots = [0 if i % 2 == 0 else BASE_SLOT for i in seqs]
        runner.prefill(
            [
                PrefillInput(s, [1, 15, 27, 300, 41, 9, 7, 8], 0, slot)
                for s, slot in zip(seqs, slots, strict=True)
            ]
        )
        times = []
        for i in range(steps + 1):
            t = time.perf_counter()
            runner.decode([DecodeInput(s, 5 + i, slot) for s, slot in zip(seqs, slots, strict=True)])
            times.append(time.perf_counter() - t)
        runner.release(seqs)
        result[f"tok_s_b{batch}"] = batch / statistics.median(times[1:])
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def render(results: list[dict], args: argparse.Namespace) -> str:
    by = {r["form"]: r for r in results}
    ref = by.get("none")
    lines = [
        "# Quantized base weights on the CPU (embedded SmolLM2-135M, native runner)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{ref['threads'] if ref else '?'} torch threads; shared with other jobs (noisy): compare ratios "
        "within this run only.",
        f"Command: `nice python -m bench.quantized --steps {args.steps} --dots {' '.join(args.dots)}` "
        "(RSS and perplexity: one process per "
        "form; decode: runner-level steps, forms alternating in one process, median; no adapters).",
        "",
        "| form | dot | batch 1 tok/s | x float32 | batch 16 tok/s | x float32 | perplexity | x float32 | "
        "kernel perplexity | x float32 | peak RSS MiB | x float32 | RSS loaded MiB | load s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:

        def ratio(key: str, digits: int = 2, r: dict = r) -> str:
            return f"{r[key] / ref[key]:.{digits}f}" if ref else "-"

        lines.append(
            f"| {r['form']} | {r['dot']} | {r['tok_s_b1']:.1f} | {ratio('tok_s_b1')} | {r['tok_s_b16']:.1f} | "
            f"{ratio('tok_s_b16')} | {r['perplexity']:.3f} | {ratio('perplexity')} | "
            f"{r['kernel_perplexity']:.3f} | {ratio('kernel_perplexity', 3)} | {r['peak_rss_mib']:.0f} | "
            f"{ratio('peak_rss_mib')} | {r['loaded_rss_mib']:.0f} | {r['load_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    parser.add_argument(
        "--dots", nargs="+", default=[os.environ.get("LORAPLEX_QUANT_DOT", "float")], choices=("float", "int")
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/loraplex").expanduser())
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument(
        "--llama8b", type=Path, default=None,
        help="also serve a random Llama-3-8B-shaped checkpoint made in this directory (16 GB of disk) with int4",
    )  # fmt: skip
    parser.add_argument("--llama8b-child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.llama8b_child:
        print(json.dumps(llama8b_child(args.llama8b_child, args.steps)))
        return
    if args.child:
        print(json.dumps(child(args.child, args.cache_dir)))
        return
    results = []
    names = list(dict.fromkeys(variant(form, dot) for form in args.forms for dot in args.dots))
    for name in names:
        command = [
            sys.executable,
            "-m",
            "bench.quantized",
            "--child",
            name,
            "--cache-dir",
            str(args.cache_dir),
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), file=sys.stderr)
    for form, figures in speed(names, args.steps, args.cache_dir).items():
        next(r for r in results if r["form"] == form).update(figures)
    table = render(results, args)
    if args.llama8b:
        make_llama8b(args.llama8b, args.cache_dir)
        command = [
            sys.executable,
            "-m",
            "bench.quantized",
            "--llama8b-child",
            str(args.llama8b),
            "--steps",
            "4",
        ]
        big = json.loads(
            subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1]
        )
        print(json.dumps(big), file=sys.stderr)
        table += (
            f"\nLlama-3-8B-shaped random checkpoint (bfloat16 on disk, made by the benchmark), int4, a rank-16 "
            f"q/v adapter on half the rows: peak RSS {big['peak_rss_mib'] / 1024:.2f} GiB, RSS loaded "
            f"{big['loaded_rss_mib'] / 1024:.2f} GiB (target <= 7 GB), load {big['load_s']:.0f} s, "
            f"{big['tok_s_b1']:.2f} tok/s at batch 1, {big['tok_s_b16']:.2f} tok/s at batch 16.\n"
        )
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
