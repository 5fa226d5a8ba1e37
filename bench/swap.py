"""Merged hot-swap on the embedded model: swap latency, drift, merged throughput, mode choice.

Measured in one run, on the same machine:
1. swap latency (median ms): loraplex (restore from the checkpoint + merge in float32) vs the
   naive in-place `W -= s·B·A; W += s'·B'·A'` vs PEFT (`unmerge_adapter` + `set_adapter` +
   `merge_adapter`), all-linear rank-16 adapters, float32 (the CPU serving dtype);
2. drift after 10,000 alternating swaps in bfloat16: loraplex vs PEFT. To keep PEFT's 10,000
   swaps within minutes, these adapters adapt the 7 linear layers of decoder layer 0 only
   (`layers_to_transform=[0]`); drift is the max |W - W_base| over those weights;
3. decode throughput, 16 requests of one adapter: merged vs the bare base (target >= 0.97x);
4. three workloads, 48 requests arriving at once, 32 new tokens each (EOS ignored): one adapter
   only; 90% on one adapter; uniform over 8 adapters: tokens/s of merged, unmerged and auto.

Run: `make bench` or `.venv/bin/python bench/swap.py`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.peft_format import load_adapter_dir
from bench.common import ROOT, machine_description, median
from server.engine.base_model import embedded_model_dir
from server.engine.engine import Engine, EngineConfig
from server.engine.hf_runner import HFRunner
from server.engine.merge import MergeManager
from server.engine.requests import GenerationRequest
from server.engine.sampling import SamplingParams
from tests.synthetic import make_random_peft_adapter

ALL_LINEAR = dict(r=16, lora_alpha=32, target_modules="all-linear")
LAYER0 = dict(
    r=16,
    lora_alpha=32,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    layers_to_transform=[0],
)


def load(model_dir: Path, dtype: torch.dtype):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


# ----------------------------------------------------------------------------- 1. latency


def swap_latency(model_dir: Path, adapter_dirs: list[Path], swaps: int) -> dict[str, float]:
    runner = HFRunner(load(model_dir, torch.float32), own_weights=True)
    layers = runner.layers
    adapters = [load_adapter_dir(p, p.name, runner.base_shapes) for p in adapter_dirs[:2]]
    ours = merge_manager_swaps(runner, model_dir, adapters, swaps)

    naive = []  # subtract the old update and add the new one in place: what drifts
    pairs = [[(layers[n].base.weight, w) for n, w in a.layers.items()] for a in adapters]
    with torch.no_grad():
        for weight, w in pairs[0]:
            weight += w.scale * (w.B @ w.A)
        for i in range(swaps):
            start = time.perf_counter()
            for weight, w in pairs[i % 2]:
                weight -= w.scale * (w.B @ w.A)
            for weight, w in pairs[(i + 1) % 2]:
                weight += w.scale * (w.B @ w.A)
            naive.append(time.perf_counter() - start)

    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(load(model_dir, torch.float32), adapter_dirs[0], adapter_name="a")
    peft_model.load_adapter(adapter_dirs[1], adapter_name="b")
    peft_model.merge_adapter(["a"])
    theirs = []
    names = ["a", "b"]
    for i in range(swaps):
        start = time.perf_counter()
        peft_model.unmerge_adapter()
        peft_model.set_adapter(names[(i + 1) % 2])
        peft_model.merge_adapter()
        theirs.append(time.perf_counter() - start)
    native = {
        layout: native_swap_seconds(model_dir, adapter_dirs, swaps, layout) for layout in ("dense", "packed")
    }
    return {
        "loraplex": ours, "naive": median(naive), "peft": median(theirs),
        "native-dense": native["dense"], "native-packed": native["packed"],
    }  # fmt: skip


def native_swap_seconds(model_dir: Path, adapter_dirs: list[Path], swaps: int, layout: str) -> float:
    """Median swap on the native runner's fused weights, dense or oneDNN-packed (``--weight-layout``):
    the restore and the merge read and write each fused projection through its layout."""
    from server.engine.native import NativeLlamaRunner

    runner = NativeLlamaRunner(model_dir, kv_cache_tokens=64, weight_layout=layout)
    adapters = [load_adapter_dir(p, p.name, runner.base_shapes) for p in adapter_dirs[:2]]
    return merge_manager_swaps(runner, model_dir, adapters, swaps)


def merge_manager_swaps(runner, model_dir: Path, adapters: list, swaps: int) -> float:
    """Median seconds of loraplex's swap (``MergeManager.merge``) between two adapters on a runner;
    the base is checked to come back bit for bit afterwards."""
    manager = MergeManager(runner.weight_targets, model_dir, can_merge=True)
    manager.merge(adapters[0])
    times = []
    for i in range(swaps):
        start = time.perf_counter()
        manager.merge(adapters[(i + 1) % 2])
        times.append(time.perf_counter() - start)
    manager.merge(None)
    assert manager.digest() == manager.digest_at_load, "the base must come back bit for bit"
    return median(times)


# ----------------------------------------------------------------------------- 2. drift


def drift(model_dir: Path, adapter_dirs: list[Path], swaps: int) -> dict[str, float]:
    runner = HFRunner(load(model_dir, torch.bfloat16), own_weights=True)
    layers, shapes = runner.layers, runner.base_shapes
    adapters = [load_adapter_dir(p, p.name, shapes) for p in adapter_dirs[:2]]
    touched = sorted(adapters[0].layers)
    originals = {n: layers[n].base.weight.detach().clone() for n in touched}
    manager = MergeManager(runner.weight_targets, model_dir, can_merge=True)
    for i in range(swaps):
        manager.merge(adapters[i % 2])
    manager.merge(None)
    ours = max((layers[n].base.weight.float() - originals[n].float()).abs().max().item() for n in touched)

    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(load(model_dir, torch.bfloat16), adapter_dirs[0], adapter_name="a")
    peft_model.load_adapter(adapter_dirs[1], adapter_name="b")
    peft_base = dict(peft_model.base_model.model.named_modules())
    for i in range(swaps):
        peft_model.set_adapter(["a", "b"][i % 2])
        peft_model.merge_adapter()
        peft_model.unmerge_adapter()
    theirs = max(
        (peft_base[n].base_layer.weight.float() - originals[n].float()).abs().max().item() for n in touched
    )
    return {"loraplex": ours, "peft": theirs, "modules": len(touched)}


# ----------------------------------------------------------------------------- 3 and 4. throughput


def run_engine(
    model_dir, tokenizer, adapter_dirs, mode: str, plan: list[int | None], new_tokens: int
) -> float:
    """Tokens/s for requests (adapter index or None per request), all submitted at once."""
    engine = Engine.for_hf_model(
        load(model_dir, torch.float32), tokenizer, EngineConfig(mode=mode, checkpoint_dir=model_dir)
    )
    adapters = [load_adapter_dir(p, p.name, engine.base_shapes) for p in adapter_dirs]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me about the history of bread."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(prompt)["input_ids"]
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    # warm-up with the first request's adapter: merged mode swaps it in before the clock starts
    first = None if plan[0] is None else adapters[plan[0]]
    engine.submit(GenerationRequest(prompt_ids=ids, params=SamplingParams(max_new_tokens=2), adapter=first))
    engine.run_until_idle()
    start = time.perf_counter()
    for index in plan:
        engine.submit(
            GenerationRequest(
                prompt_ids=ids, params=params, adapter=None if index is None else adapters[index]
            )
        )
    engine.run_until_idle()
    return len(plan) * new_tokens / (time.perf_counter() - start)


def median_of_rounds(rounds: int, runs: dict) -> dict[str, float]:
    """Run every entry once per round, in turn; keep each entry's median."""
    results: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            results[name].append(run())
    return {name: median(values) for name, values in results.items()}


def workloads(n: int, seed: int = 0) -> dict[str, list[int | None]]:
    rng = random.Random(seed)
    ninety = [0 if rng.random() < 0.9 else rng.randrange(1, 8) for _ in range(n)]
    return {
        "one adapter only": [0] * n,
        "90% on one adapter": ninety,
        "uniform over 8 adapters": [i % 8 for i in range(n)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--latency-swaps", type=int, default=20)
    parser.add_argument("--drift-swaps", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="throughput runs per system (median kept)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/swap-cpu.md")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    model_dir = embedded_model_dir(Path("~/.cache/loraplex").expanduser())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = load(model_dir, torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        full = [Path(tmp) / f"full{i}" for i in range(8)]
        layer0 = [Path(tmp) / f"layer0-{i}" for i in range(2)]
        for i, path in enumerate(full):
            make_random_peft_adapter(base, path, seed=i, b_scale=0.02, **ALL_LINEAR)
        for i, path in enumerate(layer0):
            make_random_peft_adapter(base, path, seed=100 + i, b_scale=0.02, **LAYER0)
        del base

        latency = swap_latency(model_dir, full, args.latency_swaps)
        print("latency", latency, flush=True)
        drifted = drift(model_dir, layer0, args.drift_swaps)
        print("drift", drifted, flush=True)
        # This machine is noisy: every throughput is the median of --rounds runs, the systems
        # compared taking turns within each round.
        single_runs = {"base": (None, "unmerged"), "merged": (0, "merged"), "unmerged": (0, "unmerged")}
        single = median_of_rounds(
            args.rounds,
            {
                name: (
                    lambda a=adapter, m=mode: run_engine(
                        model_dir, tokenizer, full[:1], m, [a] * 16, args.new_tokens
                    )
                )
                for name, (adapter, mode) in single_runs.items()
            },
        )
        print("single", single, flush=True)
        modes = {}
        for name, plan in workloads(args.requests).items():
            modes[name] = median_of_rounds(
                args.rounds,
                {
                    mode: (
                        lambda m=mode, p=plan: run_engine(model_dir, tokenizer, full, m, p, args.new_tokens)
                    )
                    for mode in ("merged", "unmerged", "auto")
                },
            )
            print(name, modes[name], flush=True)

    report = render(args, latency, drifted, single, modes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)


def render(args, latency, drifted, single, modes) -> str:
    ratio_naive = latency["loraplex"] / latency["naive"]
    merged_vs_base = single["merged"] / single["base"]
    lines = [
        "# Merged hot-swap on the embedded model (CPU)",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine_description()}",
        "- command: `make bench  (.venv/bin/python bench/swap.py)`",
        "- model: SmolLM2-135M-Instruct; adapters: random PEFT LoRA, rank 16, all 210 linear layers",
        "",
        f"## Swap latency (median of {args.latency_swaps} swaps between two adapters, float32)",
        "",
        "| method | ms per swap | vs naive |",
        "| --- | ---: | ---: |",
        f"| loraplex (restore from checkpoint + float32 merge, bit-exact) | {latency['loraplex'] * 1e3:.1f} | "
        f"{ratio_naive:.2f}x {'(met: <= 1.5x)' if ratio_naive <= 1.5 else '(missed: target <= 1.5x)'} |",
        f"| naive in place (`W -= sBA; W += s'B'A'`, drifts) | {latency['naive'] * 1e3:.1f} | 1.00x |",
        f"| PEFT (`unmerge_adapter` + `set_adapter` + `merge_adapter`) | {latency['peft'] * 1e3:.1f} | "
        f"{latency['peft'] / latency['naive']:.2f}x |",
        f"| loraplex, native runner, dense fused weights | {latency['native-dense'] * 1e3:.1f} | "
        f"{latency['native-dense'] / latency['naive']:.2f}x |",
        "| loraplex, native runner, oneDNN-packed weights "
        "(the CPU default: restore and merge into a dense copy, pack once) | "
        f"{latency['native-packed'] * 1e3:.1f} | {latency['native-packed'] / latency['naive']:.2f}x |",
        "",
        "The first three rows run on Hugging Face's modules (`HFRunner`); the native runner's rows on",
        "its fused projections, where a swap packs each touched projection into oneDNN's layout once",
        "(unpacking it only where some rows are not rewritten first): the price of its faster decode",
        "steps (`bench/results/efficiency-cpu.md`).",
        "",
        "Extra memory of loraplex's exact restore: none resident (the original weights are re-read from the",
        "model's safetensors checkpoint with pread; only models without a checkpoint that reproduces the",
        "loaded weights keep an in-memory copy of the affected layers).",
        "",
        f"## Drift after {args.drift_swaps:,} alternating swaps, bfloat16",
        "",
        f"Adapters on the {drifted['modules']} linear layers of decoder layer 0 (so PEFT's swaps fit in minutes).",
        "",
        "| method | max abs drift of the base weights |",
        "| --- | ---: |",
        f"| loraplex | {drifted['loraplex']:.3g} {'(met: 0)' if drifted['loraplex'] == 0 else '(missed: target 0)'} |",
        f"| PEFT merge/unmerge | {drifted['peft']:.3g} |",
        "",
        f"## Decode throughput, 16 requests of one adapter, {args.new_tokens} new tokens "
        f"(median of {args.rounds} rounds)",
        "",
        "| serving | tokens/s | vs base only |",
        "| --- | ---: | ---: |",
        f"| base model only | {single['base']:.1f} | 1.00x |",
        f"| merged | {single['merged']:.1f} | {merged_vs_base:.2f}x "
        f"{'(met: >= 0.97x)' if merged_vs_base >= 0.97 else '(missed: target >= 0.97x)'} |",
        f"| unmerged | {single['unmerged']:.1f} | {single['unmerged'] / single['base']:.2f}x |",
        "",
        f"## Serving modes, {args.requests} requests at once, {args.new_tokens} new tokens each "
        f"(tokens/s, median of {args.rounds} rounds)",
        "",
        "| workload | merged | unmerged | auto | auto vs best (target within 5%) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in modes.items():
        best = max(r.values())
        gap = 1 - r["auto"] / best
        lines.append(
            f"| {name} | {r['merged']:.1f} | {r['unmerged']:.1f} | {r['auto']:.1f} | "
            f"{-gap * 100:+.1f}% {'(met)' if gap <= 0.05 else '(missed)'} |"
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
