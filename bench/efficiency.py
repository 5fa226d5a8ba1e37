"""Engine efficiency against this machine's floor, in one run: runners, batch sizes, LoRA, HTTP.

The floor is the work every engine must do in a decode step: one pass over all the model's
linear layers (the LM head included) with the real weights at the same batch size, plain
``x @ W.T`` and nothing else. At these batch sizes a step is bound by streaming the weights from
memory, so floor time / step time says how much of a step is overhead (attention, norms, LoRA,
Python, sampling). Measured in the same run as the steps, interleaved, medians of many.

1. decode step of the engine (no HTTP) for each runner at batch 1, 16 and 64: base rows only,
   and rows spread over 4 all-linear rank-16 adapters (the LoRA overhead is the ratio);
2. over HTTP: 16 concurrent base requests of 96 new tokens through `loraplex serve` (prefill
   included), against the same workload submitted to the engine directly; efficiency =
   floor(16) x 96 steps / wall time;
3. start-up time (process start to /health 200, graph capture included) and peak RSS;
4. with ``--peft``: the mixed workload (32 requests spread over 4 adapters and the base, 64 new
   tokens each, EOS ignored) through the engine against PEFT's mixed-batch ``generate`` on the
   same model and device.

``--random-model smollm2-135m|llama3-8b`` measures a randomly initialised Llama of those shapes
(speed depends on shapes only; nothing is downloaded), e.g. on a GPU:
``python bench/efficiency.py --device cuda --dtype bfloat16 --random-model llama3-8b --runners native --no-http``.

Run: `make bench` or `.venv/bin/python bench/efficiency.py [--runners native,hf]`;
results in bench/results/efficiency-<device>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.peft_format import LoraAdapter, load_adapter_dir
from bench.common import ROOT, ServerProcess, machine_description, write_random_adapter, write_random_llama
from server.engine.base_model import embedded_model_dir
from server.engine.engine import Engine, EngineConfig
from server.engine.native import onednn
from server.engine.requests import GenerationRequest
from server.engine.sampling import SamplingParams

BATCHES = (1, 16, 64)
NUM_ADAPTERS = 4
PROMPT = "Tell me about the history of bread, from the first flat loaves to the modern bakery."
HTTP_REQUESTS = 16
HTTP_NEW_TOKENS = 96


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- the floor


def linear_weights(model_dir: Path, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Every linear layer's weight [out, in] as the checkpoint stores it, plus the LM head."""
    weights: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                if name.endswith("proj.weight") or name in ("lm_head.weight", "model.embed_tokens.weight"):
                    weights[name] = f.get_tensor(name).to(device, dtype)
    if "lm_head.weight" not in weights:  # tied embeddings: the head reads the embedding matrix
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    weights.pop("model.embed_tokens.weight", None)
    return list(weights.values())


def packed_weights(weights: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """The same weights in oneDNN's packed layout (what the native runner reads on the CPU in
    float32), or None where that layout does not apply."""
    if weights[0].device.type != "cpu" or weights[0].dtype != torch.float32 or not onednn.available():
        return None
    return [onednn.pack(w) for w in weights]


def floor_seconds(weights: list[torch.Tensor], batch: int, reps: int) -> float:
    """Median time of one pass of ``x @ W.T`` over every weight, x: [batch, in]; through oneDNN
    when the weights are packed (``packed_weights``)."""
    device, dtype = weights[0].device, weights[0].dtype
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], device=device, dtype=dtype) for w in weights}
    times = []
    with torch.inference_mode():
        for _ in range(reps + 2):
            sync(device)
            start = time.perf_counter()
            for w in weights:
                if w.is_mkldnn:
                    onednn.linear(inputs[w.shape[1]], w)
                else:
                    torch.mm(inputs[w.shape[1]], w.t())
            sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


# ----------------------------------------------------------------------------- engine steps


# The native runner's variants the bench can compare in one run: name -> (CLI flags, runner options).
# name -> (the server's flags, the native runner's options, the engine's config)
@dataclass(frozen=True)
class Variant:
    """A native-runner configuration: its server flags, and the same as runner options and engine
    config for the engine built in this process."""

    flags: list[str]
    runner_options: dict[str, str] = field(default_factory=dict)
    engine_config: dict[str, str] = field(default_factory=dict)


NATIVE_VARIANTS: dict[str, Variant] = {
    "native": Variant([]),  # defaults: blocked weights, eager decode, LoRA backend compiled-cpu (grouped, C)
    "native-pytorch-lora": Variant(
        ["--lora-backend", "grouped"], engine_config={"lora_backend": "grouped"}
    ),  # grouped as PyTorch ops
    "native-segmented": Variant(["--lora-backend", "segmented"], engine_config={"lora_backend": "segmented"}),
    "native-dense": Variant(
        ["--weight-layout", "dense"], runner_options={"weight_layout": "dense"}
    ),  # plain x @ W.T
    "native-compiled": Variant(["--compile", "on"], runner_options={"compile": "on"}),
}


def runner_flags(runner: str) -> list[str]:
    """``hf`` or one of ``NATIVE_VARIANTS`` as the server's CLI flags."""
    if runner in NATIVE_VARIANTS:
        return ["--runner", "native", *NATIVE_VARIANTS[runner].flags]
    return ["--runner", runner]


def build_engine(runner: str, model_dir: Path, dtype: torch.dtype, device: torch.device, **config) -> Engine:
    from server.engine.base_model import build_engine_for_dir

    variant = NATIVE_VARIANTS.get(runner)
    kind = "native" if variant is not None else runner
    return build_engine_for_dir(
        model_dir, kind, dtype, device,
        EngineConfig(mode="unmerged", **config, **(variant.engine_config if variant else {})),
        **(variant.runner_options if variant else {}),
    )  # fmt: skip


def decode_step_seconds(
    engine: Engine, prompt_ids: list[int], adapters: list[LoraAdapter | None], steps: int
) -> float:
    """Median decode-step time with ``len(adapters)`` rows running (row i reads adapters[i])."""
    params = SamplingParams(max_new_tokens=steps + 8, ignore_eos=True)
    for adapter in adapters:
        engine.submit(GenerationRequest(list(prompt_ids), params, adapter, sink=lambda _: None))
    engine._drain_inbox(block=False)
    while engine.num_waiting or len(engine._rows) < len(adapters):
        engine.step()  # admission and prefill, not measured
    engine.step()
    times = []
    for _ in range(steps):
        sync(engine.runner.device)
        start = time.perf_counter()
        engine.step()
        sync(engine.runner.device)
        times.append(time.perf_counter() - start)
    for row in engine._rows:
        row.request.cancel()
    engine.run_until_idle()
    return statistics.median(times)


def engine_workload_seconds(engine: Engine, prompt_ids: list[int], requests: int, new_tokens: int) -> float:
    """Wall time for ``requests`` base requests of ``new_tokens`` each, submitted at once (prefill included)."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    sync(engine.runner.device)
    start = time.perf_counter()
    for _ in range(requests):
        engine.submit(GenerationRequest(list(prompt_ids), params, None, sink=lambda _: None))
    engine.run_until_idle()
    sync(engine.runner.device)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- HTTP


async def _http_round(url: str, requests: int, new_tokens: int) -> float:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": new_tokens, "ignore_eos": True}}
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=requests + 4)) as client:
        start = time.perf_counter()
        responses = await asyncio.gather(
            *(client.post(url + "/generate", json=body) for _ in range(requests))
        )
        elapsed = time.perf_counter() - start
    for response in responses:
        response.raise_for_status()
        assert response.json()["details"]["generated_tokens"] == new_tokens
    return elapsed


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--runners",
        default="native,native-pytorch-lora,native-dense,hf",
        help="runners to measure, in order: " + ", ".join([*NATIVE_VARIANTS, "hf"]),
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians kept)")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per measurement")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: embedded)")
    parser.add_argument("--no-http", action="store_true", help="skip the HTTP part")
    parser.add_argument(
        "--random-model", default=None, help="a random Llama of these shapes (bench/common.py)"
    )
    parser.add_argument("--peft", action="store_true", help="also compare the mixed workload with PEFT")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    batches = [int(b) for b in args.batches.split(",")]
    scratch = tempfile.TemporaryDirectory()
    if args.random_model:
        model_dir = write_random_llama(Path(scratch.name) / "model", args.random_model, dtype, args.device)
        args.model = f"random {args.random_model}"
        text = " ".join(f"t{7 * i + 3}" for i in range(24))
    else:
        model_dir = args.model or embedded_model_dir(Path("~/.cache/loraplex").expanduser())
        text = PROMPT
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = tokenizer(text)["input_ids"]
    runners = [r for r in args.runners.split(",") if r]
    weights = linear_weights(model_dir, dtype, device)
    packed = packed_weights(weights)

    floors: dict[int, list[float]] = {b: [] for b in batches}
    packed_floors: dict[int, list[float]] = {b: [] for b in batches}
    steps: dict[tuple[str, str, int], list[float]] = {}
    workload: dict[str, list[float]] = {r: [] for r in runners}
    with tempfile.TemporaryDirectory() as tmp:
        engines = {r: build_engine(r, model_dir, dtype, device, max_batch=max(batches)) for r in runners}
        graphs = {r: getattr(e.runner, "graphs", None) for r, e in engines.items()}
        adapter_dirs = make_adapters(engines[runners[0]], Path(tmp))
        adapters = {
            r: [load_adapter_dir(p, p.name, e.base_shapes) for p in adapter_dirs] for r, e in engines.items()
        }
        for round_index in range(args.rounds):
            for batch in batches:
                floors[batch].append(floor_seconds(weights, batch, args.steps))
                if packed is not None:
                    packed_floors[batch].append(floor_seconds(packed, batch, args.steps))
                for runner, engine in engines.items():
                    mixed = [adapters[runner][i % NUM_ADAPTERS] for i in range(batch)]
                    pair = [("base", [None] * batch), ("lora", mixed)]
                    for name, rows in pair if round_index % 2 == 0 else pair[::-1]:  # ABBA: no order bias
                        steps.setdefault((runner, name, batch), []).append(
                            decode_step_seconds(engine, prompt_ids, rows, args.steps)
                        )
            if args.no_http:  # else measured beside the HTTP rounds, interleaved (measure_http)
                for runner, engine in engines.items():
                    workload[runner].append(
                        engine_workload_seconds(engine, prompt_ids, HTTP_REQUESTS, HTTP_NEW_TOKENS)
                    )
        peft = (
            measure_peft(engines[runners[0]], model_dir, adapter_dirs, prompt_ids, dtype, device)
            if args.peft
            else {}
        )
        warm_up = {
            r: (g.warm_up_seconds, g.captures) for r, g in graphs.items() if g is not None
        }  # graphs made at start-up, then in all the steps above (recompiles would show here)
        http = {} if args.no_http else measure_http(engines, prompt_ids, model_dir, args, Path(tmp))
        for runner, measured in http.items():
            workload[runner] = measured["engine"]
        del engines
    scratch.cleanup()

    med = {k: statistics.median(v) for k, v in steps.items()}
    # LoRA overhead from each round's pair (its base and adapter steps ran back to back): this
    # machine's speed drifts between rounds by more than the overhead itself
    overhead = {
        (r, b): statistics.median(
            lora / base - 1 for base, lora in zip(steps[(r, "base", b)], steps[(r, "lora", b)], strict=True)
        )
        for r in runners
        for b in batches
    }
    floor = {b: statistics.median(v) for b, v in floors.items()}
    packed_floor = {b: statistics.median(v) for b, v in packed_floors.items() if v}
    report = render(
        args, runners, batches, floor, packed_floor, med, overhead,
        {r: statistics.median(v) for r, v in workload.items()}, http, peft,
    )  # fmt: skip
    for runner, (seconds, captures) in warm_up.items():
        report += (
            f"\n{runner}: decode graphs compiled or captured at start-up in {seconds:.1f} s; "
            f"{captures} graphs in all by the end of the run.\n"
        )
    out = args.out or ROOT / f"bench/results/efficiency-{device.type}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(report)


def make_adapters(engine: Engine, root: Path) -> list[Path]:
    """Four random all-linear rank-16 adapters for the engine's base (PEFT format on disk)."""
    return [
        write_random_adapter(engine.base_shapes, root / f"all-linear-r16-{i}", seed=i, r=16, lora_alpha=32)
        for i in range(NUM_ADAPTERS)
    ]


def measure_http(
    engines: dict[str, Engine], prompt_ids: list[int], model_dir: Path, args, root: Path
) -> dict[str, dict]:
    """Per runner: start-up seconds, HTTP wall seconds (median of rounds), peak RSS in MiB, and the
    same workload submitted to an engine in this process, in rounds interleaved with the HTTP ones
    (``engine``: their times), so that served / engine compares the two under the same load."""
    results = {}
    for runner, engine in engines.items():
        start = time.perf_counter()
        server = ServerProcess.start(
            [*runner_flags(runner), "--mode", "unmerged", "--data-dir", str(root / f"data-{runner}"),
             "--device", args.device, "--dtype", args.dtype, *(["--model", str(model_dir)] if args.model else [])],
            timeout=900.0,  # --compile on compiles at start-up: minutes on a small CPU
        )  # fmt: skip
        startup = time.perf_counter() - start
        try:
            asyncio.run(_http_round(server.url, HTTP_REQUESTS, 4))  # warm-up
            walls, engine_walls = [], []
            for _ in range(args.rounds):
                engine_walls.append(
                    engine_workload_seconds(engine, prompt_ids, HTTP_REQUESTS, HTTP_NEW_TOKENS)
                )
                walls.append(asyncio.run(_http_round(server.url, HTTP_REQUESTS, HTTP_NEW_TOKENS)))
            peak = server.memory_kib("VmHWM") / 1024
        finally:
            server.stop()
        results[runner] = {
            "startup": startup, "wall": statistics.median(walls), "peak_mib": peak, "engine": engine_walls,
        }  # fmt: skip
    return results


def measure_peft(
    engine: Engine, model_dir: Path, adapter_dirs, prompt_ids, dtype, device, rounds: int = 2
) -> dict:
    """Tokens/s of the mixed workload: this engine against PEFT's mixed-batch ``generate``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    requests, new_tokens = 32, 64
    names = [None if i % 5 == 4 else i % 5 for i in range(requests)]
    adapters = [load_adapter_dir(p, p.name, engine.base_shapes) for p in adapter_dirs]
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    ours = []
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        for n in names:
            engine.submit(
                GenerationRequest(
                    list(prompt_ids), params, None if n is None else adapters[n], sink=lambda _: None
                )
            )
        engine.run_until_idle()
        sync(device)
        ours.append(requests * new_tokens / (time.perf_counter() - start))
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    model = PeftModel.from_pretrained(base, adapter_dirs[0], adapter_name="a0")
    for i, path in enumerate(adapter_dirs[1:], start=1):
        model.load_adapter(path, adapter_name=f"a{i}")
    ids = torch.tensor([prompt_ids] * requests, device=device)
    adapter_names = ["__base__" if n is None else f"a{n}" for n in names]
    theirs = []
    with torch.inference_mode():
        for _ in range(rounds):
            sync(device)
            start = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=adapter_names,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)  # fmt: skip
            sync(device)
            theirs.append(requests * new_tokens / (time.perf_counter() - start))
    return {"loraplex": statistics.median(ours), "peft": statistics.median(theirs)}


def render(args, runners, batches, floor, packed_floor, step, overhead, workload, http, peft) -> str:
    ms = 1000.0
    lines = [
        "# Engine efficiency against the floor",
        "",
        f"- date: {dt.date.today().isoformat()}",
        f"- machine: {machine_description()}",
        f"- command: `.venv/bin/python bench/efficiency.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"- model: {args.model or 'embedded SmolLM2-135M-Instruct'}, {args.dtype}, {args.device}; "
        f"{args.rounds} interleaved rounds, median of {args.steps} steps each",
        "- floor: one pass of `x @ W.T` over every linear layer (LM head included), real weights, same batch",
        "- packed floor: the same pass through oneDNN with the weights in its packed layout (what the "
        "native runner reads on the CPU in float32); `-` where that layout does not apply",
        "- efficiency = floor / step (packed eff. = packed floor / step); LoRA rows: 4 random all-linear "
        "rank-16 adapters, row i reads adapter i mod 4; LoRA overhead: median over rounds of the "
        "adapter step / base step of the same round, less 1 (the two run back to back, in alternating "
        "order from round to round)",
        "- runners: `native` (defaults: LoRA backend `compiled-cpu`, the grouped form compiled from C), "
        "`native-pytorch-lora` (`--lora-backend grouped`: the same as PyTorch ops), `native-segmented` "
        "(`--lora-backend segmented`), "
        "`native-dense` (`--weight-layout dense`), `hf` (Hugging Face's model code)",
        "",
        "| runner | batch | floor ms | packed floor ms | base step ms | efficiency | packed eff. "
        "| 4 adapters step ms | efficiency | LoRA overhead |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for runner in runners:
        for b in batches:
            base, lora = step[(runner, "base", b)], step[(runner, "lora", b)]
            packed = packed_floor.get(b)
            packed_cells = f"{packed * ms:.1f} | " if packed else "- | "
            lines.append(
                f"| {runner} | {b} | {floor[b] * ms:.1f} | {packed_cells}{base * ms:.1f} | {floor[b] / base:.2f} | "
                f"{f'{packed / base:.2f}' if packed else '-'} | {lora * ms:.1f} | {floor[b] / lora:.2f} | "
                f"{100 * overhead[(runner, b)]:+.1f}% |"
            )
    if peft:
        lines += [
            "",
            "## Mixed workload against PEFT (32 requests over 4 adapters + base, 64 tokens, same device)",
            "",
            f"loraplex ({runners[0]} runner, engine): {peft['loraplex']:.0f} tok/s; PEFT mixed-batch generate: "
            f"{peft['peft']:.0f} tok/s; ratio {peft['loraplex'] / peft['peft']:.2f}x.",
        ]
    if 16 not in floor:
        return "\n".join(lines) + "\n"
    ideal = floor[16] * HTTP_NEW_TOKENS
    lines += [
        "",
        f"## {HTTP_REQUESTS} concurrent base requests of {HTTP_NEW_TOKENS} tokens, prefill included",
        "",
        f"Ideal (floor at batch 16 x {HTTP_NEW_TOKENS} steps): {ideal:.2f} s.",
        "",
        "| runner | engine only s | efficiency | over HTTP s | efficiency | served / engine | start-up s | peak RSS MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for runner in runners:
        engine_s = workload[runner]
        h = http.get(runner)
        http_cells = (
            f"{h['wall']:.2f} | {ideal / h['wall']:.2f} | {engine_s / h['wall']:.2f} | {h['startup']:.1f} | "
            f"{h['peak_mib']:.0f}"
            if h
            else "- | - | - | - | -"
        )
        lines.append(f"| {runner} | {engine_s:.2f} | {ideal / engine_s:.2f} | {http_cells} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
