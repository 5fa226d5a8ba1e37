"""loraplex on Ray Serve (``server.cluster``): 1 vs 2 replicas, and adapter loads with and without affinity.

Three runs on one local Ray cluster each (``ray.init(num_cpus=2)``), the embedded model, float32 on CPU:

1. 1 replica (2 CPUs, so torch gets 2 threads), adapter affinity on;
2. 2 replicas (1 CPU each), affinity on: the adapter id is Ray's multiplexed model id;
3. 2 replicas, affinity off: no multiplexed id, Ray balances on queue length only.

Each run uploads ``--adapters`` random rank-8 adapters, then sends ``--requests`` requests (adapters
chosen at random with a fixed seed; ``--new-tokens`` greedy tokens each, EOS ignored) from
``--concurrency`` clients through the ingress. ``--max-loaded-adapters`` (also Ray's
``max_num_models_per_replica``) is below the number of adapters, so a replica that sees every
adapter must evict and reload: that is what affinity saves. Reported per run: wall time, tokens/s,
median and p90 latency, adapter fetches from the store and engine slot loads, per adapter.

On a 2-core machine two replicas share the same two cores: this measures the overhead and the
affinity, not a speed-up (replicas scale with devices, not with threads of one CPU).

Run: `.venv/bin/python bench/cluster.py` (about 5 minutes); writes bench/results/cluster-cpu.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import io
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx
import ray
import torch
from ray import serve
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, free_port, machine_description, median, percentile
from server.cluster.app import APP_NAME, build_app
from server.config import Settings
from server.engine.base_model import embedded_model_dir
from tests.synthetic import make_random_peft_adapter

CPUS = 2
RUNS = [(1, True), (2, True), (2, False)]  # (replicas, affinity)


def make_adapters(root: Path, count: int, cache_dir: Path) -> list[Path]:
    base = AutoModelForCausalLM.from_pretrained(embedded_model_dir(cache_dir), dtype=torch.float32)
    folders = []
    for i in range(count):
        folder = root / f"a{i}"
        make_random_peft_adapter(base, folder, seed=i, b_scale=0.05, r=8, lora_alpha=16,
                                 target_modules=["q_proj", "v_proj"])  # fmt: skip
        folders.append(folder)
    return folders


def upload(client: httpx.Client, adapter_id: str, folder: Path) -> None:
    files = [("files", (n, io.BytesIO((folder / n).read_bytes())))
             for n in ("adapter_config.json", "adapter_model.safetensors")]  # fmt: skip
    r = client.post("/adapters", files=files, data={"adapter_id": adapter_id})
    r.raise_for_status()


def wait_ready(client: httpx.Client, replicas: int, timeout: float = 300) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            r = client.get("/health")
            if r.status_code == 200 and r.json()["replicas"]["ready"] >= replicas:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("cluster not ready")


def one_run(replicas: int, affinity: bool, folders: list[Path], args: argparse.Namespace, work: Path) -> dict:
    port = free_port()
    settings = Settings(
        port=port, data_dir=work / f"store-{replicas}-{affinity}", cache_dir=args.cache_dir, runner="native",
        dtype="float32", device="cpu", max_loaded_adapters=args.max_loaded_adapters, kv_cache_tokens=4096,
    )  # fmt: skip
    started = time.monotonic()
    ray.init(address="local", num_cpus=CPUS, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(settings, replicas, replica_cpus=CPUS / replicas, affinity=affinity)
        serve.run(app, name=APP_NAME, route_prefix="/")
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
        wait_ready(client, replicas)
        startup = time.monotonic() - started
        names = [f"a{i}" for i in range(len(folders))]
        for name, folder in zip(names, folders, strict=True):
            upload(client, name, folder)
        rng = random.Random(0)
        workload = [rng.choice(names) for _ in range(args.requests)]

        def send(adapter: str) -> float:
            t0 = time.perf_counter()
            params = {"adapter_id": adapter, "max_new_tokens": args.new_tokens, "ignore_eos": True}
            r = client.post("/generate", json={"inputs": "Write a story about a fox.", "parameters": params})
            r.raise_for_status()
            return time.perf_counter() - t0

        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(args.concurrency) as pool:
            latencies = list(pool.map(send, workload))
        wall = time.perf_counter() - t0
        time.sleep(1.5)  # the replicas' last reports
        detail = client.get("/health").json()["replicas"]["detail"]
        client.close()
    finally:
        serve.shutdown()
        ray.shutdown()
    fetches = sum(sum(r["fetches"].values()) for r in detail)
    slot_loads = sum(r["slot_loads"] for r in detail)
    return {
        "replicas": replicas,
        "affinity": affinity,
        "startup_s": startup,
        "wall_s": wall,
        "tokens_per_s": args.requests * args.new_tokens / wall,
        "p50_s": median(latencies),
        "p90_s": percentile(latencies, 90),
        "fetches_per_adapter": fetches / len(folders),
        "slot_loads_per_adapter": slot_loads / len(folders),
        "per_replica": {
            r["replica"]: {
                "requests": sum(r["requests"].values()),
                "fetches": r["fetches"],
                "slot_loads": r["slot_loads"],
            }
            for r in detail
        },
    }


def report(results: list[dict], args: argparse.Namespace, command: str) -> str:
    lines = [
        "# loraplex on Ray Serve: 1 vs 2 replicas, adapter affinity (CPU)",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine_description()}",
        f"- command: `{command}`",
        f"- local Ray cluster `ray.init(num_cpus={CPUS})`, Ray {ray.__version__}; embedded SmolLM2-135M-Instruct, "
        "float32, native runner",
        f"- workload: {args.requests} requests, {args.concurrency} concurrent clients, {args.new_tokens} new tokens "
        f"each (EOS ignored), adapters drawn at random (seed 0) from {args.adapters} rank-8 adapters; "
        f"`--max-loaded-adapters {args.max_loaded_adapters}` (= Ray's `max_num_models_per_replica`)",
        "",
        "| replicas | affinity | tokens/s | p50 latency (s) | p90 latency (s) | fetches per adapter "
        "| engine slot loads per adapter | start-up (s) |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['replicas']} | {'on' if r['affinity'] else 'off'} | {r['tokens_per_s']:.1f} | {r['p50_s']:.2f} "
            f"| {r['p90_s']:.2f} | {r['fetches_per_adapter']:.2f} | {r['slot_loads_per_adapter']:.2f} "
            f"| {r['startup_s']:.0f} |"
        )
    lines += [
        "",
        "Per replica (requests served, adapter versions fetched from the store, engine slot loads):",
        "",
    ]
    for r in results:
        lines.append(f"- {r['replicas']} replica(s), affinity {'on' if r['affinity'] else 'off'}:")
        for rid, d in r["per_replica"].items():
            lines.append(
                f"  - `{rid}`: {d['requests']} requests, fetches {d['fetches']}, {d['slot_loads']} slot loads"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=6)
    parser.add_argument("--max-loaded-adapters", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/loraplex").expanduser())
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cluster-cpu.md")
    args = parser.parse_args()
    command = "python bench/cluster.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folders = make_adapters(work, args.adapters, args.cache_dir)
        results = []
        for replicas, affinity in RUNS:
            result = one_run(replicas, affinity, folders, args, work)
            print(result, flush=True)
            results.append(result)
    text = report(results, args, command.strip())
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
