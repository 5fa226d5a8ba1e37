"""What padding every slot to the largest rank costs: the question behind rank-bucketed slots.

A slot bank stores each slot padded to the largest rank ever loaded into it (``LoraSlotBank``:
``A_stack [S, r_max, k]``), and the LoRA backends compute ``r_max`` rank columns per adapter. So
once one rank-64 adapter has been loaded, rank-8 adapters cost the work of rank 64. This measures
the decode step of the engine (no HTTP) on the embedded model, with 32 rows spread over 16
low-rank q/k/v/o adapters, in three engines built alike:

* ``low``: only the low-rank adapters ever loaded (banks at their rank);
* ``padded``: the same rows after one rank-64 adapter was loaded (and left idle): banks at 64;
* ``rank 64``: the rows on 16 rank-64 adapters (what rank 64 really costs).

The engines are measured in alternating rounds (medians of many steps each); the ratio
``padded / low`` is the cost of padding. Run: `python bench/rank_padding.py [--rank 8]`; results
appended to bench/results/many-adapters-cpu.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.peft_format import load_adapter_dir
from bench.common import ROOT, machine_description, write_random_adapter
from bench.efficiency import build_engine, decode_step_seconds
from server.engine.base_model import embedded_model_dir
from server.engine.engine import Engine

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


def qkvo_adapter(engine: Engine, root: Path, name: str, r: int, seed: int):
    shapes = {n: s for n, s in engine.base_shapes.items() if n.endswith(QKVO)}
    path = write_random_adapter(shapes, root / name, seed=seed, r=r, lora_alpha=2 * r)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": list(QKVO)}))
    return load_adapter_dir(path, name, engine.base_shapes)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rank", type=int, default=8, help="rank of the low-rank adapters")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="decode steps timed per engine and round")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "many-adapters-cpu.md")
    args = parser.parse_args()

    model_dir = embedded_model_dir(Path("~/.cache/loraplex").expanduser())
    cpu = torch.device("cpu")
    engines = {name: build_engine("native", model_dir, torch.float32, cpu, max_batch=args.rows,
                                  max_loaded_adapters=args.adapters + 1)
               for name in ("low", "padded", "rank 64")}  # fmt: skip
    ids = list(range(100, 124))
    times: dict[str, list[float]] = {name: [] for name in engines}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        low = [qkvo_adapter(engines["low"], root, f"low{i}", args.rank, i) for i in range(args.adapters)]
        high = [qkvo_adapter(engines["low"], root, f"high{i}", 64, 100 + i) for i in range(args.adapters)]
        engines["padded"].slots.acquire(high[0])  # loaded once, never used by a row: banks now rank 64
        engines["padded"].slots.release(high[0].key)
        rows = {"low": low, "padded": low, "rank 64": high}
        for _ in range(args.rounds):
            for name, engine in engines.items():
                adapters = [rows[name][i % args.adapters] for i in range(args.rows)]
                times[name].append(decode_step_seconds(engine, ids, adapters, args.steps))
    medians = {name: statistics.median(values) for name, values in times.items()}
    bank = next(iter(engines["padded"].runner.lora_targets.values()))
    lines = [
        f"## Rank padding, run of {dt.date.today()}", "",
        f"`{' '.join(sys.argv)}`; {machine_description()}; load average {_loadavg()}.", "",
        f"Native runner, embedded SmolLM2-135M, float32; decode step (engine, no HTTP) with {args.rows} rows "
        f"over {args.adapters} q/k/v/o adapters; {args.rounds} alternating rounds of {args.steps} steps, "
        "median of the rounds' medians.", "",
        "| engine | bank rank | step ms | vs low |", "| --- | --- | --- | --- |",
    ]  # fmt: skip
    ranks = {"low": args.rank, "padded": getattr(bank, "r_max", "?"), "rank 64": 64}
    for name, value in medians.items():
        lines.append(f"| {name} (rank-{args.rank if name != 'rank 64' else 64} rows) | {ranks[name]} | "
                     f"{value * 1000:.1f} | {value / medians['low']:.2f}x |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    with args.out.open("a") as f:
        f.write("\n" + text)


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


if __name__ == "__main__":
    main()
