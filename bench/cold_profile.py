"""Where a cold adapter's time to first token goes (issue 29), in-process, part by part.

An engine on the embedded model (native runner, float32, CPU) and a store on a temporary data dir
hold ``--slots`` + ``--probes`` rank-64 q/k/v/o adapters (float16 files, as ``many_adapters.py``
writes them); every slot is filled first (each probe then evicts one, as on a busy server) and the
host cache emptied. Per probe: the API worker thread's part (``store.get``: read, sha256 on its own
thread, parse, validation) then the engine's, from submit to the first token (the loader thread's
staging and packing, the install on the engine thread, the prefill), against the best of three
warm requests to the same adapter. The parts are timed by wrapping the functions that do them
(their sums per probe; the sha256 and the loader run beside other parts, so they do not add up).

Run: `python bench/cold_profile.py [--mode unmerged] [--probes 4] [--slots 8]`; prints, writes
nothing. On a shared machine compare only runs made one right after the other. Parts a tree does
not have are left out, so the same script profiles an older checkout (`PYTHONPATH=<its root>`).
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters import store as store_module
from adapters.archive import AdapterFiles
from adapters.blobs import LocalBlobBackend
from adapters.host_cache import HostCache
from adapters.store import AdapterStore
from adapters.torch_threads import confine_this_thread, in_passing_thread
from bench.many_adapters import TARGETS, adapter_files
from server.engine import lora_model, scheduler, sgmv_cpu
from server.engine.base_model import build_engine_for_dir, embedded_model_dir
from server.engine.engine import Engine, EngineConfig
from server.engine.lora import slot_layouts
from server.engine.native.runner import NativeLlamaRunner
from server.engine.requests import GenerationRequest, TokenEvent
from server.engine.sampling import SamplingParams

TIMES: dict[str, list[float]] = defaultdict(list)
_lock = threading.Lock()

PARTS: list[tuple[object, str, str]] = [  # (owner, function, label), in cold-path order
    (LocalBlobBackend, "read", "read the files"),
    (store_module, "sha256_hex", "sha256 (its own thread, beside the parse)"),
    (store_module, "load_safetensors_bytes", "safetensors parse + float32 cast (full)"),
    (store_module, "load_stored_safetensors", "stored read in place + float32 cast (short)"),
    (store_module, "build_adapter", "build_adapter (validation)"),
    (store_module.AdapterStore, "get", "= store.get (API worker thread)"),
    (lora_model, "stage_adapter", "stage (+ pack, where prebuilt): loader thread"),
    (lora_model.AdapterSlots, "wait_for_loads", "idle engine waits for the loader"),
    (lora_model.AdapterSlots, "_load", "install: engine thread"),
    (slot_layouts, "slot_factors", "first-use layout: slot_factors (engine thread)"),
    (sgmv_cpu.SlotPlan, "__init__", "first-use layout: SlotPlan pack (engine thread)"),
    (scheduler.Scheduler, "set_merged", "merge/unmerge (auto mode, engine thread)"),
    (NativeLlamaRunner, "step", "runner.step (prefill and decode steps)"),
]


def _wrap(owner: object, name: str, label: str) -> None:
    fn: Callable = getattr(owner, name, None)  # type: ignore[assignment]
    if fn is None:  # a part this tree does not have
        return

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            with _lock:
                TIMES[label].append(time.perf_counter() - started)

    setattr(owner, name, timed)


def first_token_ms(engine: Engine, adapter, prompt: str) -> float:
    """Submit one request (2 new tokens) to the running engine; ms until its first token."""
    first = threading.Event()
    stamps: list[float] = []

    def sink(event) -> None:
        if isinstance(event, TokenEvent) and not stamps:
            stamps.append(time.perf_counter())
            first.set()

    ids = engine.tokenizer(prompt)["input_ids"]
    request = GenerationRequest(ids, SamplingParams(max_new_tokens=2, ignore_eos=True), adapter, sink=sink)
    started = time.perf_counter()
    engine.submit(request)
    if not first.wait(120):
        raise RuntimeError("no first token in 120 s")
    return (stamps[0] - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slots", type=int, default=8, help="--max-loaded-adapters (all filled first)")
    parser.add_argument("--probes", type=int, default=4)
    parser.add_argument("--mode", choices=("auto", "unmerged"), default="unmerged")
    args = parser.parse_args()

    model_dir = embedded_model_dir(Path("~/.cache/loraplex").expanduser())
    config = EngineConfig(max_batch=32, max_loaded_adapters=args.slots, speculate=4, mode=args.mode)
    # as the server: the model loads on a thread that ends, the engine thread's team is the only
    # one, and store.get runs on this (confined) thread as on an API worker (adapters/torch_threads.py)
    confine_this_thread()
    engine = in_passing_thread(
        lambda: build_engine_for_dir(model_dir, "native", torch.float32, torch.device("cpu"), config), "load"
    )
    shapes = AutoConfig.from_pretrained(model_dir)
    engine.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            store = AdapterStore(Path(tmp) / "data")
            store.bind_base(engine.base_shapes, max_rank=64)
            ids = []
            for i in range(args.probes + args.slots):
                config_bytes, weights = adapter_files(shapes, TARGETS["qkvo"], 64, 10_000 + i)
                store.put(f"p{i}", AdapterFiles(config=config_bytes, weights=weights))
                ids.append(f"p{i}")
            store.cache = HostCache(store.cache.max_bytes)  # as a restarted server: nothing parsed
            for i in range(args.slots):  # every slot taken: each probe evicts one
                first_token_ms(engine, store.get(ids[args.probes + i]), f"fill {i} with the river story")
            for owner, name, label in PARTS:
                _wrap(owner, name, label)
            for i in range(args.probes):
                TIMES.clear()
                started = time.perf_counter()
                adapter = store.get(ids[i])  # what the API's worker thread does before submitting
                resolve = (time.perf_counter() - started) * 1000
                cold = first_token_ms(engine, adapter, f"the model serves a request about a river {i}")
                warm = min(
                    first_token_ms(engine, adapter, f"the server reads story {j} of {i}") for j in range(3)
                )
                print(f"probe {i}: store.get {resolve:.1f} ms + engine {cold:.1f} ms = {resolve + cold:.1f} ms "
                      f"cold; warm {warm:.1f} ms; cold/warm {(resolve + cold) / warm:.2f}x")  # fmt: skip
                for _, _, label in PARTS:
                    if TIMES.get(label):
                        times = TIMES[label]
                        print(f"    {label:52s} {sum(times) * 1000:7.1f} ms ({len(times)} calls)")
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
