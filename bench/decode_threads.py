"""Batch-1 decode steps of the embedded model per form and decode-step variant, interleaved in one
process (issue 25: quantized projections in the one-call decode layer; ``LORAPLEX_DECODE_THREADS``).

Variants (every variant's step alternates with the others', the order reversed each round, so
that a shared machine's load hits all alike; median of ``--steps``):

- ``before``: quantized forms as before the one-call quantized step: PyTorch's ops between the
  layers on PyTorch's threads (the runner's small-step thread pinning off), the kernels on one
  thread (not for ``none``); a runner of its own;
- ``pieces`` (quantized forms): the compiled norms/attention/SiLU with the projections run from
  Python between them (the path of rows with adapters, and the fallback where the one-call check
  fails), kernels on one thread; a runner of its own;
- ``pin1``, ``pin2``: the one-call step, the kernels' threads pinned (``LORAPLEX_DECODE_THREADS``);
- ``auto``: the default: the runner chooses by timing (``server/engine/decode_threads.py``);
- ``ref1``, ``ref2`` (with ``--reference PATH``): ``pin1``/``pin2`` with the one-call step built from
  another tree's ``gemv_cpu.c`` (an A/B of the C code on the same runner and weights).

``pin1``, ``pin2`` and ``auto`` of a form run on one runner (the same weights in memory), each
with its own thread setting and its own sequence, switched before each step: runners of their
own differ by themselves (four runners all pinned to one thread, interleaved in one process:
46.1, 44.4, 40.5, 40.7 ms a step at load ~7, the first loaded the slowest), which a comparison
between thread settings must not pick up. The loads and steps run on a thread of their own, as the
server's engine does: the process's only OpenMP team (``bench.common.on_engine_thread``). ``--verify K``: the steps are verify steps of 1 + K tokens (speculative
decoding; all drafts rejected, so every sequence grows by one token a step) instead of 1-token
decode steps. ``--trace``: print the count each ``auto`` step ran on.

    nice python -m bench.decode_threads --steps 40 [--verify 4]
    nice python -m bench.decode_threads --forms none --variants pin1 pin2 auto ref1 ref2 \
        --reference ../main/server/engine/gemv_cpu.c

Prints the median step per form and variant, each quantized variant's speed-up over float32's
variants, and ``before`` over the others. Ratios are only meaningful within one run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bench.common import on_engine_thread, teamless_main_thread

FORMS = ("none", "int8", "int4", "gguf")
VARIANTS = ("before", "pieces", "pin1", "pin2", "auto", "ref1", "ref2")
DEFAULT_VARIANTS = VARIANTS[:5]
SHARED = ("pin1", "pin2", "auto", "ref1", "ref2")  # one runner per form, switched per step


def _runner(form: str, variant: str, cache_dir: Path):
    import torch

    from server.engine.base_model import load_native
    from server.engine.decode_threads import DecodeThreads

    runner = load_native(None, "float32", "cpu", cache_dir, quantization=form, kv_cache_tokens=4096).runner
    assert runner is not None
    most = torch.get_num_threads()
    if variant == "before":
        runner.model.fused = runner.model.fused_parts = None
        runner.weight_layout = "quantized (as before: threads untouched)"  # _threads_for leaves them
        runner.decode_threads = DecodeThreads(1, most)
    elif variant == "pieces":
        runner.model.fused_parts = None
        runner.decode_threads = DecodeThreads(1, most)
    return runner


def _setting(variant: str):
    import torch

    from server.engine.decode_threads import DecodeThreads

    pinned = int(variant[3:]) if variant.startswith(("pin", "ref")) else None
    return DecodeThreads(pinned, torch.get_num_threads())


def _reference(source: Path, cache_dir: Path):
    """The one-call decode functions built from another tree's ``gemv_cpu.c`` (``ref1``/``ref2``)."""
    from server.engine import cpu_build
    from server.engine.native.fused_cpu import CompiledDecode

    library = cpu_build.build("gemv_cpu_reference", source, cache_dir / "kernels-reference", "reference")
    if library is None:
        raise SystemExit(f"{source}: could not be built")
    return CompiledDecode(library)


def measure(
    forms: list[str],
    variants: list[str],
    steps: int,
    cache_dir: Path,
    verify: int = 0,
    trace: bool = False,
    reference: Path | None = None,
) -> dict[tuple[str, str], float]:
    """Median milliseconds per batch-1 step (a decode step, or a verify step of 1 + ``verify``
    tokens), by (form, variant)."""
    from server.engine.lora_linear import BASE_SLOT
    from server.engine.runner import PrefillInput, StepRow

    keys = [
        (form, variant)
        for form in forms
        for variant in variants
        if not (form == "none" and variant in ("before", "pieces"))
    ]
    if any(v.startswith("ref") for v in variants) and reference is None:
        raise SystemExit("ref1 / ref2 need --reference PATH/TO/gemv_cpu.c")
    other = _reference(reference, cache_dir) if reference is not None else None
    shared = {form: _runner(form, "auto", cache_dir) for form in forms if any(v in SHARED for v in variants)}
    own = {form: runner.model.fused for form, runner in shared.items()}
    # (form, variant) -> (runner, its thread setting or None: the runner's own, sequence, kernels)
    arms = {}
    for seq, (form, variant) in enumerate(keys):
        if variant in SHARED:
            kernels = other if variant.startswith("ref") else own[form]
            arms[(form, variant)] = (shared[form], _setting(variant), seq, kernels)
        else:
            runner = _runner(form, variant, cache_dir)
            arms[(form, variant)] = (runner, None, seq, runner.model.fused)
    prompt = list(range(1, 33))
    for runner, _, seq, _ in arms.values():
        runner.prefill([PrefillInput(seq, prompt, 0, BASE_SLOT)])
    times: dict[tuple[str, str], list[float]] = {key: [] for key in keys}
    chosen: dict[tuple[str, str], list[int]] = {key: [] for key in keys}

    def rounds() -> None:
        for step in range(steps + 3):
            for key in keys if step % 2 == 0 else reversed(keys):
                runner, setting, seq, kernels = arms[key]
                runner.model.fused = kernels
                if setting is not None:
                    runner.decode_threads = setting
                tokens = [100 + step] + [7] * verify  # drafts that will not be accepted
                row = StepRow(seq, tokens, len(prompt) + step, BASE_SLOT, logits=len(tokens), drafts=verify,
                              decoding=True)  # fmt: skip
                start = time.perf_counter()
                runner.step([row])
                if verify:
                    runner.commit(seq, 0)
                if step >= 3:  # warm-up steps (auto's first ones are its own warm-up too)
                    times[key].append(time.perf_counter() - start)
                chosen[key].append(runner.decode_threads.current)

    rounds()  # on the thread that loaded the runners: main() runs measure() on_engine_thread
    for key, (runner, setting, _, _) in arms.items():
        if key[1] == "auto":
            print(f"{key[0]} auto: {(setting or runner.decode_threads).describe()}")
            if trace:
                print(f"{key[0]} auto, each step's count: {''.join(map(str, chosen[key]))}")
    return {key: statistics.median(t) * 1e3 for key, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--verify", type=int, default=0, help="verify steps of 1 + K tokens (K drafts)")
    parser.add_argument("--trace", action="store_true", help="print the count of each auto step")
    parser.add_argument(
        "--reference",
        type=Path,
        help="ref1/ref2: the one-call decode step built from this gemv_cpu.c (another tree's)",
    )
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/loraplex").expanduser())
    args = parser.parse_args()
    teamless_main_thread()  # the loads and steps: one thread, the process's only OpenMP team (bench.common)
    ms = on_engine_thread(
        lambda: measure(
            args.forms, args.variants, args.steps, args.cache_dir, args.verify, args.trace, args.reference
        )
    )
    for (form, variant), value in ms.items():
        print(
            f"{form:5s} {variant:7s} {value:8.2f} ms/step"
            + (f" (1 + {args.verify} tokens)" if args.verify else "")
        )
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
