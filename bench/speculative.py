"""Speculative decoding (prompt lookup) on the embedded model (native runner, CPU): with and without.

Two workloads, greedy, each at batch 1 (requests one after another) and batch 16 (16 submitted
together), with ``--speculate N`` and with 0, on one engine (``engine.speculate`` switched between
phases; the phases alternate off, on, off, on ... for ``--rounds`` rounds so a shared machine's
load hits both alike):

* **copying / extraction**: the prompt holds a passage (a delivery note, a code snippet, a list of
  rules) and asks for it back, or for the part of it that matters, word for word: what prompt
  lookup is for;
* **free answers**: open questions whose answers quote little of the prompt: drafts mostly miss,
  so this measures what speculation costs where it cannot help.

With ``--compare-fixed`` a third phase runs ``--speculate N`` with every row drafting N tokens
whenever it has a match (the draft length not adapted to the row's acceptance: ``DraftLength``),
so the adaptation's effect is measured in the same run. With ``--threads 1,2`` more ``--speculate N``
phases run with the small steps' kernel threads pinned to each of those counts (``LORAPLEX_DECODE_THREADS``;
the other phases run ``auto``, the default, each setting keeping its own timings across its
phases), so what the decode threads' choice costs or gives speculation is measured in the same run.

The engine's steps run on a thread of their own, as the server's do (``bench.common.on_engine_thread``).
Tokens per second are generated tokens over wall time; greedy outputs are the same with and
without (checked here for every request), so both sides generate the same tokens.

    nice python -m bench.speculative --out bench/results/speculative-cpu.md
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import machine_description, on_engine_thread, teamless_main_thread

PASSAGES = [
    "Delivery note 4471. Sender: Harbour Freight Ltd, 12 Quay Street, Portsmouth PO1 3AX. Recipient: "
    "Mrs. Elena Martins, 88 Orchard Lane, Leeds LS6 2QB. Contents: three pallets of ceramic tiles, "
    "one crate of adhesive, two boxes of spacers. Total weight 412 kg. Deliver between 8:00 and 12:00.",
    "def merge_intervals(intervals):\n    intervals.sort(key=lambda pair: pair[0])\n    merged = []\n"
    "    for start, end in intervals:\n        if merged and start <= merged[-1][1]:\n"
    "            merged[-1][1] = max(merged[-1][1], end)\n        else:\n            merged.append([start, end])\n"
    "    return merged\n",
    "Rule 1: every parcel with a customs label goes through gate 4. Rule 2: every pallet heavier than "
    "300 kg goes through gate 7. Rule 3: every courier envelope goes through gate 2. Rule 4: every "
    "refrigerated crate goes through gate 9 and is scanned twice.",
    "Meeting minutes, 14 March. Present: Ana, Ben, Chloe, David. Decisions: the warehouse opens at 6:30 "
    "from April; the night shift ends at 23:00; David orders two new forklifts; Chloe writes the safety "
    "guide by the end of the month. Next meeting: 28 March at 10:00 in room B.",
]
COPY_ASKS = [
    "Repeat the text above exactly, word for word.",
    "Copy the text above without changing anything.",
]
FREE_QUESTIONS = [
    "Write a short poem about the sea at night.",
    "Why do cats like to sleep in boxes? Answer in a few sentences.",
    "Give three ideas for a rainy Sunday afternoon.",
    "Explain what a compiler does to a ten-year-old.",
]


@dataclass
class Phase:
    speculate: int
    workload: str
    batch: int
    fixed: bool = False  # every row drafts --speculate tokens (no adaptation to its acceptance)
    threads: str = "auto"  # the small steps' kernel threads (LORAPLEX_DECODE_THREADS)
    wall: float = 0.0
    tokens: int = 0
    outputs: list[list[int]] = field(default_factory=list)
    drafted: int = 0
    accepted: int = 0
    steps: int = 0


class Bench:
    def __init__(self, speculate: int, max_new_tokens: int) -> None:
        from server.engine.base_model import load_native
        from server.engine.engine import Engine, EngineConfig

        cache_dir = Path("~/.cache/loraplex").expanduser()
        base = load_native(None, "float32", "cpu", cache_dir, kv_cache_tokens=16384, max_seq_len=2048)
        self.tokenizer = base.tokenizer
        self.engine = Engine(
            base.runner, base.tokenizer, EngineConfig(mode="unmerged", speculate=speculate), base.eos_ids
        )
        self.speculate = speculate
        self.max_new_tokens = max_new_tokens
        self.threads: dict[str, object] = {}  # setting -> its DecodeThreads, kept across phases

    def decode_threads(self, setting: str):
        """The runner's thread chooser for ``setting`` (``auto`` or a count), one per setting."""
        import torch

        from server.engine.decode_threads import DecodeThreads, parse

        if setting not in self.threads:
            self.threads[setting] = (
                self.engine.runner.decode_threads
                if setting == "auto"
                else DecodeThreads(parse(setting), torch.get_num_threads())
            )
        return self.threads[setting]

    def prompts(self, workload: str, count: int) -> list[list[int]]:
        out = []
        for i in range(count):
            if workload == "copy":
                content = f"{PASSAGES[i % len(PASSAGES)]}\n\n{COPY_ASKS[i % len(COPY_ASKS)]}"
            else:
                content = FREE_QUESTIONS[i % len(FREE_QUESTIONS)]
            messages = [{"role": "user", "content": content}]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            out.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return out

    def run(self, phase: Phase, requests: int) -> None:
        engine = self.engine
        engine.speculate = phase.speculate
        engine.runner.decode_threads = self.decode_threads(phase.threads)
        stats = engine.stats
        drafted, accepted, steps = stats.speculation.drafted, stats.speculation.accepted, stats.steps
        prompts = self.prompts(phase.workload, requests)
        with _fixed_drafts(phase.fixed):
            self._run(phase, prompts)
        phase.tokens = sum(len(o) for o in phase.outputs)
        phase.drafted = stats.speculation.drafted - drafted
        phase.accepted = stats.speculation.accepted - accepted
        phase.steps = stats.steps - steps

    def _run(self, phase: Phase, prompts: list[list[int]]) -> None:
        from server.engine.requests import FinishEvent, GenerationRequest, TokenEvent
        from server.engine.sampling import SamplingParams

        engine = self.engine
        start = time.perf_counter()
        for first in range(0, len(prompts), phase.batch):
            pending = []
            for ids in prompts[first : first + phase.batch]:
                events: list = []
                params = SamplingParams(max_new_tokens=self.max_new_tokens)
                engine.submit(
                    GenerationRequest(prompt_ids=ids, params=params, adapter=None, sink=events.append)
                )
                pending.append(events)
            on_engine_thread(engine.run_until_idle)  # where the server steps (bench.common)
            for events in pending:
                if not isinstance(events[-1], FinishEvent):
                    raise RuntimeError(f"request failed: {events[-1]}")
                phase.outputs.append([e.id for e in events if isinstance(e, TokenEvent)])
        phase.wall = time.perf_counter() - start


@contextlib.contextmanager
def _fixed_drafts(fixed: bool) -> Iterator[None]:
    """While ``fixed``: every row's draft length is ``--speculate`` (``DraftLength.limit`` bypassed),
    the behaviour before the adaptation, to measure it against in the same run."""
    from server.engine.speculative import DraftLength

    if not fixed:
        yield
        return
    adapted = DraftLength.limit
    DraftLength.limit = lambda self, maximum: maximum  # type: ignore[method-assign]
    try:
        yield
    finally:
        DraftLength.limit = adapted  # type: ignore[method-assign]


def _report(
    phases: list[Phase], args: argparse.Namespace, command: str, loads: list[str], chosen: object
) -> str:
    lines = [
        "# Speculative decoding (prompt lookup) on the embedded model (CPU)",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- machine: {machine_description()}",
        f"- command: `{command}`",
        "- model: SmolLM2-135M-Instruct, native runner, float32 (blocked weights), base rows, greedy, "
        f"up to {args.max_new_tokens} new tokens (EOS ends a row); `--speculate {args.speculate}` against 0"
        + (" and against fixed-length drafts (`fixed`: no adaptation)" if args.compare_fixed else ""),
        f"- load average (`uptime`) before and after: {loads[0]} / {loads[1]}",
        f"- small steps' kernel threads: `auto` (the default), chosen: {chosen}"
        + (
            f"; and `--speculate {args.speculate}` pinned to {', '.join(args.threads)}"
            if args.threads
            else ""
        ),
        f"- phases alternate off / on, {args.rounds} rounds; batch 1: {args.requests} requests one after "
        f"another; batch 16: {args.requests_16} requests, 16 at a time",
        "- every request's tokens are the same with and without speculation (checked in the run)",
        "- **the machine is shared with other people's jobs: absolute figures are noisy, compare the "
        "ratios (same run, alternating phases)**",
        "",
        "| workload | batch | drafts | tok/s off | tok/s on | on / off | drafts accepted | engine steps off / on |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for workload in ("copy", "free"):
        for batch in args.batches:
            mine = [p for p in phases if p.workload == workload and p.batch == batch]
            off = [p for p in mine if not p.speculate]
            rate_off = sum(p.tokens for p in off) / sum(p.wall for p in off)
            steps_off = sum(p.steps for p in off)
            for fixed, threads in sorted({(p.fixed, p.threads) for p in mine if p.speculate}):
                on = [p for p in mine if p.speculate and (p.fixed, p.threads) == (fixed, threads)]
                rate_on = sum(p.tokens for p in on) / sum(p.wall for p in on)
                drafted, accepted = sum(p.drafted for p in on), sum(p.accepted for p in on)
                steps_on = sum(p.steps for p in on)
                lines.append(
                    f"| {workload} | {batch} | {'fixed' if fixed else 'adaptive'}"
                    f"{'' if threads == 'auto' else f', threads {threads}'} | {rate_off:.1f} | "
                    f"{rate_on:.1f} | **{rate_on / rate_off:.2f}x** | "
                    f"{accepted / drafted if drafted else 0:.0%} ({accepted}/{drafted}) | {steps_off / steps_on:.2f} |"
                )
    lines += [
        "",
        "Targets (issue 27): >= 1.8x at batch 1 on copying; >= 0.9x on free answers; >= 1.0x at batch 16.",
        "",
        "## Each phase, in the order run",
        "",
        "| phase | workload | batch | speculate | wall (s) | tokens | tok/s | engine steps | drafted | accepted |",
        "| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for i, p in enumerate(phases):
        lines.append(
            f"| {i} | {p.workload} | {p.batch} | {p.speculate}{' fixed' if p.fixed else ''}"
            f"{'' if p.threads == 'auto' else f' threads {p.threads}'} | {p.wall:.1f} | {p.tokens} | "
            f"{p.tokens / p.wall:.1f} | {p.steps} | {p.drafted} | {p.accepted} |"
        )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--speculate", type=int, default=4, help="draft tokens per step in the 'on' phases")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=4, help="batch 1: requests per phase")
    parser.add_argument("--requests-16", type=int, default=16, help="batch 16: requests per phase")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument(
        "--batches", type=lambda text: [int(b) for b in text.split(",")], default=[1, 16],
        help="comma-separated: which of the batch sizes to run (1,16); batch 16 takes long under load",
    )  # fmt: skip
    parser.add_argument(
        "--compare-fixed", action="store_true",
        help="also run --speculate N with every row drafting N tokens (no adaptation), same run",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=lambda text: [t for t in text.split(",") if t], default=[],
        help="comma-separated counts: also run --speculate N with the small steps' threads pinned to each",
    )  # fmt: skip
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    teamless_main_thread()  # the load and the phases' steps run on_engine_thread (bench.common)
    bench = on_engine_thread(lambda: Bench(args.speculate, args.max_new_tokens))
    loads = [" ".join(f"{x:.2f}" for x in os.getloadavg())]
    phases: list[Phase] = []
    bench.run(Phase(0, "copy", 1), 1)  # warm-up: first-call costs out of the measured phases
    bench.run(Phase(args.speculate, "copy", 1), 1)
    for _ in range(args.rounds):
        for workload in ("copy", "free"):
            for batch in args.batches:
                arms = [(0, False, "auto"), (args.speculate, False, "auto")]
                arms += [(args.speculate, True, "auto")] * args.compare_fixed
                arms += [(args.speculate, False, threads) for threads in args.threads]
                for speculate, fixed, threads in arms:
                    phase = Phase(speculate, workload, batch, fixed, threads)
                    bench.run(phase, args.requests if batch == 1 else args.requests_16)
                    phases.append(phase)
                    print(f"{workload} batch {batch} speculate {speculate}{' fixed' if fixed else ''}"
                          f"{'' if threads == 'auto' else f' threads {threads}'}: "
                          f"{phase.tokens / phase.wall:.1f} tok/s", flush=True)  # fmt: skip
    for a in phases:
        for b in phases:
            if a.workload == b.workload and a.batch == b.batch and a.outputs != b.outputs:
                raise RuntimeError(
                    f"outputs differ with and without speculation: {a.workload} batch {a.batch}"
                )
    loads.append(" ".join(f"{x:.2f}" for x in os.getloadavg()))
    command = "python -m bench.speculative " + " ".join(
        f"--{k.replace('_', '-')}"
        + ("" if v is True else f" {','.join(map(str, v)) if isinstance(v, list) else v}")
        for k, v in vars(args).items()
        if k != "out" and v is not None and v is not False and v != []
    )
    chosen = bench.decode_threads("auto").describe()["step_ms"]  # type: ignore[attr-defined]
    report = _report(phases, args, command, loads, chosen)
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)


if __name__ == "__main__":
    main()
