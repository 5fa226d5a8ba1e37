"""Many adapters, S-LoRA style: how throughput and latency grow with the number of adapters.

A `loraplex serve` subprocess on the embedded model (CPU) gets N stored adapters of random ranks
(--ranks, drawn uniformly) on the --targets modules; requests arrive as a Poisson process at
--rate per second, each naming an adapter drawn by a power law (popularity of the i-th adapter
∝ 1/i^alpha), with prompt and output lengths drawn from ranges (EOS ignored: equal work for
every configuration). Each configuration is compared with the same arrivals sent to one rank-16
adapter (the S-LoRA baseline), measured in the same run.

Reported per configuration: output tokens/s over the run, TTFT and inter-token latency p50/p99,
the slot loads and evictions and the adapters read from disk (the server's /metrics), the
upload rate while the adapters were stored; and a cold-start probe: on an idle server, the TTFT of
the first request to a rank-64 adapter evicted from host memory (read from disk, parsed, copied
into a slot) against the TTFT of the next request to it (warm).

Run (a few minutes on 2 cores): `python bench/many_adapters.py`; the issue's full configuration:
`python bench/many_adapters.py --adapters 200 --slots 32 --requests 400` (needs GBs of disk).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from safetensors.torch import save
from transformers import AutoConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, ServerProcess, machine_description, percentile
from server.engine.base_model import embedded_model_dir

TARGETS = {
    "qkvo": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qv": ("q_proj", "v_proj"),
    "all-linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
WORDS = (
    "the",
    "a",
    "model",
    "adapter",
    "server",
    "request",
    "token",
    "batch",
    "memory",
    "river",
    "story",
    "code",
)


# --------------------------------------------------------------------------- adapters


def module_shapes(config) -> dict[str, tuple[int, int]]:
    """(in, out) features of each projection of a Llama-style config."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # fmt: skip


def adapter_files(config, targets: tuple[str, ...], r: int, seed: int) -> tuple[bytes, bytes]:
    """A random PEFT LoRA adapter (config JSON, safetensors) for the embedded model."""
    g = torch.Generator().manual_seed(seed)
    shapes = module_shapes(config)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for module in targets:
            k, d = shapes[module]
            part = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            name = f"base_model.model.model.layers.{layer}.{part}.{module}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(r, k, generator=g) / k**0.5
            tensors[f"{name}.lora_B.weight"] = torch.randn(d, r, generator=g) * 0.02
    peft = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(targets), "bias": "none"}
    return json.dumps(peft).encode(), save(tensors)


def upload(url: str, adapter_id: str, files: tuple[bytes, bytes]) -> int:
    config, weights = files
    parts = [("files", ("adapter_config.json", config)), ("files", ("adapter_model.safetensors", weights))]
    r = httpx.post(url + "/adapters", data={"adapter_id": adapter_id}, files=parts, timeout=300)
    r.raise_for_status()
    return len(config) + len(weights)


# --------------------------------------------------------------------------- traffic


@dataclass
class Request:
    at: float  # seconds after the start
    adapter: str
    prompt: str
    new_tokens: int


@dataclass
class Result:
    ttft: float
    gaps: list[float]
    tokens: int
    end: float


def workload(ids: list[str], args, seed: int) -> list[Request]:
    """Poisson arrivals; adapter i drawn with weight 1/(i+1)^alpha; lengths uniform in their ranges."""
    rng = random.Random(seed)
    weights = [1 / (i + 1) ** args.alpha for i in range(len(ids))]
    t, out = 0.0, []
    for _ in range(args.requests):
        t += rng.expovariate(args.rate)
        words = rng.randint(*args.prompt_words)
        prompt = " ".join(rng.choice(WORDS) for _ in range(words))
        out.append(Request(t, rng.choices(ids, weights)[0], prompt, rng.randint(*args.output_tokens)))
    return out


async def _one(client: httpx.AsyncClient, url: str, req: Request, start: float) -> Result:
    await asyncio.sleep(max(0.0, start + req.at - time.perf_counter()))
    body = {"inputs": req.prompt, "parameters": {"adapter_id": req.adapter, "max_new_tokens": req.new_tokens,
                                                 "ignore_eos": True}}  # fmt: skip
    sent = time.perf_counter()
    stamps: list[float] = []
    async with client.stream("POST", url + "/generate_stream", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                if "error" in event:
                    raise RuntimeError(event["error"])
                stamps.append(time.perf_counter())
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return Result(stamps[0] - sent, gaps, len(stamps), stamps[-1])


async def _replay(url: str, requests: list[Request]) -> tuple[list[Result], float]:
    async with httpx.AsyncClient(
        timeout=900, limits=httpx.Limits(max_connections=len(requests) + 4)
    ) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(_one(client, url, r, start) for r in requests))
    return results, max(r.end for r in results) - start


def metric(url: str, name: str) -> float:
    """Sum of a counter/histogram-count series in /metrics (0 when absent)."""
    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(
        float(m.group(1)) for m in re.finditer(rf"^{name}(?:_total)?(?:{{[^}}]*}})? (\S+)$", text, re.M)
    )


COUNTERS = {"slot_loads": "loraplex_adapter_slot_loads", "evictions": "loraplex_adapter_slot_evictions",
            "disk_reads": "loraplex_adapter_load_seconds_count"}  # fmt: skip


@dataclass
class Row:
    name: str
    stored: int
    tokens_per_s: float
    ttft: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    counters: dict[str, float] = field(default_factory=dict)
    upload_mb_s: float | None = None


def run_traffic(server: ServerProcess, name: str, stored: int, requests: list[Request]) -> Row:
    before = {k: metric(server.url, m) for k, m in COUNTERS.items()}
    results, span = asyncio.run(_replay(server.url, requests))
    after = {k: metric(server.url, m) for k, m in COUNTERS.items()}
    row = Row(name, stored, sum(r.tokens for r in results) / span)
    row.ttft = [r.ttft for r in results]
    row.gaps = [g for r in results for g in r.gaps]
    row.counters = {k: after[k] - before[k] for k in COUNTERS}
    return row


def cold_probe(server: ServerProcess, adapter: str) -> tuple[float, float, float]:
    """TTFT of the first request to ``adapter`` and the best of the next three (warm), each with a
    prompt of its own (no prefix-cache hit); and the disk reads the first one caused (1: it was
    evicted from host memory, as intended)."""

    def ttft(prompt: str) -> float:
        return asyncio.run(_replay(server.url, [Request(0.0, adapter, prompt, 4)]))[0][0].ttft

    reads = metric(server.url, COUNTERS["disk_reads"])
    cold = ttft("the model serves a request about a river")
    reads = metric(server.url, COUNTERS["disk_reads"]) - reads
    warm = min(ttft(f"the server reads story {i} about memory and code") for i in range(3))
    return cold, warm, reads


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--adapters",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[10, 40],
        help="numbers of stored adapters to measure (default 10,40)",
    )
    parser.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16, 32, 64])
    parser.add_argument("--targets", choices=sorted(TARGETS), default="qkvo")
    parser.add_argument("--slots", type=int, default=16, help="--max-loaded-adapters")
    parser.add_argument("--host-cache-mb", type=int, default=256)
    parser.add_argument("--alpha", type=float, default=1.0, help="power-law exponent of popularity")
    parser.add_argument("--rate", type=float, default=4.0, help="arrivals per second (Poisson)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-words", type=lambda s: tuple(int(x) for x in s.split("-")), default=(8, 48))
    parser.add_argument(
        "--output-tokens", type=lambda s: tuple(int(x) for x in s.split("-")), default=(8, 32)
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "many-adapters-cpu.md")
    args = parser.parse_args()

    config = AutoConfig.from_pretrained(embedded_model_dir(Path("~/.cache/loraplex").expanduser()))
    rng = random.Random(args.seed)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess.start(["--data-dir", f"{tmp}/data", "--max-loaded-adapters", str(args.slots),
                                      "--host-cache-mb", str(args.host_cache_mb), "--max-batch", "32"])  # fmt: skip
        try:
            # the cold probe's adapter goes in first: the later uploads push it out of host memory
            upload(server.url, "probe-r64", adapter_files(config, TARGETS[args.targets], 64, seed=10_000))
            upload(server.url, "single-r16", adapter_files(config, TARGETS[args.targets], 16, seed=10_001))
            stored: list[str] = []
            for n in sorted(args.adapters):
                started, sent = time.perf_counter(), 0
                while len(stored) < n:
                    r = rng.choice(args.ranks)
                    adapter_id = f"a{len(stored):04d}-r{r}"
                    sent += upload(
                        server.url, adapter_id, adapter_files(config, TARGETS[args.targets], r, len(stored))
                    )
                    stored.append(adapter_id)
                upload_rate = sent / 2**20 / max(1e-9, time.perf_counter() - started)
                traffic = workload(stored, args, seed=args.seed + n)
                single = [Request(q.at, "single-r16", q.prompt, q.new_tokens) for q in traffic]
                rows.append(run_traffic(server, "one rank-16 adapter", 1, single))
                row = run_traffic(server, f"{n} adapters, ranks {args.ranks}", n + 2, traffic)
                row.upload_mb_s = upload_rate
                rows.append(row)
                print(f"{row.name}: {row.tokens_per_s:.1f} tok/s vs {rows[-2].tokens_per_s:.1f}", flush=True)
            cold, warm, cold_reads = cold_probe(server, "probe-r64")
        finally:
            server.stop()
    write_report(args, rows, cold, warm, cold_reads)


def write_report(args, rows: list[Row], cold: float, warm: float, cold_reads: float) -> None:
    def ms(values: list[float], q: float) -> str:
        return f"{percentile(values, q) * 1000:.0f}" if values else "-"

    lines = [
        f"## Run of {dt.date.today()}", "",
        f"`{' '.join(sys.argv)}`; {machine_description()}.", "",
        f"Embedded SmolLM2-135M, `--max-loaded-adapters {args.slots}`, `--host-cache-mb {args.host_cache_mb}`, "
        f"adapters on {args.targets} of ranks {args.ranks}; {args.requests} requests, Poisson at {args.rate}/s, "
        f"popularity ∝ 1/i^{args.alpha}, prompts of {args.prompt_words} words, {args.output_tokens} new tokens "
        "(EOS ignored). Each configuration runs right after the same arrivals sent to one rank-16 adapter.", "",
        "| configuration | stored | tok/s | vs one adapter | TTFT p50/p99 ms | ITL p50/p99 ms | slot loads | "
        "evictions | disk reads | upload MB/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for i, row in enumerate(rows):
        base = rows[i - 1] if i % 2 else row
        c = row.counters
        lines.append(
            f"| {row.name} | {row.stored} | {row.tokens_per_s:.1f} | {row.tokens_per_s / base.tokens_per_s:.2f}x | "
            f"{ms(row.ttft, 50)}/{ms(row.ttft, 99)} | {ms(row.gaps, 50)}/{ms(row.gaps, 99)} | "
            f"{c['slot_loads']:.0f} | {c['evictions']:.0f} | {c['disk_reads']:.0f} | "
            f"{'-' if row.upload_mb_s is None else f'{row.upload_mb_s:.1f}'} |"
        )
    where = "read from disk and parsed" if cold_reads else "still parsed in host memory"
    lines += ["", f"Cold start, idle server: the first request to a rank-64 adapter in no slot ({where}, then "
              f"copied into a slot): TTFT {cold * 1000:.0f} ms; the next requests to it (warm, best of 3): "
              f"{warm * 1000:.0f} ms; ratio {cold / warm:.2f}x.", ""]  # fmt: skip
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    new = not args.out.exists()
    with args.out.open("a") as f:  # runs are kept, newest last
        f.write(("# Many adapters (CPU)\n\n" if new else "\n") + text + "\n")


if __name__ == "__main__":
    main()
