"""Tokens/s over HTTP of 16 concurrent streams and of one, for this tree and, as an A/B, others.

Each tree (``--tree PATH``, repeatable: another checkout, e.g. a ``git worktree`` of an older
commit; this one always) serves the embedded model with ``loraplex serve --speculate 0`` from its
own sources, one server at a time; the trees alternate round by round so that a shared machine's
load hits each alike. A round: 16 requests of ``--new-tokens`` greedy tokens sent at once
(``/generate``, ``ignore_eos``), then one at a time, three times each.

    python -m bench.streams --rounds 2 --tree /tmp/old

Prints one line a tree and round; writes nothing. Ratios only within one run (noisy machine).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import ROOT, ServerProcess
from bench.efficiency import _http_round


def measure(tree: Path, new_tokens: int) -> tuple[list[float], list[float]]:
    """(16-stream tok/s, one-stream tok/s), three each, of ``tree``'s server."""
    with tempfile.TemporaryDirectory() as tmp:
        # `python -m server.cli` run in ``tree`` imports that tree's sources: -m puts the cwd first
        server = ServerProcess.start(["--data-dir", tmp, "--speculate", "0"], cwd=tree)
        try:
            asyncio.run(_http_round(server.url, 16, 8))  # warm-up
            many = [16 * new_tokens / asyncio.run(_http_round(server.url, 16, new_tokens)) for _ in range(3)]
            one = [new_tokens / asyncio.run(_http_round(server.url, 1, new_tokens)) for _ in range(3)]
        finally:
            server.stop()
    return many, one


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tree", type=Path, action="append", default=[], help="another checkout to compare")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    trees = [ROOT, *(t.resolve() for t in args.tree)]
    for tree in trees:
        head = subprocess.run(
            ["git", "-C", str(tree), "log", "-1", "--format=%h"], capture_output=True, text=True
        )
        print(f"tree {tree} at {head.stdout.strip() or '?'}")
    for round_ in range(args.rounds):
        for tree in trees:
            many, one = measure(tree, args.new_tokens)
            print(
                f"round {round_} {tree}: 16 streams {', '.join(f'{x:.0f}' for x in many)} tok/s; "
                f"one stream {', '.join(f'{x:.1f}' for x in one)} tok/s; load {os.getloadavg()[0]:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(main())
