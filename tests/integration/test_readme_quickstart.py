"""The README's quick-start block runs as written against a real `loraplex serve` process."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from bench.common import ServerProcess

ROOT = Path(__file__).resolve().parents[2]


def quickstart_block() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- quickstart.*?-->\n```bash\n(.*?)```", readme, flags=re.S)
    assert match, "the README lost its quick-start block"
    return match.group(1)


def test_readme_quickstart_runs_as_written(embedded_dir, tmp_path) -> None:
    server = ServerProcess.start(
        ["--data-dir", str(tmp_path / "data"), "--cache-dir", str(embedded_dir.parent)]
    )
    try:
        port = server.url.rsplit(":", 1)[1]
        script = quickstart_block().replace("localhost:8080", f"127.0.0.1:{port}")
        done = subprocess.run(
            ["bash", "-e", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        replies = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
        assert [r.get("id") for r in replies[:2]] == ["caps", "pirate"], replies[:2]
        base, caps, pirate = (r["generated_text"] for r in replies[2:])
        assert base and caps and pirate and len({base, caps, pirate}) == 3
        assert caps == caps.upper() and any(c.isalpha() for c in caps)  # the caps adapter answers in capitals
        assert any(word in pirate.lower() for word in ("arr", "matey", "yo ho"))  # the pirate talks like one
        print(base, caps, pirate, sep="\n")  # shown with -s: the README quotes these
        page = subprocess.run(
            ["curl", "-sf", f"http://127.0.0.1:{port}/adapters/pirate/analysis.html"],
            capture_output=True,
            text=True,
        )
        assert page.returncode == 0 and "<table" in page.stdout
    finally:
        server.stop()
