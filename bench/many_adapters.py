"""Many adapters, S-LoRA style: how throughput and latency grow with the number of adapters.

A `loraplex serve` subprocess on the embedded model (CPU) gets N stored adapters of random ranks
(--ranks, drawn uniformly) on the --targets modules; requests arrive as a Poisson process at
--rate per second, each naming an adapter drawn by a power law (popularity of the i-th adapter
∝ 1/i^alpha), with prompt and output lengths drawn from ranges (EOS ignored: equal work for
every configuration). Each configuration is compared with the same arrivals sent to one rank-16
adapter (the S-LoRA baseline), measured in the same run.

The adapters are written into the store before the server starts (``--stored`` of them, through
``AdapterStore.put``: the checks of an upload, without HTTP), so a run spends its time serving;
``--http-uploads`` more go through ``POST /adapters`` to measure the upload rate. A configuration
of N adapters sends its traffic to the first N stored ones. The single-adapter baseline and each
configuration alternate in ``--rounds`` rounds (the same arrivals within a round): the machine is
shared and noisy, so only the ratios within a round are compared.

Reported per configuration and round: output tokens/s over the run, TTFT and inter-token latency
p50/p99, the slot loads and evictions and the adapters read from disk (the server's /metrics); a
cold-start probe: on an idle server, the TTFT of the first request to rank-64 adapters never used
(read from disk, parsed, staged on the loader thread, installed in a slot) against the TTFT of the
next requests to them (warm); and the slot policy on the same power-law traffic, simulated: the hit
rate of LRU (the server's) against LFU and Belady's optimum (the bound no policy beats).

Run (minutes on 2 cores): `python bench/many_adapters.py`; the issue's configuration is the
default (200 adapters of ranks 8-64 on q/k/v/o, 32 slots); growth: `--adapters 200,1000
--stored 1000`, `--targets all-linear --ranks 64`. The cold-start probe alone (about a minute):
`--only cold`: ``--slots`` adapters are stored and each used once, so every slot is taken (as after
the traffic rounds) and each probe evicts one; no traffic rounds, no uploads, no simulation.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import httpx
import torch
from safetensors.torch import save
from transformers import AutoConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.archive import AdapterFiles
from adapters.peft_format import BaseLinearShape
from adapters.store import AdapterStore
from bench.common import ROOT, ServerProcess, machine_description, percentile
from server.engine.base_model import embedded_model_dir
from server.engine.lora_model import AdapterSlots

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


def base_shapes(config) -> dict[str, BaseLinearShape]:
    """The embedded model's adaptable layers by PEFT module name (what the store validates against)."""
    shapes = module_shapes(config)
    return {
        f"model.layers.{layer}.{'mlp' if m in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{m}":
            BaseLinearShape(out_features=d, in_features=k)
        for layer in range(config.num_hidden_layers)
        for m, (k, d) in shapes.items()
    }  # fmt: skip


_TEMPLATES: dict[tuple[tuple[str, ...], int], dict[str, torch.Tensor]] = {}


def adapter_files(config, targets: tuple[str, ...], r: int, seed: int) -> tuple[bytes, bytes]:
    """A random PEFT LoRA adapter (config JSON, safetensors in float16, as fine-tunes are usually
    shipped: half the bytes to store and read) for the embedded model. Drawing 1,000 adapters'
    worth of random numbers on the shared cores took longer than serving them: one random
    template per (targets, rank) is drawn once, and each adapter is it with its B factors scaled
    by a factor of its own (other bytes, other sha256, the same cost to serve)."""
    key = (targets, r)
    if key not in _TEMPLATES:
        g = torch.Generator().manual_seed(r)
        shapes = module_shapes(config)
        template = {}
        for layer in range(config.num_hidden_layers):
            for module in targets:
                k, d = shapes[module]
                part = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
                name = f"base_model.model.model.layers.{layer}.{part}.{module}"
                template[f"{name}.lora_A.weight"] = (torch.randn(r, k, generator=g) / k**0.5).half()
                template[f"{name}.lora_B.weight"] = torch.randn(d, r, generator=g) * 0.02
        _TEMPLATES[key] = template
    factor = 0.5 + (seed % 1009) / 1009
    tensors = {
        name: t if name.endswith("lora_A.weight") else (t * factor).half()
        for name, t in _TEMPLATES[key].items()
    }
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
    round: int = 0
    in_traffic: int = 1
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


def settle_checks(server: ServerProcess, timeout: float = 300.0) -> None:
    """Wait until the store's background sha256 checks are done: the adapters written before the
    server started are new versions to it, and it hashes each once (``adapters/stamps.py``) before
    trusting its stamp. The cold-start probe is of an idle server, not of one still checking
    its store: those checks compete for the cores and hold the GIL in turns with the engine."""
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    while metric(server.url, "loraplex_adapter_checks_pending") > 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"background checks still pending after {timeout:.0f} s")
        time.sleep(0.5)
    print(f"background checks settled after {time.monotonic() - started:.1f} s", flush=True)


def cold_probe(
    server: ServerProcess, adapter: str
) -> tuple[float, float, float, float, float, float, float, float]:
    """TTFT of the first request to ``adapter`` and the best of the next three (warm), each with a
    prompt of its own (no prefix-cache hit); the disk reads the first one caused (1: it was not in
    host memory, as intended); and the merged-mode swaps (``--mode auto``: merge or unmerge) during
    the cold request and during the warm ones. Sequential requests to one adapter make auto mode
    merge it (the warm ones may then run merged, and the next probe's cold request first unmerges):
    a swap is not the adapter's load, so the report counts them. Last, the server's own account
    of the cold request's two loads, in seconds: the read from disk on an API worker
    (``loraplex_adapter_load_seconds``) and the slot contents built on the loader thread
    (``loraplex_adapter_slot_load_seconds``), and the process's minor page faults during it
    (``loraplex_process_minor_page_faults``: the new memory the load wrote)."""

    def ttft(prompt: str) -> float:
        return asyncio.run(_replay(server.url, [Request(0.0, adapter, prompt, 4)]))[0][0].ttft

    reads, swaps = metric(server.url, COUNTERS["disk_reads"]), metric(server.url, "loraplex_swaps")
    read_s, stage_s = (metric(server.url, m) for m in (READ_SECONDS, STAGE_SECONDS))
    faults = metric(server.url, FAULTS)
    cold = ttft("the model serves a request about a river")
    faults = metric(server.url, FAULTS) - faults
    reads = metric(server.url, COUNTERS["disk_reads"]) - reads
    read_s, stage_s = metric(server.url, READ_SECONDS) - read_s, metric(server.url, STAGE_SECONDS) - stage_s
    cold_swaps = metric(server.url, "loraplex_swaps") - swaps
    warm = min(ttft(f"the server reads story {i} about memory and code") for i in range(3))
    warm_swaps = metric(server.url, "loraplex_swaps") - swaps - cold_swaps
    return cold, warm, reads, cold_swaps, warm_swaps, read_s, stage_s, faults


READ_SECONDS = "loraplex_adapter_load_seconds_sum"  # the API worker's read from disk (histogram)
FAULTS = "loraplex_process_minor_page_faults_total"  # new memory touched (the server's whole process)
STAGE_SECONDS = "loraplex_adapter_slot_load_seconds"  # the loader thread's staging (counter)


# --------------------------------------------------------------------------- slot policy


def simulate_policies(trace: list[str], capacity: int) -> dict[str, float]:
    """Hit rates of slot policies replaying ``trace`` (adapter per request, in order) with
    ``capacity`` slots, one request at a time (no request pins a slot: the bound of each policy)."""

    def lru() -> int:
        slots: OrderedDict[str, None] = OrderedDict()
        hits = 0
        for a in trace:
            if a in slots:
                hits += 1
                slots.move_to_end(a)
                continue
            if len(slots) >= capacity:
                slots.popitem(last=False)
            slots[a] = None
        return hits

    def lfu() -> int:  # by the count of requests seen so far (ties: least recent)
        counts: Counter[str] = Counter()
        slots: dict[str, int] = {}
        hits = 0
        for t, a in enumerate(trace):
            counts[a] += 1
            if a in slots:
                hits += 1
            elif len(slots) >= capacity:
                del slots[min(slots, key=lambda s: (counts[s], slots[s]))]
            slots[a] = t
        return hits

    def belady() -> int:  # evict the adapter used again furthest in the future
        next_use: list[int] = [0] * len(trace)
        last: dict[str, int] = {}
        for t in range(len(trace) - 1, -1, -1):
            next_use[t] = last.get(trace[t], len(trace))
            last[trace[t]] = t
        slots: dict[str, int] = {}
        hits = 0
        for t, a in enumerate(trace):
            if a in slots:
                hits += 1
            elif len(slots) >= capacity:
                del slots[max(slots, key=slots.__getitem__)]
            slots[a] = next_use[t]
        return hits

    def served() -> int:  # the server's own policy (AdapterSlots), on adapters with nothing to copy
        slots = AdapterSlots({}, capacity)
        for a in trace:
            slots.acquire(SimpleNamespace(key=a, adapter_id=a, layers={}, vocab={}))
            slots.release(a)
        return len(trace) - slots.loads

    n = max(1, len(trace))
    return {"LRU": lru() / n, "LFU": lfu() / n, "AdapterSlots": served() / n, "optimal": belady() / n}


# --------------------------------------------------------------------------- main


def preload(data_dir: Path, config, args, rng: random.Random) -> tuple[list[str], float]:
    """Store the probes, the rank-16 baseline and ``--stored`` adapters before the server starts."""
    targets = TARGETS[args.targets]
    stored: list[str] = []
    seconds, sent = 0.0, 0  # in store.put only (making the random adapters is not counted)
    real_fsync = os.fsync
    os.fsync = lambda fd: None  # durability is not measured here; 1,000 fsyncs on a shared disk are
    try:
        with AdapterStore(data_dir) as store:
            store.bind_base(base_shapes(config), max_rank=max(64, *args.ranks))

            def put(adapter_id: str, r: int, seed: int) -> None:
                nonlocal sent, seconds
                config_bytes, weights = adapter_files(config, targets, r, seed)
                started = time.perf_counter()
                store.put(adapter_id, AdapterFiles(config=config_bytes, weights=weights))
                seconds += time.perf_counter() - started
                sent += len(config_bytes) + len(weights)

            for i in range(args.probes):
                put(f"probe{i}-r64", 64, 10_000 + i)
            put("single-r16", 16, 10_100)
            for i in range(args.stored):
                r = rng.choice(args.ranks)
                put(f"a{i:04d}-r{r}", r, i)
                stored.append(f"a{i:04d}-r{r}")
    finally:
        os.fsync = real_fsync
    return stored, sent / 2**20 / max(1e-9, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--adapters",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[200],
        help="numbers of adapters the traffic is spread over (default 200)",
    )
    parser.add_argument(
        "--stored", type=int, default=None, help="adapters stored (default: the largest --adapters)"
    )
    parser.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16, 32, 64])
    parser.add_argument("--targets", choices=sorted(TARGETS), default="qkvo")
    parser.add_argument("--slots", type=int, default=32, help="--max-loaded-adapters")
    parser.add_argument("--host-cache-mb", type=int, default=1024)
    parser.add_argument("--alpha", type=float, default=1.0, help="power-law exponent of popularity")
    parser.add_argument("--rate", type=float, default=4.0, help="arrivals per second (Poisson)")
    parser.add_argument("--requests", type=int, default=48, help="requests per configuration and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--probes", type=int, default=3, help="rank-64 adapters for the cold-start probe")
    parser.add_argument(
        "--http-uploads", type=int, default=4, help="adapters uploaded over HTTP (upload rate)"
    )
    parser.add_argument("--prompt-words", type=lambda s: tuple(int(x) for x in s.split("-")), default=(8, 48))
    parser.add_argument(
        "--output-tokens", type=lambda s: tuple(int(x) for x in s.split("-")), default=(8, 32)
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--mode", choices=("auto", "unmerged", "merged"), default="auto", help="the server's --mode"
    )
    parser.add_argument(
        "--only",
        choices=("all", "cold"),
        default="all",
        help="cold: the cold-start probe alone, after filling every slot (see above)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "many-adapters-cpu.md")
    args = parser.parse_args()
    if args.only == "cold":
        args.stored, args.adapters, args.http_uploads = args.stored or args.slots, [], 0
    args.stored = args.stored or max(args.adapters)
    if max(args.adapters, default=0) > args.stored:
        parser.error("--stored must be at least the largest --adapters")

    config = AutoConfig.from_pretrained(embedded_model_dir(Path("~/.cache/loraplex").expanduser()))
    rng = random.Random(args.seed)
    rows: list[Row] = []
    load_before = os.getloadavg()
    # the slot policies first: simulated, seconds; a failure here must not cost a run's measurements
    policies: dict[str, float] = {}
    if args.adapters:
        trace = [
            q.adapter
            for q in workload([f"a{i}" for i in range(max(args.adapters))], _long(args), seed=args.seed)
        ]
        policies = simulate_policies(trace, args.slots)
    with tempfile.TemporaryDirectory() as tmp:
        stored, store_rate = preload(Path(tmp) / "data", config, args, rng)
        print(f"stored {len(stored)} adapters at {store_rate:.1f} MB/s", flush=True)
        server = ServerProcess.start(["--data-dir", f"{tmp}/data", "--max-loaded-adapters", str(args.slots),
                                      "--host-cache-mb", str(args.host_cache_mb), "--max-batch", "32",
                                      "--mode", args.mode])  # fmt: skip
        try:
            started, sent = time.perf_counter(), 0
            for i in range(args.http_uploads):
                r = rng.choice(args.ranks)
                sent += upload(
                    server.url, f"u{i:03d}-r{r}", adapter_files(config, TARGETS[args.targets], r, 50_000 + i)
                )
            upload_rate = sent / 2**20 / max(1e-9, time.perf_counter() - started)
            for n in sorted(args.adapters):
                for round_ in range(args.rounds):
                    traffic = workload(stored[:n], args, seed=args.seed + 1000 * n + round_)
                    single = [Request(q.at, "single-r16", q.prompt, q.new_tokens) for q in traffic]
                    base = run_traffic(server, "one rank-16 adapter", 1, single)
                    base.round, base.stored = round_, len(stored) + args.probes + 1
                    row = run_traffic(
                        server, f"{n} adapters, ranks {args.ranks}", len(stored) + args.probes + 1, traffic
                    )
                    row.round, row.in_traffic = round_, n
                    rows += [base, row]
                    print(f"round {round_}: {row.name}: {row.tokens_per_s:.1f} tok/s vs {base.tokens_per_s:.1f}",
                          flush=True)  # fmt: skip
            if args.only == "cold":  # every slot taken, as after the rounds: each probe evicts one
                fill = [Request(0.0, a, f"fill {a} with the river story", 2) for a in stored[: args.slots]]
                asyncio.run(_replay(server.url, fill))
            settle_checks(server)
            probes = [cold_probe(server, f"probe{i}-r64") for i in range(args.probes)]
        finally:
            server.stop()
    write_report(args, rows, probes, policies, store_rate, upload_rate, load_before)


def _long(args) -> argparse.Namespace:
    """The arguments for a long trace of the same popularity (the slot-policy simulation)."""
    return argparse.Namespace(**{**vars(args), "requests": 20_000})


def write_report(args, rows: list[Row], probes, policies: dict[str, float], store_rate: float,
                 upload_rate: float, load_before: tuple[float, ...]) -> None:  # fmt: skip
    def ms(values: list[float], q: float) -> str:
        return f"{percentile(values, q) * 1000:.0f}" if values else "-"

    load_after = os.getloadavg()
    table = [
        "| round | configuration | tok/s | vs one adapter | TTFT p50/p99 ms | ITL p50/p99 ms | slot loads | "
        "evictions | disk reads |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    lines = [
        f"## Run of {dt.datetime.now():%Y-%m-%d %H:%M}", "",
        f"`{' '.join(sys.argv)}`; {machine_description()}; load average {load_before[0]:.1f} at the start, "
        f"{load_after[0]:.1f} at the end (1-minute; other people's jobs share the 2 cores).", "",
        f"Embedded SmolLM2-135M, `--max-loaded-adapters {args.slots}`, `--host-cache-mb {args.host_cache_mb}`, "
        f"adapters on {args.targets} of ranks {args.ranks} (float16 files); {args.stored} stored (+ "
        f"{args.probes} probes and the baseline), written at {store_rate:.1f} MB/s through `AdapterStore.put` "
        f"(fsync off), "
        f"{args.http_uploads} more uploaded over HTTP at {upload_rate:.1f} MB/s; " + (
            f"{args.requests} requests per configuration and round, Poisson at {args.rate}/s, popularity ∝ "
            f"1/i^{args.alpha}, prompts of {args.prompt_words} words, {args.output_tokens} new tokens (EOS "
            "ignored). Each round sends the same arrivals to one rank-16 adapter, then to the N adapters."
            if rows else f"server `--mode {args.mode}`; no traffic rounds."
        ), "",
        *(table if rows else ["(`--only cold`: no traffic rounds; every slot was filled before the probe.)"]),
    ]  # fmt: skip
    ratios: dict[int, list[float]] = {}
    for i, row in enumerate(rows):
        base = rows[i - 1] if i % 2 else row
        c = row.counters
        ratio = row.tokens_per_s / base.tokens_per_s
        if i % 2:
            ratios.setdefault(row.in_traffic, []).append(ratio)
        lines.append(
            f"| {row.round} | {row.name} | {row.tokens_per_s:.1f} | {ratio:.2f}x | "
            f"{ms(row.ttft, 50)}/{ms(row.ttft, 99)} | {ms(row.gaps, 50)}/{ms(row.gaps, 99)} | "
            f"{c['slot_loads']:.0f} | {c['evictions']:.0f} | {c['disk_reads']:.0f} |"
        )
    lines.append("")
    for n, values in ratios.items():
        lines.append(f"- **{n} adapters: {statistics.median(values):.2f}x** the throughput of one rank-16 adapter "
                     f"(median of {len(values)} rounds: {', '.join(f'{v:.2f}' for v in values)}).")  # fmt: skip
    cold = statistics.median(p[0] for p in probes)
    warm = statistics.median(p[1] for p in probes)
    reads = sum(p[2] for p in probes)
    swaps = (
        f"; merged-mode swaps (`--mode {args.mode}`) during the cold requests: "
        + ", ".join(f"{p[3]:.0f}" for p in probes)
        + ", during the warm ones: "
        + ", ".join(f"{p[4]:.0f}" for p in probes)
    )
    lines += [
        f"- Cold start, idle server: the first request to each of {len(probes)} rank-64 adapters never used "
        f"({reads:.0f} read from disk, parsed, staged on the loader thread, installed in a slot): TTFT "
        f"{', '.join(f'{p[0] * 1000:.0f}' for p in probes)} ms; the next requests to each (warm, best of 3): "
        f"{', '.join(f'{p[1] * 1000:.0f}' for p in probes)} ms{swaps}; **median cold/warm {cold / warm:.2f}x**. "
        f"The server's account of each cold request: the read from disk (`loraplex_adapter_load_seconds`) "
        f"{', '.join(f'{p[5] * 1000:.0f}' for p in probes)} ms, the staging on the loader thread "
        f"(`loraplex_adapter_slot_load_seconds`) {', '.join(f'{p[6] * 1000:.0f}' for p in probes)} ms; the "
        f"process's minor page faults during it (`loraplex_process_minor_page_faults`: new memory touched) "
        f"{', '.join(f'{p[7]:.0f}' for p in probes)}.",
    ]  # fmt: skip
    if policies:
        lines.append(
            f"- Slot policy, simulated on 20,000 requests of the same popularity over {max(args.adapters)} "
            f"adapters and {args.slots} slots (one request at a time): hit rate "
            + ", ".join(f"{name} {rate:.1%}" for name, rate in policies.items())
            + "."
        )
    lines.append("")
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    new = not args.out.exists()
    with args.out.open("a") as f:  # runs are kept, newest last
        f.write(("# Many adapters (CPU)\n\n" if new else "\n") + text + "\n")


if __name__ == "__main__":
    main()
