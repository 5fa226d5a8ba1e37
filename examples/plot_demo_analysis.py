"""Analysis pictures of a trained demo adapter and of a random adapter of the same rank and targets.

Writes ``docs/images/analysis-trained.png`` and ``docs/images/analysis-random.png`` and prints the
numbers quoted in the README (section "Looking inside an adapter") (mean effective rank, stable rank, energy rank). The random
adapter has PEFT-initialised A and a random B (both factors random, as in ``tests.synthetic``).

Run (after ``examples/train_demo_adapters.py``):
    .venv/bin/python examples/plot_demo_analysis.py [--adapter examples/adapters/caps]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters import plots
from server.analyze_local import analyze_local
from server.config import Settings
from server.engine.base_model import load_base
from tests.synthetic import make_random_peft_adapter

ROOT = Path(__file__).resolve().parents[1]


def numbers(result: dict) -> dict[str, float]:
    rows = result["layers"]
    return {
        "mean effective rank": result["summary"]["mean_effective_rank"],
        "median stable rank": statistics.median(r["stable_rank"] for r in rows),
        "median components for 90% energy": statistics.median(r["energy_rank"]["0.9"] for r in rows),
        "median σ_r / σ_1": statistics.median(
            r["singular_values"][-1] / r["singular_values"][0] for r in rows
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", type=Path, default=ROOT / "examples" / "adapters" / "caps")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = json.loads((args.adapter / "adapter_config.json").read_text())

    trained = analyze_local(args.adapter)
    with tempfile.TemporaryDirectory() as tmp:
        base = load_base(None, "float32", "cpu", Settings().cache_dir)
        random_dir = Path(tmp) / f"random-r{config['r']}"
        make_random_peft_adapter(
            base.model, random_dir, seed=0, r=config["r"], lora_alpha=config["lora_alpha"],
            target_modules=config["target_modules"],
        )  # fmt: skip
        random = analyze_local(random_dir)

    args.out.mkdir(parents=True, exist_ok=True)
    for name, result in (("trained", trained), ("random", random)):
        path = args.out / f"analysis-{name}.png"
        path.write_bytes(plots.analysis_png(result))
        print(f"{path.relative_to(ROOT)}  ({result['adapter_id']}, rank {result['rank']})")
        for key, value in numbers(result).items():
            print(f"  {key:34s} {value:.3f}")


if __name__ == "__main__":
    main()
