"""The quantized linear kernels alone against the float32 one, on the embedded model's layer shapes.

One pass = every linear layer of SmolLM2-135M once (30 layers of qkv 960x576, o 576x576,
gate_up 3072x576, down 576x1536; distinct weights per layer, so that nothing stays in the caches
between layers) plus the tied LM head 49152x576: what a decode step's linear layers read.
Forms: float32 through the compiled gemv kernel (``gemv_cpu``, its blocked layout), int8 (per
output channel, float16 scales; the head too), int4 (groups of 32, float16 scale and min: the
layout of GGUF's Q4_1, which ``--quantization gguf`` keeps as shipped) with an int8 head, and
gguf as the embedded Q4_1 file serves it (Q4_1 layers, a Q8_0 head: groups of 32, float16
scales). Random weights (speed does not depend on the values).

Dot products (``--dots``): each quantized form runs with ``float`` inputs (the weights dequantized
in registers) and ``int`` ones (the inputs quantized to int8 blocks, integer dot products) on each
instruction set this CPU runs (AVX2, and AVX-512 VNNI where it has it: the row names it), all in
the same run.

Threads: every kernel runs on exactly the given number (the servers' kernels take one thread up
to 4 rows: ``gemv_cpu.ONE_THREAD_ROWS``, ``quant_cpu.ONE_THREAD_ROWS``). Every (form, dot, batch,
threads) measurement is interleaved with the others pass by pass; the
median of ``--passes`` passes is reported, with the ratio to float32 at the same batch and
threads (the only figures that mean anything on a shared machine).

    nice python -m bench.quant_kernels --passes 15 --out /tmp/quant-kernels.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from server.engine import gemv_cpu
from server.engine.native import quant_cpu, quantized

HIDDEN, INTER, QKV, VOCAB, LAYERS = 576, 1536, 960, 49152, 30
SHAPES = ((QKV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTER, HIDDEN), (HIDDEN, INTER))  # (out, in)


def _q8_0(weight: torch.Tensor) -> quantized.Int8Weight:
    """GGUF Q8_0's layout: int8 in groups of 32, one float16 scale each."""
    out, k = weight.shape
    w = weight.view(out, k // 32, 32)
    scale = (w.abs().amax(dim=2) / 127).clamp_min(1e-8).half()  # [out, groups]
    q = torch.round(w / scale.float()[:, :, None]).clamp(-127, 127).to(torch.int8).view(out, k)
    return quantized.Int8Weight(q, scale, 32, k)


def build(gen: torch.Generator) -> dict[str, list[tuple[object, int]]]:
    """Each form's weights for one pass: [(weight, out_features)]."""
    layer = [torch.randn(o, i, generator=gen) * 0.02 for o, i in SHAPES]
    head = torch.randn(VOCAB, HIDDEN, generator=gen) * 0.02
    int8 = [quantized.quantize_int8(w) for w in layer]
    int4 = [quantized.quantize_int4(w) for w in layer]
    head8 = quantized.quantize(head, "int8")
    forms: dict[str, list[tuple[object, int]]] = {"float32": [], "int8": [], "int4": [], "gguf": []}
    for _ in range(LAYERS):  # copies: each layer its own memory, as in the model
        forms["float32"] += [(gemv_cpu.pack(w), w.shape[0]) for w in layer]
        forms["int8"] += [(_copy(w), w.shape[0]) for w in int8]
        forms["int4"] += [(_copy(w), w.shape[0]) for w in int4]
    forms["gguf"] = list(forms["int4"])
    forms["float32"].append((gemv_cpu.pack(head), VOCAB))
    forms["int8"].append((head8, VOCAB))
    forms["int4"].append((head8, VOCAB))
    forms["gguf"].append((_q8_0(head), VOCAB))
    return forms


def _copy(w: quantized.Int8Weight | quantized.Q4Weight) -> quantized.Int8Weight | quantized.Q4Weight:
    if isinstance(w, quantized.Int8Weight):
        return quantized.Int8Weight(w.q.clone(), w.scale.clone(), w.group, w.in_features, w.min)
    m = None if w.min is None else w.min.clone()
    return quantized.Q4Weight(w.q.clone(), w.scale.clone(), m, w.offset, w.in_features)


def one_pass(
    form: str,
    weights: list[tuple[object, int]],
    xs: dict[int, torch.Tensor],
    threads: int,
    dot: str = "float",
    isa: str | None = None,
) -> tuple[float, float]:
    """(wall, CPU) seconds for every weight once at this batch (x: [batch, in] per input width),
    quantized forms with ``dot``'s kernels (``isa``: the integer ones' instruction set). CPU time
    counts the process's threads: on a loaded machine it leaves out the time spent waiting for a
    core, which the wall time includes."""
    gemv = gemv_cpu.load()
    quant = quant_cpu.load()
    assert gemv is not None and quant is not None, "the compiled kernels did not build"
    assert dot == "float" or quant.int_checked, "the integer kernels did not pass their check"
    quant_cpu.configure_dot(dot)  # type: ignore[arg-type]
    if isa is not None:  # every instruction set this CPU runs passed its check (main asserts it)
        quant.int_isa = isa  # type: ignore[assignment]
    torch.set_num_threads(threads)
    start, cpu = time.perf_counter(), time.process_time()
    for weight, out_features in weights:
        if form == "float32":
            assert isinstance(weight, torch.Tensor)
            x = xs[weight.shape[1]]
            y = torch.empty(x.shape[0], out_features)
            gemv._fn(
                x.data_ptr(), x.stride(0), x.shape[0], weight.data_ptr(), weight.shape[1], out_features,
                None, y.data_ptr(), y.stride(0), 0, threads,
            )  # fmt: skip
        else:
            x = xs[weight.in_features]  # type: ignore[attr-defined]
            quantized.linear(x, weight)  # type: ignore[arg-type]
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--passes", type=int, default=15)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--forms", nargs="+", default=["float32", "int8", "int4", "gguf"])
    parser.add_argument("--dots", nargs="+", default=["float", "int"], choices=quant_cpu.DOTS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    quant_cpu.ONE_THREAD_ROWS = 0  # every kernel on exactly ``threads`` threads, whatever the batch
    quant = quant_cpu.load()
    assert quant is not None, "the compiled kernels did not build"
    assert "int" not in args.dots or quant.int_isa == quant.isas[-1], (
        "every integer kernel must pass its check"
    )
    gen = torch.Generator().manual_seed(0)
    weights = {f: w for f, w in build(gen).items() if f in args.forms}
    # (name, form, dot, instruction set): float32 once, each quantized form with each dot product
    # (int: on each instruction set this CPU runs, AVX2 and, where it has it, VNNI)
    variants = [(f, f, "float", None) for f in weights if f == "float32"] + [
        (f"{f} {dot}" if dot == "float" else f"{f} int ({isa})", f, dot, isa)
        for f in weights
        if f != "float32"
        for dot in args.dots
        for isa in ([None] if dot == "float" else quant.isas)
    ]
    best = quant.int_isa
    forms = {name: (form, dot, isa) for name, form, dot, isa in variants}
    inputs = {b: {k: torch.randn(b, k, generator=gen) for k in (HIDDEN, INTER)} for b in args.batches}
    cases = [(f, b, t) for b in args.batches for t in args.threads for f in forms]
    times: dict[tuple[str, int, int], list[tuple[float, float]]] = {c: [] for c in cases}

    def run(case: tuple[str, int, int]) -> tuple[float, float]:
        form, dot, isa = forms[case[0]]
        return one_pass(form, weights[form], inputs[case[1]], case[2], dot, isa)

    for case in cases:  # warm-up (builds the kernels, faults the pages in)
        run(case)
    load_before = os.getloadavg()
    for _ in range(args.passes):
        for case in cases:
            times[case].append(run(case))
    load_after = os.getloadavg()
    quant.int_isa = best
    form_bytes = {
        f: sum(w.numel() * 4 if isinstance(w, torch.Tensor) else w.nbytes for w, _ in ws)  # type: ignore[attr-defined]
        for f, ws in weights.items()
    }
    nbytes = {name: form_bytes[form] for name, (form, _, _) in forms.items()}
    lines = [
        "# Quantized linear kernels alone against float32 (one decode step's linear layers)",
        "",
        f"- command: `python -m bench.quant_kernels --passes {args.passes}`",
        f"- load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} "
        f"({os.cpu_count()} CPUs), torch {torch.__version__}",
        "- bytes per pass: " + ", ".join(f"{f} {form_bytes[f] / 1e6:.0f} MB" for f in weights),
        "",
        "| batch | threads | form | wall ms per pass (median) | GB/s | vs float32 | CPU ms | vs float32 (CPU) |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]

    def median(case: tuple[str, int, int], i: int) -> float:
        return statistics.median(m[i] for m in times[case]) if case in times else float("nan")

    for b in args.batches:
        for t in args.threads:
            wall0, cpu0 = median(("float32", b, t), 0), median(("float32", b, t), 1)
            for f in forms:
                wall, cpu = median((f, b, t), 0), median((f, b, t), 1)
                lines.append(
                    f"| {b} | {t} | {f} | {wall * 1e3:.2f} | {nbytes[f] / wall / 1e9:.1f} | {wall0 / wall:.2f}x "
                    f"| {cpu * 1e3:.2f} | {cpu0 / cpu:.2f}x |"
                )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
