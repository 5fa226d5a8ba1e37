"""The web console's files (no browser): ``GET /`` and ``/console/static/*`` are served, open
with keys set, carry no reference to another host, every module they import exists, the
vendored Chart.js is the one its README names, and a wheel ships them."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from server.console import STATIC_DIR
from tests.api_helpers import start_client
from tests.prom import metric_value

ROOT = Path(__file__).resolve().parents[2]
OWN_FILES = [STATIC_DIR / "index.html", STATIC_DIR / "console.css", *sorted((STATIC_DIR / "js").glob("*.js"))]


@pytest.fixture(scope="module")
def keyed(tiny_base, tokenizer, tmp_path_factory):
    client = start_client(
        tiny_base, tokenizer, tmp_path_factory.mktemp("console"), api_key="api-k", admin_key="admin-k"
    )
    yield client
    client.__exit__(None, None, None)


def test_the_console_is_served_without_a_key_and_post_root_still_needs_one(keyed) -> None:
    page = keyed.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<script type="module" src="/console/static/js/main.js">' in page.text
    script = keyed.get("/console/static/js/main.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert keyed.get("/console/static/vendor/chart.umd.min.js").status_code == 200
    assert keyed.get("/console/static/js/nope.js").status_code == 404
    # The data the console shows still needs the key; POST / is TGI's generation route.
    assert keyed.get("/adapters").status_code == 401
    assert keyed.post("/", json={"inputs": "Hi", "parameters": {"max_new_tokens": 1}}).status_code == 401
    ok = keyed.post(
        "/",
        json={"inputs": "Hi", "parameters": {"max_new_tokens": 1}},
        headers={"Authorization": "Bearer api-k"},
    )
    assert ok.status_code == 200 and isinstance(ok.json(), list)


def test_loading_the_page_is_not_counted_as_a_generation_request(keyed) -> None:
    def served() -> float:
        return metric_value(keyed.get("/metrics").text, "loraplex_requests_total", route="/") or 0.0

    before = served()
    for _ in range(3):
        keyed.get("/")
    assert served() == before


def test_info_counts_generated_tokens(keyed) -> None:
    auth = {"Authorization": "Bearer api-k"}
    before = keyed.get("/info", headers=auth).json()["generated_tokens"]
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 5, "ignore_eos": True}}
    assert keyed.post("/generate", json=body, headers=auth).status_code == 200
    assert keyed.get("/info", headers=auth).json()["generated_tokens"] - before == 5


def test_no_file_of_the_console_loads_anything_from_another_host() -> None:
    for path in OWN_FILES:
        text = path.read_text()
        assert not re.search(r"(src|href)=\"(https?:)?//", text), path
        assert not re.search(r"(import|fetch)\s*\(?\s*[\"'`](https?:)?//", text), path
        assert "@import" not in text, path


def test_every_file_the_page_and_modules_name_exists() -> None:
    html = (STATIC_DIR / "index.html").read_text()
    named = re.findall(r'(?:src|href)="/console/static/([^"]+)"', html)
    assert "js/main.js" in named and "vendor/chart.umd.min.js" in named
    for name in named:
        assert (STATIC_DIR / name).is_file(), name
    for module in (STATIC_DIR / "js").glob("*.js"):
        for target in re.findall(r'from\s+"(\./[^"]+)"', module.read_text()):
            assert (module.parent / target).resolve().is_file(), f"{module.name} imports {target}"


def test_the_vendored_chart_js_is_the_one_its_readme_names() -> None:
    readme = (STATIC_DIR / "vendor" / "README.md").read_text()
    digest = hashlib.sha256((STATIC_DIR / "vendor" / "chart.umd.min.js").read_bytes()).hexdigest()
    assert f"`chart.umd.min.js` sha256: `{digest}`" in readme
    assert (STATIC_DIR / "vendor" / "LICENSE.md").read_text().startswith("The MIT License")


def test_a_wheel_ships_the_console(tmp_path) -> None:
    source = tmp_path / "src"  # a copy: setuptools writes build/ and *.egg-info beside the sources
    for package in ("server", "adapters", "clients"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("loraplex-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in [*OWN_FILES, *sorted((STATIC_DIR / "vendor").iterdir())]:
        assert f"server/console/static/{path.relative_to(STATIC_DIR).as_posix()}" in names, path
