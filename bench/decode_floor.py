"""One stream against the machine's floor: read bandwidth, the weights' bytes per decode step,
the engine's batch-1 step, and one request's tokens/s over HTTP, per weight layout, in one run.

1. read bandwidth: a streaming read (``torch.sum``) of a buffer far larger than the caches, with 1
   and with 2 threads (GB/s, best of 10);
2. the weights a decode step reads: every linear layer and the LM head (float32 bytes); the
   step's floor = those bytes / the 2-thread bandwidth;
3. the linear layers alone at batch 1 in each layout (the pass of ``bench/efficiency.py``'s floor);
4. the engine's decode step (no HTTP) at batch 1 and 16, base rows and rows with a random
   all-linear rank-16 adapter, for each ``--weight-layout``, interleaved rounds, medians;
5. over HTTP (`loraplex serve`, one server per layout): one request at a time of 96 greedy new
   tokens (EOS ignored), streaming (``/generate_stream``) and not (``/generate``), base and with
   the adapter; tokens/s = 96 / the request's wall time (prefill included, as llama.cpp's
   figures in issue 25 were taken), and beside it the same request submitted to an engine in this
   process (served / engine: what HTTP, events and detokenizing cost);
6. with ``--llama-cpp``: llama.cpp's ``llama-server`` in the same rounds, on the same weights as an
   F32 GGUF and on the Q4_1 file loraplex ships, beside ``loraplex serve --quantization gguf`` on
   that file (base model: llama-server would need the adapter converted to its own format). The
   first run builds llama.cpp from the pinned source package (``bench/llamacpp.py``; install the
   ``bench-llamacpp`` extra's toolchain: cmake and a C++ compiler).

Besides the weight layouts, ``--layouts`` takes two variants of ``blocked``, for A/B runs:
``blocked-unfused`` (engine only: the PyTorch ops between the linear layers, as before
``native/fused_cpu.py``) and ``blocked-t2`` (small steps on 2 threads, ``LORAPLEX_DECODE_THREADS=2``: its engine here and
its own server). The loads and measurements run on threads of their own; each is the process's only OpenMP team
while it runs, as the server's engine thread is (``bench.common.on_engine_thread``).

Run: ``nice .venv/bin/python bench/decode_floor.py [--rounds 3] [--llama-cpp]``; results in
bench/results/decode-cpu.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.peft_format import load_adapter_dir
from bench import llamacpp
from bench.common import (
    ROOT,
    ServerProcess,
    machine_description,
    on_engine_thread,
    teamless_main_thread,
    write_random_adapter,
)
from bench.efficiency import PROMPT, decode_step_seconds, linear_weights
from server.engine import gemv_cpu
from server.engine.base_model import embedded_gguf_path, embedded_model_dir
from server.engine.decode_threads import DecodeThreads
from server.engine.native import onednn
from server.engine.requests import GenerationRequest
from server.engine.sampling import SamplingParams

NEW_TOKENS = 96
LAYOUTS = ("blocked", "packed")
LLAMA_CPP_F32 = (
    "39-48 tok/s base, 35-44 with the caps adapter (issue 25's run on this machine, not re-measured)"
)


def read_bandwidth(threads: int, megabytes: int = 512, reps: int = 10) -> float:
    """GB/s of a streaming read of ``megabytes`` (best of ``reps``) with ``threads`` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buffer = torch.ones(megabytes * 2**20 // 4)
        buffer.sum()  # touched once: pages mapped
        best = min(_timed(buffer.sum) for _ in range(reps))
        return buffer.numel() * 4 / best / 1e9
    finally:
        torch.set_num_threads(before)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def linear_pass_seconds(weights: list[torch.Tensor], layout: str, reps: int = 20) -> float:
    """Median time of one batch-1 pass over every weight in this layout (``blocked-2t``: the
    compiled kernel on PyTorch's threads instead of the calling thread alone)."""
    kernel = gemv_cpu.load() if layout.startswith("blocked") else None
    if layout == "blocked-2t":
        one_thread_rows, gemv_cpu.ONE_THREAD_ROWS = gemv_cpu.ONE_THREAD_ROWS, 0
        try:
            return linear_pass_seconds(weights, "blocked", reps)
        finally:
            gemv_cpu.ONE_THREAD_ROWS = one_thread_rows
    if layout == "blocked":
        assert kernel is not None
        packed = [gemv_cpu.pack(w) for w in weights]
        calls = [
            lambda x, p=p, n=w.shape[0]: kernel.linear(x, p, n) for p, w in zip(packed, weights, strict=True)
        ]
    elif layout == "packed":
        packed = [onednn.pack(w) for w in weights]
        calls = [lambda x, p=p: onednn.linear(x, p) for p in packed]
    else:
        calls = [lambda x, w=w: torch.mm(x, w.t()) for w in weights]
    inputs = [torch.randn(1, w.shape[1]) for w in weights]

    def one_pass() -> None:
        for call, x in zip(calls, inputs, strict=True):
            call(x)

    with torch.inference_mode():
        return statistics.median([_timed(one_pass) for _ in range(reps + 2)][2:])


def engine_request_seconds(engine, prompt_ids: list[int], adapter) -> float:
    """Wall time of one request of NEW_TOKENS submitted to the engine directly."""
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    start = time.perf_counter()
    engine.submit(GenerationRequest(list(prompt_ids), params, adapter, sink=lambda _: None))
    engine.run_until_idle()
    return time.perf_counter() - start


async def http_request_seconds(url: str, adapter: str | None, stream: bool) -> float:
    """Wall time of one request of NEW_TOKENS over HTTP (streaming: until the last event)."""
    body = {
        "inputs": PROMPT,
        "parameters": {"max_new_tokens": NEW_TOKENS, "ignore_eos": True, "adapter_id": adapter},
    }
    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        if not stream:
            response = await client.post(url + "/generate", json=body)
            response.raise_for_status()
            assert response.json()["details"]["generated_tokens"] == NEW_TOKENS
            return time.perf_counter() - start
        tokens = 0
        async with client.stream("POST", url + "/generate_stream", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                tokens += line.startswith("data:")
        assert tokens == NEW_TOKENS, tokens
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians kept)")
    parser.add_argument("--steps", type=int, default=24, help="decode steps timed per measurement")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="weight layouts: blocked, packed, dense")
    parser.add_argument("--no-http", action="store_true")
    parser.add_argument(
        "--llama-cpp", action="store_true", help="add llama.cpp's llama-server (F32, Q4_1) and loraplex gguf"
    )
    parser.add_argument(
        "--speculate",
        type=int,
        default=None,
        help="--speculate N for every loraplex server (default: the server's own, 4); 0 measures the plain "
        "decode step, as llama-server runs without a draft",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/decode-cpu.md")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    teamless_main_thread()  # every load and measurement below runs on_engine_thread
    layouts = [name for name in args.layouts.split(",") if name]
    device, dtype = torch.device("cpu"), torch.float32
    model_dir = embedded_model_dir(Path("~/.cache/loraplex").expanduser())
    prompt_ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT)["input_ids"]

    weights = on_engine_thread(lambda: linear_weights(model_dir, dtype, device))
    step_bytes = sum(w.numel() * w.element_size() for w in weights)
    bandwidth: dict[int, list[float]] = {1: [], 2: []}
    passes: dict[str, list[float]] = {
        name: [] for name in ("dense", "blocked-2t", *layouts) if name not in VARIANTS
    }
    timed: dict[tuple[str, str], list[float]] = {}  # (layout, what) -> seconds per round
    servers: dict[str, ServerProcess] = {}
    anchors = _llama_cpp_files() if args.llama_cpp and not args.no_http else {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        engines = on_engine_thread(lambda: {name: _layout_engine(name, model_dir) for name in layouts})
        adapter_dir = write_random_adapter(
            engines[layouts[0]].base_shapes, Path(tmp) / "all-linear-r16", seed=0, r=16, lora_alpha=32
        )
        adapters = {
            n: load_adapter_dir(adapter_dir, "all-linear-r16", e.base_shapes) for n, e in engines.items()
        }
        try:
            if not args.no_http:
                served = [name for name in layouts if name != "blocked-unfused"]
                servers = {
                    name: _start_server(name, adapter_dir, Path(tmp), args.speculate) for name in served
                }
            if anchors:
                servers["gguf"] = _start_server("gguf", adapter_dir, Path(tmp), args.speculate)
            llama_servers = {
                name: stack.enter_context(llamacpp.llama_server(bin_dir, gguf))
                for name, (bin_dir, gguf) in anchors.items()
            }
            for _ in range(args.rounds):  # everything interleaved: this machine's load drifts
                for threads in bandwidth:
                    bandwidth[threads].append(on_engine_thread(lambda t=threads: read_bandwidth(t)))
                for name in passes:
                    passes[name].append(on_engine_thread(lambda n=name: linear_pass_seconds(weights, n)))
                for name, engine in engines.items():
                    _measure_round(
                        name, engine, servers.get(name), prompt_ids, adapters[name], args.steps, timed
                    )
                if anchors:
                    _measure_anchors(servers["gguf"], llama_servers, timed)
            for name, server in llama_servers.items():
                timed[(name, "peak_mib")] = [server.memory_kib("VmHWM") / 1024]
            for name, server in servers.items():
                timed[(name, "peak_mib")] = [server.memory_kib("VmHWM") / 1024]
        finally:
            for server in servers.values():
                server.stop()
        del engines

    report = render(args, layouts, bandwidth, step_bytes, passes, timed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)


VARIANTS = {"blocked-unfused", "blocked-t2"}  # of blocked: see the module docstring


def _measure_round(name, engine, server, prompt_ids, adapter, steps: int, timed: dict) -> None:
    """One round for one layout: decode steps, one request in the engine (on a thread of its own,
    as the server's: ``bench.common.on_engine_thread``), the same over HTTP."""
    for batch in (1, 16):
        for kind, rows in (("base", [None] * batch), ("lora", [adapter] * batch)):
            seconds = on_engine_thread(lambda rows=rows: decode_step_seconds(engine, prompt_ids, rows, steps))
            timed.setdefault((name, f"step-{kind}-{batch}"), []).append(seconds)
    for kind, row_adapter in (("base", None), ("lora", adapter)):
        timed.setdefault((name, f"engine-{kind}"), []).append(
            on_engine_thread(lambda a=row_adapter: engine_request_seconds(engine, prompt_ids, a))
        )
        if server is None:
            continue
        for stream in (True, False):
            seconds = asyncio.run(http_request_seconds(server.url, "caps" if row_adapter else None, stream))
            timed.setdefault((name, f"{'stream' if stream else 'json'}-{kind}"), []).append(seconds)


def _llama_cpp_files() -> dict[str, tuple[Path, Path]]:
    """llama.cpp's programs (built once) and the GGUF files it serves: name -> (bin dir, file)."""
    bin_dir = llamacpp.build()
    shipped = embedded_gguf_path()
    return {
        "llama.cpp F32": (bin_dir, llamacpp.requantized(bin_dir, shipped, "F32")),
        "llama.cpp Q4_1": (bin_dir, shipped),
    }


def _measure_anchors(gguf_server: ServerProcess, llama_servers: dict, timed: dict) -> None:
    """One round of the base request over HTTP on loraplex gguf and on each llama-server."""
    for stream in (True, False):
        kind = "stream" if stream else "json"
        seconds = asyncio.run(http_request_seconds(gguf_server.url, None, stream))
        timed.setdefault(("gguf", f"{kind}-base"), []).append(seconds)
        for name, server in llama_servers.items():
            seconds = asyncio.run(llamacpp.request_seconds(server.url, PROMPT, NEW_TOKENS, stream))
            timed.setdefault((name, f"{kind}-base"), []).append(seconds)


def _layout_engine(layout: str, model_dir: Path):
    from server.engine.base_model import build_engine_for_dir
    from server.engine.engine import EngineConfig

    engine = build_engine_for_dir(
        model_dir, "native", torch.float32, torch.device("cpu"), EngineConfig(mode="unmerged", max_batch=16),
        weight_layout="blocked" if layout in VARIANTS else layout,
    )  # fmt: skip
    if layout == "blocked-unfused":
        engine.runner.model.fused = None
    if layout == "blocked-t2":  # as its server's LORAPLEX_DECODE_THREADS=2
        engine.runner.decode_threads = DecodeThreads(2, torch.get_num_threads())
    return engine


def _start_server(layout: str, adapter_dir: Path, root: Path, speculate: int | None) -> ServerProcess:
    """``loraplex serve`` with ``layout`` (a float32 weight layout, or ``gguf``: the shipped blocks)."""
    form = ["--quantization", "gguf"] if layout == "gguf" else ["--weight-layout", layout.split("-")[0]]
    if speculate is not None:
        form += ["--speculate", str(speculate)]
    with _environment(LORAPLEX_DECODE_THREADS="2" if layout == "blocked-t2" else None):
        server = ServerProcess.start(
            [*form, "--mode", "unmerged", "--adapter", f"caps={adapter_dir}",
             "--data-dir", str(root / f"data-{layout}")]
        )  # fmt: skip
    asyncio.run(http_request_seconds(server.url, None, True))  # warm-up
    return server


@contextlib.contextmanager
def _environment(**values: str | None):
    """os.environ with ``values`` set (None: removed) for the block (what a server started in it sees)."""

    def put(settings: dict[str, str | None]) -> None:
        for name, value in settings.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    saved = {name: os.environ.get(name) for name in values}
    put(values)
    try:
        yield
    finally:
        put(saved)


def _cell(times: list[float], scale: float, invert: bool = False) -> str:
    """``median (best)`` of per-round times, as ms (scale 1000) or as a rate (invert: scale / t)."""
    med, best = statistics.median(times), min(times)
    if invert:
        return f"{scale / med:.1f} ({scale / best:.1f})"
    return f"{med * scale:.1f} ({best * scale:.1f})"


def render(args, layouts, bandwidth, step_bytes, passes, timed) -> str:
    ms = 1000.0
    best_bandwidth = {t: max(v) for t, v in bandwidth.items()}
    floor = step_bytes / (best_bandwidth[2] * 1e9)
    lines = [
        "# One stream against the machine's floor (CPU, float32)",
        "",
        f"- date: {dt.date.today().isoformat()}",
        f"- machine: {machine_description()}",
        f"- command: `nice .venv/bin/python bench/decode_floor.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"- model: embedded SmolLM2-135M-Instruct, float32; {args.rounds} rounds, every measurement of a "
        "round interleaved with the others (engine in this process, one `loraplex serve` per layout "
        "running throughout); cells: median over rounds (best round)",
        "",
        "## The floor",
        "",
        f"- read bandwidth (streaming `torch.sum` of 512 MiB, best of 10 per round): "
        f"{statistics.median(bandwidth[1]):.1f} ({best_bandwidth[1]:.1f}) GB/s with 1 thread, "
        f"{statistics.median(bandwidth[2]):.1f} ({best_bandwidth[2]:.1f}) GB/s with 2",
        f"- weights read per decode step (every linear layer + LM head): {step_bytes / 1e6:.0f} MB",
        f"- floor = bytes / best 2-thread bandwidth: **{floor * ms:.1f} ms per step** ({1 / floor:.0f} tok/s)",
        "",
        "| linear layers alone, batch 1 | ms | GB/s of the best | floor / best |",
        "| --- | ---: | ---: | ---: |",
    ]
    names = {
        "dense": "dense `x @ W.T` (MKL)",
        "packed": "oneDNN packed",
        "blocked": "compiled kernel, blocked (1 thread: the default at batch 1)",
        "blocked-2t": "compiled kernel, blocked, 2 threads",
    }
    for name, times in passes.items():
        best = min(times)
        lines.append(
            f"| {names[name]} | {_cell(times, ms)} | {step_bytes / best / 1e9:.1f} | {floor / best:.2f} |"
        )
    lines += [
        "",
        "## Engine decode step (no HTTP), ms",
        "",
        "| weight layout | batch | base step | floor / best | adapter step | floor / best |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in layouts:
        for batch in (1, 16):
            base, lora = timed[(name, f"step-base-{batch}")], timed[(name, f"step-lora-{batch}")]
            lines.append(
                f"| {name} | {batch} | {_cell(base, ms)} | {floor / min(base):.2f} | {_cell(lora, ms)} "
                f"| {floor / min(lora):.2f} |"
            )
    if "blocked-unfused" in layouts:
        lines += ["", *_step_ratios([n for n in layouts if n != "blocked-unfused"], timed)]
    lines += [
        "",
        f"## One request of {NEW_TOKENS} greedy tokens at a time (prefill included): tokens/s",
        "",
        f"llama.cpp F32 for comparison: {LLAMA_CPP_F32}.",
        "",
        "| weight layout | engine, base | HTTP stream, base | HTTP json, base | engine, adapter "
        "| HTTP stream, adapter | HTTP json, adapter | peak RSS MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    anchors = [name for name in ("gguf", "llama.cpp F32", "llama.cpp Q4_1") if (name, "stream-base") in timed]
    for name in [*layouts, *anchors]:
        cells = [
            _cell(timed[(name, key)], NEW_TOKENS, invert=True) if (name, key) in timed else "-"
            for key in ("engine-base", "stream-base", "json-base", "engine-lora", "stream-lora", "json-lora")
        ]
        peak = f"{timed[(name, 'peak_mib')][0]:.0f}" if (name, "peak_mib") in timed else "-"
        label = "loraplex `--quantization gguf` (Q4_1 blocks)" if name == "gguf" else name
        lines.append(f"| {label} | {' | '.join(cells)} | {peak} |")
    if anchors:
        lines += ["", *_anchor_ratios(layouts, timed)]
    return "\n".join(lines) + "\n"


def _step_ratios(layouts: list[str], timed: dict) -> list[str]:
    """The step of each blocked form against ``blocked-unfused``'s (the PyTorch ops between the
    linear layers), per round then median: unfused seconds / its seconds (>1: faster)."""
    lines = [
        "| step speed-up over `blocked-unfused`, same rounds | batch | base | adapter |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name in (n for n in layouts if n.startswith("blocked")):
        for batch in (1, 16):
            cells = []
            for kind in ("base", "lora"):
                key = f"step-{kind}-{batch}"
                pairs = zip(timed[("blocked-unfused", key)], timed[(name, key)], strict=True)
                per_round = [old / new for old, new in pairs]
                rounds = ", ".join(f"{r:.2f}" for r in per_round)
                cells.append(f"{statistics.median(per_round):.2f}x ({rounds})")
            lines.append(f"| `{name}` | {batch} | {' | '.join(cells)} |")
    return lines


def _anchor_ratios(layouts: list[str], timed: dict) -> list[str]:
    """loraplex's one-stream tokens/s over llama-server's, per round then median (issue 25's targets)."""

    def ratio(ours: str, theirs: str, kind: str) -> str:
        pairs = zip(timed[(ours, kind)], timed[(theirs, kind)], strict=True)
        per_round = [their / our for our, their in pairs]  # tokens/s ratio = their seconds / ours
        return f"{statistics.median(per_round):.2f}x (rounds {', '.join(f'{r:.2f}' for r in per_round)})"

    lines = [
        "| loraplex / llama.cpp, one stream, base | HTTP stream | HTTP json | target |",
        "| --- | ---: | ---: | ---: |",
    ]
    for ours in (name for name in layouts if (name, "stream-base") in timed):
        cells = [ratio(ours, "llama.cpp F32", f"{kind}-base") for kind in ("stream", "json")]
        lines.append(f"| float32 `{ours}` / llama.cpp F32 | {' | '.join(cells)} | >= 1.0x |")
    cells = [ratio("gguf", "llama.cpp Q4_1", f"{kind}-base") for kind in ("stream", "json")]
    lines.append(f"| gguf (Q4_1) / llama.cpp Q4_1 | {' | '.join(cells)} | >= 0.8x |")
    return lines


if __name__ == "__main__":
    main()
