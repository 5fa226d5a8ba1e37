"""Batch-1 decode steps of the embedded model per form and decode-step variant, interleaved in one
process (issue 25: quantized projections in the one-call decode layer; ``LORAPLEX_DECODE_THREADS``).

Variants (each a runner of its own; every runner's step alternates with the others', the order
reversed each round, so that a shared machine's load hits all alike; median of ``--steps``):

- ``before``: quantized forms as before the one-call quantized step: PyTorch's ops between the
  layers on PyTorch's threads (the runner's small-step thread pinning off), the kernels on one
  thread (not for ``none``);
- ``pieces`` (quantized forms): the compiled norms/attention/SiLU with the projections run from
  Python between them (the path of rows with adapters, and the fallback where the one-call check
  fails), kernels on one thread;
- ``pin1``, ``pin2``: the one-call step, the kernels' threads pinned (``LORAPLEX_DECODE_THREADS``);
- ``auto``: the default: the runner chooses by timing (``server/engine/decode_threads.py``).

    nice python -m bench.decode_threads --steps 40

Prints the median step per form and variant, each quantized variant's speed-up over float32's
variants, and ``before`` over the others. Ratios are only meaningful within one run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

FORMS = ("none", "int8", "int4", "gguf")
VARIANTS = ("before", "pieces", "pin1", "pin2", "auto")


def _runner(form: str, variant: str, cache_dir: Path):
    import torch

    from server.engine.base_model import load_native
    from server.engine.decode_threads import DecodeThreads

    runner = load_native(None, "float32", "cpu", cache_dir, quantization=form, kv_cache_tokens=2048).runner
    assert runner is not None
    most = torch.get_num_threads()
    if variant == "before":
        runner.model.fused = runner.model.fused_parts = None
        runner.weight_layout = "quantized (as before: threads untouched)"  # _threads_for leaves them
        runner.decode_threads = DecodeThreads(1, most)
    elif variant == "pieces":
        runner.model.fused_parts = None
        runner.decode_threads = DecodeThreads(1, most)
    elif variant.startswith("pin"):
        runner.decode_threads = DecodeThreads(int(variant[3:]), most)
    return runner


def measure(
    forms: list[str], variants: list[str], steps: int, cache_dir: Path
) -> dict[tuple[str, str], float]:
    """Median milliseconds per batch-1 decode step, by (form, variant)."""
    from server.engine.lora_linear import BASE_SLOT
    from server.engine.runner import DecodeInput, PrefillInput

    runners = {
        (form, variant): _runner(form, variant, cache_dir)
        for form in forms
        for variant in variants
        if not (form == "none" and variant in ("before", "pieces"))
    }
    for runner in runners.values():
        runner.prefill([PrefillInput(0, list(range(1, 33)), 0, BASE_SLOT)])
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runners}
    keys = list(runners)
    for step in range(steps + 3):
        for key in keys if step % 2 == 0 else reversed(keys):
            start = time.perf_counter()
            runners[key].decode([DecodeInput(0, 100 + step, BASE_SLOT)])
            if step >= 3:  # warm-up steps (auto's first ones are its own warm-up too)
                times[key].append(time.perf_counter() - start)
    for key, runner in runners.items():
        if key[1] == "auto":
            print(f"{key[0]} auto: {runner.decode_threads.describe()}")
    return {key: statistics.median(t) * 1e3 for key, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/loraplex").expanduser())
    args = parser.parse_args()
    ms = measure(args.forms, args.variants, args.steps, args.cache_dir)
    for (form, variant), value in ms.items():
        print(f"{form:5s} {variant:7s} {value:8.2f} ms/step")
    floats = {v: ms[("none", v)] for v in args.variants if ("none", v) in ms}
    for form in args.forms:
        if form == "none":
            continue
        for variant in args.variants:
            if (form, variant) in ms:
                versus = ", ".join(f"{ref / ms[(form, variant)]:.2f}x none {v}" for v, ref in floats.items())
                print(f"{form} {variant}: {versus}")
        if (form, "before") in ms:
            gains = ", ".join(
                f"{v} {ms[(form, 'before')] / ms[(form, v)]:.2f}x" for v in args.variants if v != "before"
            )
            print(f"{form}: faster than before: {gains}")


if __name__ == "__main__":
    main()
