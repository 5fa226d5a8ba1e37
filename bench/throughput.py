"""Throughput of mixed-adapter traffic: loraplex (over HTTP) vs PEFT, on the embedded model.

Workload (the engine issue's): 16 concurrent requests spread over 4 adapters + the bare base
(request i uses adapter i mod 5, 4 meaning no adapter), greedy, chat-formatted prompts, in two
variants: "fixed" (exactly 64 new tokens each, EOS ignored: equal work for every system) and
"eos" (up to 64 new tokens, each request stops at its EOS: what a server really sees; a static
batch keeps computing finished rows, continuous batching drops them).

Systems, measured in one run on the same machine:
- loraplex: a `loraplex serve` subprocess, 16 concurrent streaming requests over loopback;
- loraplex, base only: the same requests without adapters (the LoRA overhead is the ratio);
- PEFT mixed batch: one `generate(adapter_names=[...])` call over the 16 prompts;
- PEFT sequential: `set_adapter` per adapter, one batched `generate` per adapter group
  (the way a hand-rolled PEFT script serves several adapters).

Run: `make bench` or `.venv/bin/python bench/throughput.py [--rounds N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, ServerProcess, machine_description, median, percentile
from server.engine.base_model import embedded_model_dir
from tests.synthetic import make_random_peft_adapter

QUESTIONS = [
    "What is the capital of France?",
    "Explain photosynthesis in one paragraph.",
    "Write a short poem about autumn leaves.",
    "List three uses of a paperclip.",
    "Why is the sky blue?",
    "Give me a recipe for pancakes.",
    "What does a compiler do?",
    "Describe the water cycle.",
]
ADAPTER_SETS = {
    "qv-r16": dict(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
    "all-linear-r16": dict(r=16, lora_alpha=32, target_modules="all-linear"),
}
NUM_ADAPTERS = 4


@dataclass(frozen=True)
class Workload:
    name: str  # "fixed" or "eos"
    new_tokens: int
    ignore_eos: bool
    rounds: int


def prompts_for(tokenizer, n: int) -> list[str]:
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for i in range(n)
    ]


def adapter_of(i: int) -> int | None:
    """Request i uses adapter i mod 5; 4 is the bare base."""
    return None if i % (NUM_ADAPTERS + 1) == NUM_ADAPTERS else i % (NUM_ADAPTERS + 1)


# ----------------------------------------------------------------------------- loraplex


async def _one_stream(
    client: httpx.AsyncClient, url: str, prompt: str, adapter: str | None, new_tokens: int, ignore_eos: bool
):
    parameters = {"adapter_id": adapter, "max_new_tokens": new_tokens, "ignore_eos": ignore_eos}
    body = {"inputs": prompt, "parameters": parameters}
    start = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", url + "/generate_stream", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise RuntimeError(event["error"])
            tokens += 1
            if first is None:
                first = time.perf_counter() - start
    return tokens, first


async def _loraplex_round(
    url, prompts: list[str], adapters: list[str | None], new_tokens: int, ignore_eos: bool
):
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(
            *(
                _one_stream(client, url, p, a, new_tokens, ignore_eos)
                for p, a in zip(prompts, adapters, strict=True)
            )
        )
        elapsed = time.perf_counter() - start
    tokens = sum(r[0] for r in results)
    return tokens / elapsed, [r[1] for r in results]


def run_loraplex(server: ServerProcess, prompts, adapters, workload: Workload, rss_samples: list[int]):
    rates, ttfts = [], []
    for _ in range(workload.rounds):
        rate, firsts = asyncio.run(
            _loraplex_round(server.url, prompts, adapters, workload.new_tokens, workload.ignore_eos)
        )
        rss_samples.append(server.memory_kib("VmRSS"))
        rates.append(rate)
        ttfts.extend(firsts)
    return median(rates), ttfts


# ----------------------------------------------------------------------------- PEFT


def _generate(model, tokenizer, prompts: list[str], workload: Workload, **kwargs) -> int:
    """Batched ``generate``; returns the useful tokens (up to and including each row's EOS)."""
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    fixed = {"min_new_tokens": workload.new_tokens} if workload.ignore_eos else {}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=workload.new_tokens, do_sample=False, **fixed, **kwargs)
    new = out[:, inputs["input_ids"].shape[1] :]
    if workload.ignore_eos:
        return new.numel()
    eos = tokenizer.eos_token_id
    return sum(row.tolist().index(eos) + 1 if eos in row.tolist() else len(row) for row in new)


def run_peft_mixed(peft_model, tokenizer, prompts, names, workload: Workload) -> float:
    adapter_names = [n if n is not None else "__base__" for n in names]
    rates = []
    for _ in range(workload.rounds):
        start = time.perf_counter()
        tokens = _generate(peft_model, tokenizer, prompts, workload, adapter_names=adapter_names)
        rates.append(tokens / (time.perf_counter() - start))
    return median(rates)


def run_peft_sequential(peft_model, tokenizer, prompts, names, workload: Workload) -> float:
    groups: dict[str | None, list[str]] = {}
    for prompt, name in zip(prompts, names, strict=True):
        groups.setdefault(name, []).append(prompt)
    rates = []
    for _ in range(workload.rounds):
        start = time.perf_counter()
        tokens = 0
        for name, group in groups.items():
            if name is None:
                with peft_model.disable_adapter():
                    tokens += _generate(peft_model, tokenizer, group, workload)
            else:
                peft_model.set_adapter(name)
                tokens += _generate(peft_model, tokenizer, group, workload)
        rates.append(tokens / (time.perf_counter() - start))
    return median(rates)


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2, help="repetitions of each measurement (median kept)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--sets", default=",".join(ADAPTER_SETS), help="adapter sets to run")
    parser.add_argument("--workloads", default="fixed,eos", help="fixed (EOS ignored) and/or eos")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/throughput-cpu.md")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    model_dir = embedded_model_dir(Path("~/.cache/loraplex").expanduser())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = prompts_for(tokenizer, args.requests)
    sets = [s for s in args.sets.split(",") if s]
    workloads = [
        Workload(name, args.new_tokens, name == "fixed", args.rounds)
        for name in args.workloads.split(",")
        if name
    ]

    with tempfile.TemporaryDirectory() as tmp:
        adapter_specs, peft_models = [], {}
        for set_name in sets:
            for i in range(NUM_ADAPTERS):
                path = Path(tmp) / f"{set_name}-{i}"
                make_random_peft_adapter(base, path, seed=i, b_scale=0.02, **ADAPTER_SETS[set_name])
                adapter_specs += ["--adapter", f"{set_name}-{i}={path}"]
            peft_models[set_name] = _load_peft(base, Path(tmp), set_name)

        server = ServerProcess.start([*adapter_specs, "--data-dir", str(Path(tmp) / "data")])
        rss: list[int] = []
        results: dict[tuple[str, str], dict] = {}
        base_results: dict[str, dict] = {}
        try:
            warmup = Workload("warmup", 4, True, 1)
            run_loraplex(server, prompts, [None] * len(prompts), warmup, rss)  # not measured
            for workload in workloads:
                rate, ttft = run_loraplex(server, prompts, [None] * len(prompts), workload, rss)
                base_results[workload.name] = dict(rate=rate, ttft=ttft)
                for set_name in sets:
                    names = [
                        None if adapter_of(i) is None else f"{set_name}-{adapter_of(i)}"
                        for i in range(len(prompts))
                    ]
                    rate, ttft = run_loraplex(server, prompts, names, workload, rss)
                    model = peft_models[set_name]
                    results[(workload.name, set_name)] = dict(
                        rate=rate,
                        ttft=ttft,
                        peft_mixed=run_peft_mixed(model, tokenizer, prompts, names, workload),
                        peft_seq=run_peft_sequential(model, tokenizer, prompts, names, workload),
                    )
            peak_kib = server.memory_kib("VmHWM")
        finally:
            server.stop()

    report = render(args, workloads, results, base_results, max(rss), peak_kib)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)


def _load_peft(base, root: Path, set_name: str):
    import copy

    from peft import PeftModel

    model = PeftModel.from_pretrained(
        copy.deepcopy(base), root / f"{set_name}-0", adapter_name=f"{set_name}-0"
    )
    for i in range(1, NUM_ADAPTERS):
        model.load_adapter(root / f"{set_name}-{i}", adapter_name=f"{set_name}-{i}")
    return model.eval()


def render(args, workloads, results, base_results, rss_kib: int, peak_kib: int) -> str:
    command = f"make bench  (.venv/bin/python bench/throughput.py --rounds {args.rounds})"
    lines = [
        "# Throughput: mixed-adapter traffic on the embedded model (CPU)",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine_description()}",
        f"- command: `{command}`",
        f"- workload: {args.requests} concurrent requests, 4 adapters + base (request i -> adapter i mod 5), "
        f"greedy, SmolLM2-135M-Instruct float32, median of {args.rounds} rounds. `fixed`: exactly "
        f"{args.new_tokens} new tokens each (EOS ignored, equal work); `eos`: up to {args.new_tokens}, each "
        "request stops at its EOS (tokens/s counts the tokens each request really gets).",
        "- loraplex is measured end to end over HTTP (streaming, loopback); PEFT in-process with `generate`,",
        "  sequential = one batched `generate` per adapter group after `set_adapter`.",
        "",
        "| workload | adapters | loraplex tok/s | PEFT mixed batch tok/s | PEFT sequential tok/s "
        "| loraplex / PEFT mixed (target >= 3x) | LoRA overhead vs loraplex base-only (target <= 15%) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for workload in workloads:
        base = base_results[workload.name]
        lines.append(f"| {workload.name} | none (base only) | {base['rate']:.1f} | | | | |")
        for (w_name, set_name), r in results.items():
            if w_name != workload.name:
                continue
            ratio = r["rate"] / r["peft_mixed"]
            overhead = 1 - r["rate"] / base["rate"]
            # with EOS, adapters change how long each answer is: only the fixed workload compares equal work
            overhead_cell = (
                f"{overhead * 100:.1f}% {'(met)' if overhead <= 0.15 else '(missed)'}"
                if workload.ignore_eos
                else "n/a"
            )
            lines.append(
                f"| {w_name} | {set_name} | {r['rate']:.1f} | {r['peft_mixed']:.1f} | {r['peft_seq']:.1f} "
                f"| {ratio:.2f}x {'(met)' if ratio >= 3 else '(missed)'} | {overhead_cell} |"
            )
    lines += ["", f"Time to first token, loraplex, all {args.requests} requests sent at once (seconds):", ""]
    lines += ["| workload | adapters | median | p95 |", "| --- | --- | ---: | ---: |"]
    for workload in workloads:
        base = base_results[workload.name]
        lines.append(
            f"| {workload.name} | none | {median(base['ttft']):.3f} | {percentile(base['ttft'], 95):.3f} |"
        )
        for (w_name, set_name), r in results.items():
            if w_name == workload.name:
                lines.append(
                    f"| {w_name} | {set_name} | {median(r['ttft']):.3f} | {percentile(r['ttft'], 95):.3f} |"
                )
    lines += [
        "",
        f"Server memory: peak resident set over the server's life (VmHWM) {peak_kib / 2**20:.2f} GiB; "
        f"largest RSS sampled after a round {rss_kib / 2**20:.2f} GiB (target <= 1.6 GB; weights 0.54 GB).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
