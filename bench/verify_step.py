"""What a batch-1 verify step (speculative decoding) costs against a one-token decode step.

On the embedded model (native runner, blocked layout, float32, the engine thread alone as the
server runs it): one sequence of ``--context`` tokens, then, at that same position every time, a
decode step of one token and verify steps of 1 + k tokens (k = 1 .. ``--max-drafts``), each rolled
back after it is timed. Each variant is timed in every round, the variants interleaved, so a shared
machine's load hits them alike; the report gives medians and each verify step's ratio to the
decode step of the same run:

* ``compiled``: verify steps through the compiled decode layer (``native/fused_cpu.py``: every
  new token a row of its own, the whole model in one C call for base rows);
* ``pytorch``: the same steps with the compiled path switched off (PyTorch's ops between the
  linear layers: what verify steps ran before the compiled path took them).

``--requests N`` adds the engine on bench/speculative.py's copying prompts, batch 1, greedy, one
request at a time with the arms alternating request by request (a phase of several requests, as
bench/speculative.py runs, spans tens of seconds, over which a shared machine's load swings far
more than the effect): ``--speculate 0``, ``--speculate 4`` with verify steps on the compiled path,
and ``--speculate 4`` with verify steps on PyTorch's ops (``fused_cpu.VERIFY_TOKENS`` = 0; decode
steps stay compiled: what ran before). Ratios are of summed wall times per arm.

``--kernel`` adds the linear kernel alone (``gemv_cpu.c``) over the model's projection shapes and
LM head at 1 .. 8 rows, one thread: how a pass's time grows with its rows.

    nice python -m bench.verify_step --rounds 15
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import machine_description
from bench.efficiency import linear_weights
from server.engine import gemv_cpu
from server.engine.base_model import embedded_model_dir
from server.engine.lora_linear import BASE_SLOT
from server.engine.native import NativeLlamaRunner
from server.engine.runner import DecodeInput, PrefillInput, StepRow

SEQ = 0


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _step_seconds(runner: NativeLlamaRunner, context: list[int], drafts: int) -> float:
    """One step at position ``len(context)`` (a decode step for 0 drafts), rolled back after."""
    length = len(context)
    if drafts == 0:
        seconds = _timed(lambda: runner.decode([DecodeInput(SEQ, 5, BASE_SLOT)]))
    else:
        tokens = [5, *context[10 : 10 + drafts]]
        row = StepRow(SEQ, tokens, length, BASE_SLOT, logits=len(tokens), drafts=drafts, decoding=True)
        seconds = _timed(lambda: runner.step([row]))
        runner.commit(SEQ, 0)
    runner.kv.truncate(SEQ, length)
    return seconds


def _kernel_seconds(weights: list[torch.Tensor], rows: int, reps: int = 3) -> float:
    """One pass of the linear kernel over ``weights`` (packed) at ``rows`` rows, one thread."""
    kernel = gemv_cpu.load()
    assert kernel is not None
    passes = [(gemv_cpu.pack(w), w.shape[0], torch.randn(rows, w.shape[1])) for w in weights]

    def one_pass() -> None:
        for packed, out_features, x in passes:
            kernel.linear(x, packed, out_features)

    return min(_timed(one_pass) for _ in range(reps))


def _engine_arms(requests: int, rounds: int, max_new_tokens: int) -> dict[str, list[float]]:
    """Seconds per copying request for each arm, the arms alternating request by request."""
    from bench.speculative import Bench, Phase
    from server.engine.native import fused_cpu

    bench = Bench(4, max_new_tokens)
    prompts = bench.prompts("copy", requests)
    arms = {"off": (0, fused_cpu.VERIFY_TOKENS), "compiled": (4, fused_cpu.VERIFY_TOKENS), "pytorch": (4, 0)}
    seconds: dict[str, list[float]] = {arm: [] for arm in arms}
    outputs: dict[int, list[list[int]]] = {}
    verify_tokens = fused_cpu.VERIFY_TOKENS
    try:
        for round_ in range(rounds + 1):  # round 0 warms up, untimed
            for index, prompt in enumerate(prompts):
                for arm, (speculate, tokens) in arms.items():
                    bench.engine.speculate = speculate
                    fused_cpu.VERIFY_TOKENS = tokens
                    phase = Phase(speculate, "copy", 1)
                    bench._run(phase, [prompt])
                    outputs.setdefault(index, phase.outputs)
                    if phase.outputs != outputs[index]:
                        raise RuntimeError(f"{arm}: request {index} gave other tokens")
                    if round_:
                        seconds[arm].append(phase.wall)
    finally:
        fused_cpu.VERIFY_TOKENS = verify_tokens
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--context", type=int, default=160, help="tokens in the sequence before the step")
    parser.add_argument("--max-drafts", type=int, default=7)
    parser.add_argument("--kernel", action="store_true", help="also time the linear kernel by rows")
    parser.add_argument("--requests", type=int, default=0, help="engine arms: copying requests per round")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model_dir = embedded_model_dir(Path("~/.cache/loraplex").expanduser())
    runner = NativeLlamaRunner(model_dir, weight_layout="blocked")
    compiled = runner.model.fused
    assert compiled is not None, "the compiled decode layer did not build here"
    context = [1, *range(1000, 1000 + args.context - 1)]
    runner.prefill([PrefillInput(SEQ, context, 0, BASE_SLOT)])
    variants = {"compiled": compiled, "pytorch": None}
    times: dict[tuple[str, int], list[float]] = {
        (v, k): [] for v in variants for k in range(args.max_drafts + 1)
    }
    weights = linear_weights(model_dir, torch.float32, torch.device("cpu")) if args.kernel else []
    kernel: dict[int, list[float]] = {rows: [] for rows in range(1, 9)} if args.kernel else {}
    loads = [Path("/proc/loadavg").read_text().split()[:3]]
    threads = torch.get_num_threads()
    for _ in range(args.rounds):
        for name, fused in variants.items():
            runner.model.fused = fused
            for drafts in range(args.max_drafts + 1):
                times[(name, drafts)].append(_step_seconds(runner, context, drafts))
        torch.set_num_threads(1)
        for rows in kernel:
            kernel[rows].append(_kernel_seconds(weights, rows, reps=1))
        torch.set_num_threads(threads)
    engine = _engine_arms(args.requests, args.rounds, args.max_new_tokens) if args.requests else {}
    loads.append(Path("/proc/loadavg").read_text().split()[:3])
    report = _report(args, times, kernel, variants, loads) + _engine_report(engine)
    print(report)
    if args.out:
        args.out.write_text(report)


def _report(args, times, kernel, variants, loads) -> str:
    median = {key: statistics.median(v) for key, v in times.items()}
    decode = median[("compiled", 0)]
    lines = [
        f"# Verify-step cost, batch 1 ({machine_description()})",
        "",
        f"Embedded SmolLM2-135M, float32, blocked; context {args.context} tokens; {args.rounds} rounds "
        f"interleaved; medians; load average {' '.join(loads[0])} before, {' '.join(loads[-1])} after. "
        "Ratios: against the compiled one-token decode step of the same run.",
        "",
        "| tokens in the step | " + " | ".join(f"{v} (ms)" for v in variants) + " | "
        + " | ".join(f"{v} / decode" for v in variants) + " |",
        "| ---: |" + " ---: |" * (2 * len(variants)),
    ]  # fmt: skip
    for drafts in range(args.max_drafts + 1):
        ms = [f"{1000 * median[(v, drafts)]:.1f}" for v in variants]
        ratios = [f"{median[(v, drafts)] / decode:.2f}x" for v in variants]
        lines.append(f"| {1 + drafts} | " + " | ".join(ms + ratios) + " |")
    if kernel:
        one = statistics.median(kernel[1])
        lines += ["", "Linear kernel alone (all projections + LM head, one thread, medians):", "",
                  "| rows | ms | / 1 row |", "| ---: | ---: | ---: |"]  # fmt: skip
        for rows, values in kernel.items():
            lines.append(
                f"| {rows} | {1000 * statistics.median(values):.1f} | {statistics.median(values) / one:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def _engine_report(seconds: dict[str, list[float]]) -> str:
    if not seconds:
        return ""
    off = sum(seconds["off"])
    lines = ["", "Engine, copying prompts, batch 1, arms alternating request by request (same tokens):", "",
             "| arm | requests | wall (s) | off / arm |", "| --- | ---: | ---: | ---: |"]  # fmt: skip
    for arm, values in seconds.items():
        lines.append(f"| {arm} | {len(values)} | {sum(values):.1f} | {off / sum(values):.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
