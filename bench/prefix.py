"""Prefix caching on the embedded model (native runner, CPU): multi-turn chats, cache on against off.

Two measurements, both with the prefix cache off and on in the same process, on one engine
(``engine.prefix_cache`` toggled between phases; every phase uses its own system prompts, so no
phase finds another's blocks):

* **one long prompt**: a ~1,400-token chat prompt sent cold (never seen), then again warm;
  ``--repeats`` fresh prompts, each cold then warm; time to first token of each (engine timings:
  submit to first token). With the cache off the "warm" request prefills everything again.
* **multi-turn chats**: ``--conversations`` chats run concurrently, each ``--turns`` turns long, on
  a mix of adapters (the base, the two demo adapters, a random all-linear one); a turn sends the
  system prompt, the whole history and a new user message, and the reply (``--reply-tokens``
  tokens, EOS ignored) joins the history, so prompts grow past 1,000 tokens. Time to first token
  p50/p95 over every turn, and throughput: generated tokens and turns per second of wall time.

The phases alternate off, on, off, on (``--rounds`` 2) so that a shared machine's load hits each
alike; ratios are only meaningful within one run.

    nice python -m bench.prefix --out bench/results/prefix-cpu.md
"""

from __future__ import annotations

import argparse
import random
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import ROOT, machine_description, median, percentile, write_random_adapter

EXAMPLES = ROOT / "examples/adapters"
WORDS = [
    "parcel",
    "route",
    "depot",
    "invoice",
    "customs",
    "pallet",
    "driver",
    "window",
    "courier",
    "freight",
    "ledger",
    "scanner",
    "harbour",
    "crane",
    "label",
    "weight",
    "tariff",
    "manifest",
    "shelf",
    "carrier",
]


def system_prompt(session: str, rules: int) -> str:
    rng = random.Random(session)
    lines = [f"Session {session}. You are the dispatch assistant of a freight company."]
    for i in range(rules):
        a, b, c = rng.sample(WORDS, 3)
        lines.append(f"Rule {i}: every {a} with a {b} goes through {c} number {rng.randrange(100, 999)}.")
    return " ".join(lines)


@dataclass
class Phase:
    cache: bool
    ttft: list[float] = field(default_factory=list)  # seconds, every turn
    wall: float = 0.0
    tokens: int = 0
    turns: int = 0
    cached_tokens: int = 0
    prompt_tokens: int = 0
    max_prompt: int = 0
    cold_ttft: list[float] = field(default_factory=list)  # the one-long-prompt measurement
    warm_ttft: list[float] = field(default_factory=list)
    warm_cached: list[tuple[int, int]] = field(default_factory=list)  # (cached, prompt) of warm prompts


class Bench:
    def __init__(self, kv_tokens: int, reply_tokens: int) -> None:
        from adapters.peft_format import load_adapter_dir
        from server.engine.base_model import load_native
        from server.engine.engine import Engine, EngineConfig

        cache_dir = Path("~/.cache/loraplex").expanduser()
        base = load_native(None, "float32", "cpu", cache_dir, kv_cache_tokens=kv_tokens, max_seq_len=4096)
        self.tokenizer = base.tokenizer
        self.engine = Engine(base.runner, base.tokenizer, EngineConfig(mode="unmerged"), base.eos_ids)
        shapes = self.engine.base_shapes
        self.tmp = tempfile.TemporaryDirectory()
        random_dir = write_random_adapter(shapes, Path(self.tmp.name) / "rnd", seed=3, r=16, lora_alpha=32)
        self.adapters = [None] + [
            load_adapter_dir(path, name, shapes)
            for name, path in (
                ("caps", EXAMPLES / "caps"),
                ("pirate", EXAMPLES / "pirate"),
                ("rnd", random_dir),
            )
        ]
        self.reply_tokens = reply_tokens
        self.engine.start()

    def ask(self, messages: list[dict], adapter) -> tuple[list[int], float, int, int]:
        """One request: (reply token ids, time to first token, cached tokens, prompt tokens)."""
        from server.engine.requests import ErrorEvent, FinishEvent, GenerationRequest, TokenEvent
        from server.engine.sampling import SamplingParams

        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        done = threading.Event()
        events: list = []

        def sink(event) -> None:
            events.append(event)
            if isinstance(event, (FinishEvent, ErrorEvent)):
                done.set()

        params = SamplingParams(max_new_tokens=self.reply_tokens, ignore_eos=True)
        request = GenerationRequest(prompt_ids=ids, params=params, adapter=adapter, sink=sink)
        self.engine.submit(request)
        done.wait()
        finish = events[-1]
        if not isinstance(finish, FinishEvent):
            raise RuntimeError(f"request failed: {finish}")
        tokens = [e.id for e in events if isinstance(e, TokenEvent)]
        return tokens, request.first_token_at - request.submitted_at, finish.cached_tokens, len(ids)

    def long_prompts(self, phase: Phase, tag: str, repeats: int, rules: int) -> None:
        for k in range(repeats):
            messages = [
                {"role": "system", "content": system_prompt(f"{tag}-long-{k}", rules)},
                {"role": "user", "content": "Which rule covers a pallet with a label?"},
            ]
            _, cold, _, _ = self.ask(messages, None)
            _, warm, cached, prompt = self.ask(messages, None)
            phase.cold_ttft.append(cold)
            phase.warm_ttft.append(warm)
            phase.warm_cached.append((cached, prompt))

    def chats(self, phase: Phase, tag: str, conversations: int, turns: int, rules: int) -> None:
        lock = threading.Lock()

        def converse(c: int) -> None:
            adapter = self.adapters[c % len(self.adapters)]
            messages = [{"role": "system", "content": system_prompt(f"{tag}-chat-{c}", rules)}]
            rng = random.Random(c)
            for t in range(turns):
                question = f"Turn {t}: where does a {' and a '.join(rng.sample(WORDS, 4))} go, and why?"
                messages.append({"role": "user", "content": question})
                reply, ttft, cached, prompt = self.ask(messages, adapter)
                messages.append(
                    {"role": "assistant", "content": self.tokenizer.decode(reply, skip_special_tokens=True)}
                )
                with lock:
                    phase.ttft.append(ttft)
                    phase.tokens += len(reply)
                    phase.turns += 1
                    phase.cached_tokens += cached
                    phase.prompt_tokens += prompt
                    phase.max_prompt = max(phase.max_prompt, prompt)

        threads = [threading.Thread(target=converse, args=(c,)) for c in range(conversations)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        phase.wall = time.perf_counter() - start


def _fmt(phases: list[Phase], args: argparse.Namespace, command: str, max_prompt: int) -> str:
    off = [p for p in phases if not p.cache]
    on = [p for p in phases if p.cache]

    def pool(ps: list[Phase], name: str) -> list[float]:
        return [v for p in ps for v in getattr(p, name)]

    def row(label: str, ps: list[Phase]) -> tuple[str, float, float, float, float, float]:
        ttft = pool(ps, "ttft")
        wall = sum(p.wall for p in ps)
        tok_s = sum(p.tokens for p in ps) / wall
        turns_s = sum(p.turns for p in ps) / wall
        cached = sum(p.cached_tokens for p in ps) / max(1, sum(p.prompt_tokens for p in ps))
        return label, median(ttft), percentile(ttft, 95), tok_s, turns_s, cached

    r_off, r_on = row("off", off), row("on", on)
    cold_on, warm_on = median(pool(on, "cold_ttft")), median(pool(on, "warm_ttft"))
    cold_off, warm_off = median(pool(off, "cold_ttft")), median(pool(off, "warm_ttft"))
    warm_cached = [c for p in on for c in p.warm_cached]
    off_cached = [c for p in off for c in p.warm_cached]
    prompt_len = median([float(p) for _, p in warm_cached])
    lines = [
        "# Prefix caching on the embedded model (CPU)",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- machine: {machine_description()}",
        f"- command: `{command}`",
        "- model: SmolLM2-135M-Instruct, native runner, float32, `--mode unmerged`; adapters: the base, "
        "`caps` and `pirate` (examples/adapters, q/v r 8) and a random all-linear r 16 one",
        f"- phases alternate cache off / on, {args.rounds} of each; each phase has its own system prompts",
        "- **the machine is shared with other people's jobs: absolute figures are noisy, compare the "
        "ratios (same run, alternating phases)**",
        "",
        f"## One long prompt: cold, then warm (median of {len(warm_cached)} prompts of ~{prompt_len:.0f} tokens)",
        "",
        "| prefix cache | TTFT cold (s) | TTFT warm (s) | warm / cold | cached tokens of the warm prompt |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| off | {cold_off:.3f} | {warm_off:.3f} | {warm_off / cold_off:.2f} | "
        f"{median([float(c) for c, _ in off_cached]):.0f} |",
        f"| on | {cold_on:.3f} | {warm_on:.3f} | **{warm_on / cold_on:.2f}** (target <= 0.25) | "
        f"{median([float(c) for c, _ in warm_cached]):.0f} of {prompt_len:.0f} |",
        "",
        f"## Multi-turn chats: {args.conversations} concurrent conversations x {args.turns} turns, "
        f"{args.reply_tokens}-token replies (prompts up to {max_prompt} tokens)",
        "",
        "| prefix cache | TTFT p50 (s) | TTFT p95 (s) | generated tok/s | turns/s | prompt tokens cached |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, p50, p95, tok_s, turns_s, cached in (r_off, r_on):
        lines.append(f"| {label} | {p50:.3f} | {p95:.3f} | {tok_s:.1f} | {turns_s:.3f} | {cached:.0%} |")
    lines += [
        "",
        f"Throughput with the cache on: **{r_on[3] / r_off[3]:.2f}x** the cache off (target >= 2x); "
        f"TTFT p50 {r_on[1] / r_off[1]:.2f}x, p95 {r_on[2] / r_off[2]:.2f}x.",
        "",
        "## Each phase, in the order run (the machine's load moves between phases)",
        "",
        "| phase | cache | chats wall (s) | turns/s | TTFT p50 (s) | long prompt cold / warm (s) |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for i, p in enumerate(phases):
        lines.append(
            f"| {i} | {'on' if p.cache else 'off'} | {p.wall:.1f} | {p.turns / p.wall:.3f} | {median(p.ttft):.3f} "
            f"| {median(p.cold_ttft):.3f} / {median(p.warm_ttft):.3f} |"
        )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--reply-tokens", type=int, default=24)
    parser.add_argument("--rules", type=int, default=55, help="system prompt length (about 21 tokens a rule)")
    parser.add_argument("--repeats", type=int, default=3, help="long prompts per phase, each cold then warm")
    parser.add_argument("--rounds", type=int, default=2, help="off/on phase pairs")
    parser.add_argument("--kv-tokens", type=int, default=32768)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    bench = Bench(args.kv_tokens, args.reply_tokens)
    phases: list[Phase] = []
    max_prompt = 0
    for r in range(args.rounds):
        for cache in (False, True):
            phase = Phase(cache)
            bench.engine.prefix_cache = cache
            tag = f"{r}-{'on' if cache else 'off'}"
            bench.long_prompts(phase, tag, args.repeats, args.rules + 10)
            bench.chats(phase, tag, args.conversations, args.turns, args.rules)
            phases.append(phase)
            max_prompt = max(max_prompt, phase.max_prompt)
            print(f"phase {tag}: {phase.turns} turns in {phase.wall:.1f} s, TTFT p50 {median(phase.ttft):.3f} s, "
                  f"long prompt cold {median(phase.cold_ttft):.3f} s warm {median(phase.warm_ttft):.3f} s", flush=True)  # fmt: skip
    bench.engine.shutdown()
    command = "nice python -m bench.prefix " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v is not None
    )
    text = _fmt(phases, args, command, max_prompt)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
