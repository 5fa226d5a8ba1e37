"""docs/analysis.md explains every field the analysis endpoints return; nothing outside docs/ cites
the old design document (which is not part of the repository)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from adapters import plots
from adapters.analysis import BaseStatsCache, analyze, compare
from adapters.report import render_html
from tests.unit.test_analysis import make_lora, weight_fn

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "analysis.md").read_text()
DOCUMENTED = set(re.findall(r"`([a-z_]+)`", DOC))
OLD_DESIGN_DOC = ".".join(("design", "md"))  # spelt so that this file does not cite it either


def test_every_analysis_field_is_documented(tiny_base) -> None:
    a, b = make_lora(tiny_base, seed=1), make_lora(tiny_base, seed=2)
    result = analyze(a, weight_fn(tiny_base), BaseStatsCache(None, "tiny", "00"))
    fields = set(result["layers"][0]) | set(result["summary"]) | set(result["layers"][0]["recommended_rank"])
    compared = compare(a, b)
    fields |= set(compared["layers"][0]) | {f for f in compared["summary"] if not f.startswith("mean_")}
    assert sorted(fields - DOCUMENTED) == []


def test_the_html_page_cites_the_docs(tiny_base) -> None:
    adapter = make_lora(tiny_base, seed=3)
    result = analyze(adapter, weight_fn(tiny_base), BaseStatsCache(None, "tiny", "00"))
    assert "docs/analysis.md" in render_html(result, plots.panel_pngs(result))


def test_nothing_outside_docs_cites_the_old_design_doc() -> None:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    citing = [
        name
        for name in files
        if not name.startswith("docs/")
        and (ROOT / name).is_file()
        and OLD_DESIGN_DOC in (ROOT / name).read_bytes().decode("utf-8", "ignore")
    ]
    assert citing == []


README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown page (code blocks skipped)."""
    anchors, fenced = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (heading := re.match(r"#{1,6} (.*)", line)):
            anchors.add(re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-"))
    return anchors


def test_every_relative_link_resolves() -> None:
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []


def test_the_readme_is_a_front_door() -> None:
    """At most 400 lines: what it is, the two commands, the quick start, endpoints, configuration,
    links; depth lives in docs/, and every page there is linked from the README."""
    text = README.read_text()
    assert len(text.splitlines()) <= 400
    assert "make serve" in text and "make test" in text
    unlinked = [p.name for p in PAGES[1:] if f"](docs/{p.name})" not in text]
    assert unlinked == []
