"""The TGI/LoRAX client block of docs/clients.md runs as written against a live server (tiny model, an
adapter registered as ``pirate``)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import make_peft_adapter
from tests.live_server import start_live_server

ROOT = Path(__file__).resolve().parents[2]


def clients_block() -> str:
    page = (ROOT / "docs" / "clients.md").read_text()
    match = re.search(r"<!-- tgi-clients.*?-->\n```python\n(.*?)```", page, flags=re.S)
    assert match, "docs/clients.md lost its TGI/LoRAX client block"
    return match.group(1)


def test_readme_client_examples_run(tiny_base, tokenizer, tmp_path) -> None:
    make_peft_adapter(tiny_base, tmp_path / "pirate", seed=5, r=4, lora_alpha=8, target_modules=["q_proj"])
    live = start_live_server(tiny_base, tokenizer, tmp_path, adapter=[f"pirate={tmp_path / 'pirate'}"])
    try:
        script = clients_block().replace("http://127.0.0.1:8080", live.url)
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert any(line.startswith("not found:") and "nope" in line for line in lines)
        assert any(line.startswith("invalid:") for line in lines)
    finally:
        live.stop()
