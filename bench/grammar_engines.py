"""Which grammar engine for structured output: llguidance or xgrammar, measured on this CPU.

Both engines drive the same realistic JSON schema (nested object, array of objects, enum, bounded
integer and number, boolean, bounded strings) over the embedded SmolLM2 tokenizer (49,152 tokens),
along the same token path: a valid instance serialised as ``json.dumps`` does, tokenized by the
model's tokenizer. At each step the engine computes the next-token mask, then consumes the token.
Reported per engine: tokenizer set-up, schema compilation, and the per-token mask cost (mean,
median, p99), for one row and for 16 rows (each with its own matcher) per step. Each figure is
the fastest of 5 runs (the machine is shared).

This script is the measurement behind the README's choice; loraplex itself depends only on the
winner. Run: `.venv/bin/pip install xgrammar==0.2.8 && .venv/bin/python bench/grammar_engines.py`.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_description, percentile
from server.engine.base_model import embedded_model_dir, load_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "maxLength": 60},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
        "active": {"type": "boolean"},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string"},
            },
            "required": ["street", "city"],
            "additionalProperties": False,
        },
        "orders": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "item": {"type": "string"},
                    "price": {"type": "number"},
                },
                "required": ["id", "item", "price"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["name", "age", "role", "active", "tags", "address", "orders"],
    "additionalProperties": False,
}
INSTANCE = {
    "name": "Ada Lovelace",
    "age": 36,
    "email": "ada@example.org",
    "role": "admin",
    "active": True,
    "score": 97.5,
    "tags": ["math", "poetry", "engines"],
    "address": {"street": "12 St James's Square", "city": "London", "zip": "SW1Y 4JH"},
    "orders": [
        {"id": 1, "item": "Analytical Engine punch cards", "price": 12.25},
        {"id": 2, "item": "Notes on Menabrea", "price": 3.5},
    ],
}
ROWS = 16
REPEATS = 5
T = TypeVar("T")


def run_llguidance(tokenizer, tokens: list[int], vocab: int) -> dict[str, float | list[float]]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    start = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer, vocab)
    setup = time.perf_counter() - start
    options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

    def compile_schema() -> str:  # what a request with a new schema costs: grammar, then its first matcher
        grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=options)
        matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return grammar

    compile_s, grammar = _timed(compile_schema)
    executor = llguidance.LLExecutor(num_threads=1)

    def walk(rows: int) -> list[float]:
        matchers = [llguidance.LLMatcher(lltok, grammar, log_level=0) for _ in range(rows)]
        bitmask = llguidance.torch.allocate_token_bitmask(rows, vocab)

        def fill() -> None:
            if rows == 1:
                llguidance.torch.fill_next_token_bitmask(matchers[0], bitmask, 0)
            else:
                pairs = [(m, i) for i, m in enumerate(matchers)]
                llguidance.torch.fill_next_token_bitmask_par(executor, pairs, bitmask)

        def consume(token: int) -> None:
            for m in matchers:
                assert m.consume_token(token), m.get_error()

        times = _walk(tokens, fill, consume, bitmask, "llguidance")
        assert all(m.is_accepting() for m in matchers)
        return times

    return {"setup": setup, "compile": compile_s, "one": _steps(walk, 1), "batch": _steps(walk, ROWS)}


def run_xgrammar(tokenizer, tokens: list[int], vocab: int) -> dict[str, float | list[float]]:
    import xgrammar as xgr

    start = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    setup = time.perf_counter() - start

    def compile_schema() -> xgr.CompiledGrammar:  # a new schema: compiled grammar, then its first matcher
        compiled = compiler.compile_json_schema(
            json.dumps(SCHEMA), any_whitespace=False, separators=(", ", ": ")
        )
        xgr.GrammarMatcher(compiled)
        return compiled

    compile_s, compiled = _timed(compile_schema)

    def walk(rows: int) -> list[float]:
        matchers = [xgr.GrammarMatcher(compiled) for _ in range(rows)]
        bitmask = xgr.allocate_token_bitmask(rows, vocab)

        def fill() -> None:
            for i, matcher in enumerate(matchers):
                matcher.fill_next_token_bitmask(bitmask, i)

        def consume(token: int) -> None:
            for m in matchers:
                assert m.accept_token(token), f"xgrammar refused token {token}"

        times = _walk(tokens, fill, consume, bitmask, "xgrammar")
        assert all(m.accept_token(info.stop_token_ids[0]) for m in matchers)
        return times

    return {"setup": setup, "compile": compile_s, "one": _steps(walk, 1), "batch": _steps(walk, ROWS)}


def _timed(fn: Callable[[], T]) -> tuple[float, T]:
    """The fastest of ``REPEATS`` runs (this machine is shared: the minimum is the steadiest)."""
    best, value = float("inf"), None
    for _ in range(REPEATS):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value  # type: ignore[return-value]


def _steps(walk: Callable[[int], list[float]], rows: int) -> list[float]:
    """Per step, the fastest of ``REPEATS`` walks along the path with fresh matchers."""
    runs = [walk(rows) for _ in range(REPEATS)]
    return [min(times) for times in zip(*runs, strict=True)]


def _walk(
    tokens: list[int],
    fill: Callable[[], None],
    consume: Callable[[int], None],
    bitmask: torch.Tensor,
    name: str,
) -> list[float]:
    """Mask then consume each token of the path; checks each path token is allowed by the mask."""
    times = []
    for step, token in enumerate(tokens):
        start = time.perf_counter()
        fill()
        times.append(time.perf_counter() - start)
        word = int(bitmask[0, token // 32]) & (1 << (token % 32))
        assert word, f"{name}: the valid path's token {token} is masked at step {step}"
        consume(token)
    return times


def summary(times: list[float]) -> tuple[float, float, float]:
    ms = [t * 1000 for t in times]
    return statistics.fmean(ms), statistics.median(ms), percentile(ms, 99)


def main() -> None:
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(embedded_model_dir(Path("~/.cache/loraplex").expanduser()))
    vocab = len(tokenizer)
    tokens = tokenizer(json.dumps(INSTANCE), add_special_tokens=False)["input_ids"]
    results = {"llguidance": run_llguidance(tokenizer, tokens, vocab)}
    try:
        results["xgrammar"] = run_xgrammar(tokenizer, tokens, vocab)
    except ImportError:
        print("xgrammar is not installed: pip install xgrammar==0.2.8", file=sys.stderr)
    from importlib.metadata import version

    print(f"machine: {machine_description()}")
    print(f"vocabulary: {vocab} tokens (SmolLM2); path: {len(tokens)} tokens of a valid instance")
    print("| engine | tokenizer set-up s | schema compile ms | first mask ms | mask, 1 row: mean / median / p99 ms |"
          f" mask, {ROWS} rows per step: mean / p99 ms | compile + all masks of one request ms |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        one, batch = summary(r["one"]), summary(r["batch"])  # type: ignore[arg-type]
        total = (r["compile"] + sum(r["one"])) * 1000  # type: ignore[arg-type, operator]
        print(
            f"| {name} {version(name)} | {r['setup']:.2f} | {r['compile'] * 1000:.1f} | {r['one'][0] * 1000:.3f} | "  # type: ignore[index]
            f"{one[0]:.3f} / {one[1]:.3f} / {one[2]:.3f} | {batch[0]:.3f} / {batch[2]:.3f} | {total:.1f} |"
        )


if __name__ == "__main__":
    main()
