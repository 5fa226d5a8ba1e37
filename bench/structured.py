"""Structured output on the embedded model: tokens/s with and without constraints, in one run.

The engine (native runner, float32) decodes 16 chat requests, 64 new tokens each, in one batch:
1. free: no grammar (EOS ignored, so every row makes 64 tokens);
2. constrained: every row has a JSON-schema grammar (an array of at least 20 records: no row can
   finish within 64 tokens, so the work equals the free run's);
3. mixed: 8 constrained rows and 8 free rows in the same batch;
4. a realistic schema (one record, bounded strings) that rows finish with EOS: tokens/s, and the
   share of outputs that validate.
Rounds interleave the workloads; medians are kept. The per-token mask cost is the engine's own
count (``GrammarStats``): time spent computing and unpacking masks per constrained row-token.

Run: `make bench` or `.venv/bin/python bench/structured.py`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, machine_description, median
from server.engine.base_model import build_engine_for_dir, embedded_model_dir
from server.engine.engine import Engine, EngineConfig
from server.engine.grammar import Grammar
from server.engine.requests import Event, FinishEvent, GenerationRequest
from server.engine.sampling import SamplingParams

RECORD = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 40},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
LONG = {"type": "array", "items": RECORD, "minItems": 20}  # cannot be complete within 64 tokens
NAMES = ["Alice", "Bob", "Chen", "Dara", "Emil", "Fatima", "Goran", "Hana",
         "Ivan", "Juana", "Kofi", "Lena", "Marco", "Nadia", "Omar", "Priya"]  # fmt: skip


def prompts(engine: Engine, n: int) -> list[list[int]]:
    tokenizer = engine.tokenizer
    out = []
    for i in range(n):
        question = f"Give the record of {NAMES[i % len(NAMES)]}, {20 + i} years old, as JSON."
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def run(
    engine: Engine, prompt_ids: list[list[int]], grammars: list[Grammar | None], new_tokens: int
) -> tuple[float, list[FinishEvent]]:
    """All requests in one batch; (seconds, their finish events)."""
    sinks: list[list[Event]] = []
    for ids, grammar in zip(prompt_ids, grammars, strict=True):
        events: list[Event] = []
        sinks.append(events)
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=grammar is None)
        engine.submit(GenerationRequest(list(ids), params, None, sink=events.append, grammar=grammar))
    start = time.perf_counter()
    engine.run_until_idle()
    seconds = time.perf_counter() - start
    finishes = [next(e for e in events if isinstance(e, FinishEvent)) for events in sinks]
    return seconds, finishes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "structured-cpu.md")
    args = parser.parse_args()
    model_dir = embedded_model_dir(Path("~/.cache/loraplex").expanduser())
    engine = build_engine_for_dir(
        model_dir,
        "native",
        torch.float32,
        torch.device("cpu"),
        EngineConfig(mode="unmerged", max_batch=args.rows),
    )
    grammars = engine.grammars
    start = time.perf_counter()
    grammars.lltokenizer  # noqa: B018  # built once, on the first structured request
    tokenizer_seconds = time.perf_counter() - start
    start = time.perf_counter()
    long, record = grammars.compile_json_schema(LONG), grammars.compile_json_schema(RECORD)
    compile_ms = (time.perf_counter() - start) / 2 * 1000
    ids = prompts(engine, args.rows)
    half = args.rows // 2
    workloads = {
        "free (no grammar)": [None] * args.rows,
        "constrained (every row)": [long] * args.rows,
        f"mixed ({half} constrained, {args.rows - half} free)": [long] * half + [None] * (args.rows - half),
    }
    run(engine, ids[:2], [long, None], 4)  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in workloads}
    mask: dict[str, list[tuple[float, int]]] = {name: [] for name in workloads}
    for _ in range(args.rounds):
        for name, rows in workloads.items():
            before = (grammars.stats.mask_seconds, grammars.stats.masked_rows)
            elapsed, finishes = run(engine, ids, rows, args.new_tokens)
            assert all(f.generated_tokens == args.new_tokens for f in finishes), name
            seconds[name].append(elapsed)
            mask[name].append(
                (grammars.stats.mask_seconds - before[0], grammars.stats.masked_rows - before[1])
            )
    tokens = args.rows * args.new_tokens
    realistic: list[tuple[float, list[FinishEvent]]] = [
        run(engine, ids, [record] * args.rows, 128) for _ in range(args.rounds)
    ]
    report = render(args, tokenizer_seconds, compile_ms, workloads, seconds, mask, tokens, realistic)
    args.out.write_text(report)
    print(report)


def render(args, tokenizer_seconds, compile_ms, workloads, seconds, mask, tokens, realistic) -> str:
    free = median(seconds["free (no grammar)"])
    lines = [
        "# Structured output on the embedded model (CPU)",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine_description()}",
        "- command: `make bench  (.venv/bin/python bench/structured.py)`",
        f"- model: SmolLM2-135M-Instruct, native runner, float32; {args.rows} chat requests in one batch, "
        f"{args.new_tokens} new tokens each, greedy; median of {args.rounds} interleaved rounds",
        "- grammar engine: llguidance (`server/engine/grammar.py`); tokenizer table built once in "
        f"{tokenizer_seconds:.2f} s; a schema compiles in {compile_ms:.1f} ms",
        "",
        "## Tokens/s with and without constraints (same work: every row makes every token)",
        "",
        "| workload | tokens/s | vs free | mask ms per constrained token (row) | mask share of the run |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in workloads:
        t = median(seconds[name])
        spent = [s / n * 1000 for s, n in mask[name] if n]
        share = median([s / total for (s, _), total in zip(mask[name], seconds[name], strict=True)])
        per_token = f"{median(spent):.3f}" if spent else "-"
        lines.append(f"| {name} | {tokens / t:.1f} | {free / t:.2f}x | {per_token} | {share:.1%} |")
    done = [f for _, finishes in realistic for f in finishes]
    valid = sum(_valid(f) for f in done)
    produced = median([sum(f.generated_tokens for f in finishes) / s for s, finishes in realistic])
    eos = sum(f.finish_reason == "eos_token" for f in done)
    lines += [
        "",
        "## A realistic schema (one record: name, age, city; strings at most 40 characters)",
        "",
        f"{args.rows} constrained requests (max 128 new tokens): {produced:.1f} tokens/s; "
        f"{eos}/{len(done)} ended with EOS, {valid}/{len(done)} parse and validate against the schema.",
        "",
        "The mask cost is measured by the engine: computing each constrained row's next-token bitmask "
        "(llguidance) and unpacking it to a boolean row of 49,152 entries, per constrained row and "
        "token. Applying it (a masked fill of that row's logits) is part of sampling; with advancing each "
        "row's grammar state, it is the rest of the gap to the free run. The realistic run's tokens/s is "
        "lower because rows that end leave the batch, so its last steps run fewer rows.",
        "",
    ]
    return "\n".join(lines)


def _valid(finish: FinishEvent) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(finish.generated_text), RECORD)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


if __name__ == "__main__":
    main()
