"""The web console (``GET /``) in a real browser: Playwright driving Debian's chromium, headless.

One ``loraplex serve`` process on the embedded model serves the whole module (``pirate``
registered at start-up); the tests run in file order and build on each other: upload ``caps``
through the file input, stream base + caps + pirate side by side, analyse, compare, shrink,
delete, compose, watch the live view. The last test starts a second server (tiny model, in a thread)
with both keys set. Every page fails its test if the browser logs an error. The one exception:
Chromium itself logs "Failed to load resource: the server responded with a status of 4xx" for
every refused request, so a test that provokes a refusal on purpose (a bad upload, a 401 or
403) declares each status it expects, and the test fails unless exactly those were logged.

``LORAPLEX_SCREENSHOT_DIR=docs/images`` saves a screenshot of each view there (the README's).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from bench.common import ServerProcess
from tests.adapter_files import files_parts, make_adapter
from tests.conftest import make_peft_adapter
from tests.live_server import start_live_server

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "adapters"
TIMEOUT_MS = 90_000  # generation and the first analysis on 2 shared CPU cores
REFUSED = re.compile(r"^Failed to load resource: the server responded with a status of (4\d\d)\b")

pytestmark = pytest.mark.integration


def chromium_path() -> str:
    """Debian's chromium (``make setup`` installs it as root), or ``LORAPLEX_CHROMIUM``."""
    path = os.environ.get("LORAPLEX_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, (
        "no chromium found: install Debian's 'chromium' package (make setup does, as root) or set LORAPLEX_CHROMIUM"
    )
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), headless=True)
        yield browser
        browser.close()
    expect.set_options(timeout=5_000)  # Playwright's default


@pytest.fixture(scope="module")
def server(embedded_dir, tmp_path_factory) -> Iterator[str]:
    data = tmp_path_factory.mktemp("console") / "data"
    args = ["--data-dir", str(data), "--cache-dir", str(embedded_dir.parent), "--log-level", "warning"]
    process = ServerProcess.start([*args, "--adapter", f"pirate={EXAMPLES / 'pirate'}"])
    yield process.url
    process.stop()


class Console:
    """A page of the console with every browser console message recorded."""

    def __init__(self, page: Page, url: str) -> None:
        self.page, self.url = page, url
        self.errors: list[str] = []
        self.refusals: list[int] = []  # the status of each 4xx answer (Chromium logs a line for each)
        self.expected: list[int] = []  # the refusals the test provokes on purpose, in order
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type != "error":
            return
        if refused := REFUSED.match(message.text):
            self.refusals.append(int(refused.group(1)))
        else:
            self.errors.append(f"{message.text} ({message.location.get('url')})")

    def expect_refusal(self, *statuses: int) -> None:
        self.expected.extend(statuses)

    def check(self) -> None:
        assert self.errors == [], f"errors in the browser console: {self.errors}"
        assert self.refusals == self.expected, f"refused requests {self.refusals}, expected {self.expected}"

    def open(self, view: str = "") -> Page:
        self.page.goto(f"{self.url}/#{view}")
        return self.page

    def notice(self) -> str:
        return self.page.locator("#notice-text").inner_text()

    def chart(self, canvas: str) -> dict:
        """The Chart.js chart drawn on ``canvas``: dataset sizes and every y value."""
        return self.page.evaluate(
            """(selector) => {
                const chart = Chart.getChart(document.querySelector(selector));
                if (!chart) return null;
                return {points: chart.data.datasets.map((d) => d.data.length),
                        values: chart.data.datasets.flatMap((d) => d.data.map((p) => p.v ?? p.y))};
            }""",
            canvas,
        )

    def hover(self, canvas: str, dataset: int, index: int) -> str:
        """Move the mouse onto one point of a chart; the tooltip's text."""
        x, y = self.page.evaluate(
            """([selector, dataset, index]) => {
                const canvas = document.querySelector(selector);
                const point = Chart.getChart(canvas).getDatasetMeta(dataset).data[index];
                const box = canvas.getBoundingClientRect();
                return [box.left + point.x, box.top + point.y];
            }""",
            [canvas, dataset, index],
        )
        self.page.mouse.move(x, y)
        return self.page.evaluate(
            """(selector) => {
                const tooltip = Chart.getChart(document.querySelector(selector)).tooltip;
                return tooltip.getActiveElements().length ? tooltip.body.flatMap((b) => b.lines).join("\\n") : "";
            }""",
            canvas,
        )

    def screenshot(self, name: str) -> None:
        folder = os.environ.get("LORAPLEX_SCREENSHOT_DIR")
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(Path(folder) / f"console-{name}.png"), full_page=True)


@pytest.fixture
def console(browser: Browser, server: str) -> Iterator[Console]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = Console(context.new_page(), server)
    yield page
    context.close()
    page.check()


def zipped(folder: Path, top: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            zf.write(folder / name, f"{top}/{name}")
    return buffer.getvalue()


# --------------------------------------------------------------------------- adapters


def test_upload_through_the_file_input_and_by_drop(console: Console, server: str) -> None:
    page = console.open("adapters")
    expect(page.locator("#adapters-table tbody tr[data-id=pirate]")).to_be_visible()

    # A refused upload shows the server's own message.
    page.set_input_files("#file-input", [str(EXAMPLES / "caps" / "adapter_config.json")])
    page.fill("#upload-id", "caps")
    page.click("#upload-button")
    refused = httpx.post(
        server + "/adapters",
        data={"adapter_id": "caps"},
        files=[("files", ("adapter_config.json", (EXAMPLES / "caps" / "adapter_config.json").read_bytes()))],
    )
    assert refused.status_code in (400, 422)
    console.expect_refusal(refused.status_code)
    expect(page.locator("#notice-text")).to_contain_text(refused.json()["error"])
    assert "caps" not in [a["id"] for a in httpx.get(server + "/adapters").json()]

    # The two PEFT files through the file input, with a progress bar.
    page.set_input_files(
        "#file-input",
        [str(EXAMPLES / "caps" / n) for n in ("adapter_config.json", "adapter_model.safetensors")],
    )
    expect(page.locator("#staged")).to_contain_text("adapter_model.safetensors")
    page.fill("#upload-id", "caps")
    page.click("#upload-button")
    row = page.locator("#adapters-table tbody tr[data-id=caps]")
    expect(row).to_be_visible()
    expect(row.locator("td").nth(1)).to_have_text("8")
    expect(row.locator("td").nth(2)).to_have_text("q_proj, v_proj")
    expect(row.locator("td").nth(3)).to_have_text("1.86 MB")
    expect(page.locator("#upload-status")).to_contain_text("stored caps (rank 8, 60 layers)")
    assert page.locator("#upload-progress").get_attribute("value") == "100"

    # An archive dropped on the drop zone goes up as field 'archive'.
    payload = base64.b64encode(zipped(EXAMPLES / "caps", "caps-dropped")).decode()
    transfer = page.evaluate_handle(
        """(data) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "caps-dropped.zip", {type: "application/zip"}));
            return transfer;
        }""",
        payload,
    )
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})
    expect(page.locator("#staged")).to_contain_text("caps-dropped.zip")
    page.click("#upload-button")
    expect(page.locator("#adapters-table tbody tr[data-id=caps-dropped]")).to_be_visible()
    stored = {a["id"]: a for a in httpx.get(server + "/adapters").json()}
    assert stored["caps-dropped"]["sha256"] == stored["caps"]["sha256"]


def test_adapter_table_pages_and_filters_by_prefix(console: Console, server: str) -> None:
    """The table shows GET /adapters 50 at a time ("Show more" follows the cursor), filtered by id prefix."""
    files = [
        (n, (EXAMPLES / "caps" / n).read_bytes())
        for n in ("adapter_config.json", "adapter_model.safetensors")
    ]
    many = [f"many-{i:02d}" for i in range(52)]
    try:  # uploads inside: a failed one still leaves no adapter behind for the next tests
        for adapter_id in many:
            r = httpx.post(
                server + "/adapters",
                data={"adapter_id": adapter_id},
                files=[("files", f) for f in files],
                timeout=60,  # httpx's 5 s default is too short on a loaded 2-core machine
            )
            assert r.status_code == 201, r.text
        page = console.open("adapters")
        rows = page.locator("#adapters-table tbody tr")
        expect(rows).to_have_count(50)
        expect(page.locator("#adapters-more")).to_be_visible()
        page.fill("#adapters-filter", "many-")
        expect(page.locator("#adapters-table tbody tr[data-id=many-49]")).to_be_visible()
        expect(rows).to_have_count(50)
        page.click("#adapters-more")
        expect(rows).to_have_count(52)
        expect(page.locator("#adapters-table tbody tr[data-id=many-51]")).to_be_visible()
        expect(page.locator("#adapters-more")).to_be_hidden()
        page.fill("#adapters-filter", "many-0")
        expect(rows).to_have_count(10)
        page.fill("#adapters-filter", "nobody")
        expect(rows).to_have_count(0)
        expect(page.locator("#adapters-empty")).to_contain_text('No adapter id starts with "nobody"')
    finally:
        for adapter_id in many:
            httpx.delete(f"{server}/adapters/{adapter_id}", timeout=60)


# --------------------------------------------------------------------------- playground


def test_playground_streams_base_and_two_adapters_side_by_side(console: Console, server: str) -> None:
    page = console.open("playground")
    for model in ("", "caps", "pirate"):
        page.locator(f"#pg-models input[value='{model}']").check()
    page.locator("#pg-models input[value='caps-dropped']").uncheck()
    page.fill("#pg-prompt", "What is 12 plus 30?")
    page.fill("#pg-max-tokens", "30")
    page.click("#pg-run")
    expect(page.locator(".answer[data-state=done]")).to_have_count(3)
    answers = {
        panel.get_attribute("data-model"): panel.locator(".text").inner_text()
        for panel in page.locator(".answer").all()
    }
    assert set(answers) == {"base", "caps", "pirate"}
    assert all(answers.values()) and len(set(answers.values())) == 3, answers
    assert answers["caps"] == answers["caps"].upper() and any(c.isalpha() for c in answers["caps"])
    assert any(word in answers["pirate"].lower() for word in ("arr", "matey", "yo ho"))
    for meta in page.locator(".answer .meta").all_inner_texts():  # streamed: one event per token
        assert int(meta.split()[0]) >= 2, meta
    peak = re.search(r"^loraplex_peak_batch_size (\S+)$", httpx.get(server + "/metrics").text, re.M)
    assert peak and float(peak.group(1)) >= 3  # the three were decoded in one batch
    expect(page.locator("#pg-batch")).to_contain_text("peak server batch during this run")
    assert int(page.locator("#pg-batch").get_attribute("data-peak")) >= 2  # polled twice a second
    console.screenshot("playground")

    # The requests shown as Python run as shown and give the same (greedy) answers.
    page.click("#pg-request summary")
    python = page.locator("#pg-python").inner_text()
    done = subprocess.run([sys.executable, "-c", python], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    shown = dict(re.findall(r"^--- (\S+)\n(.*)$", done.stdout, re.M))
    base_name = httpx.get(server + "/info").json()["model"]
    assert shown == {base_name: answers["base"], "caps": answers["caps"], "pirate": answers["pirate"]}

    # And as curl: three streams of chat chunks, the caps one the same answer.
    curl = page.locator("#pg-curl").inner_text()
    assert curl.count("curl -sN") == 3
    done = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    chunks = [json.loads(line[6:]) for line in done.stdout.splitlines() if line.startswith("data: {")]
    caps_text = "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c["model"] == "caps" and c["choices"]
    )
    assert caps_text == answers["caps"]


def test_playground_without_chat_template_uses_generate_stream(console: Console, server: str) -> None:
    page = console.open("playground")
    page.locator("#pg-models input[value='caps-dropped']").uncheck()
    page.locator("#pg-models input[value='pirate']").uncheck()
    page.locator("#pg-models input[value='']").uncheck()
    page.uncheck("#pg-chat")
    prompt = "<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n"
    page.fill("#pg-prompt", prompt)
    page.fill("#pg-max-tokens", "12")
    expect(page.locator("#pg-curl")).to_contain_text("/generate_stream")
    page.click("#pg-run")
    expect(page.locator(".answer[data-state=done]")).to_have_count(1)
    streamed = page.locator(".answer .text").inner_text()
    direct = httpx.post(
        server + "/generate",
        json={"inputs": prompt, "parameters": {"adapter_id": "caps", "max_new_tokens": 12}},
        timeout=120,
    ).json()["generated_text"]
    assert streamed == direct


# --------------------------------------------------------------------------- analysis


def test_analysis_charts_are_drawn_from_the_analysis(console: Console, server: str) -> None:
    page = console.open("analysis/caps")
    expect(page.locator("#an-status")).to_contain_text("60 layers")
    analysis = httpx.get(server + "/adapters/caps/analysis", timeout=120).json()
    spectra = console.chart("#an-spectra")
    assert spectra["points"] == [len(row["singular_values"]) for row in analysis["layers"]]
    assert max(spectra["values"]) > 0
    for canvas in ("#an-ratio", "#an-effrank", "#an-fro"):
        chart = console.chart(canvas)
        assert sum(chart["points"]) == 60 and max(chart["values"]) > 0, canvas
    ratios = sorted(console.chart("#an-ratio")["values"])
    assert ratios == pytest.approx(sorted(row["sval_ratios"][0] for row in analysis["layers"]))
    mean_rank = f"{analysis['summary']['mean_effective_rank']:.3g}"
    expect(page.locator("[data-stat=effective_rank] .value")).to_have_text(mean_rank)
    tooltip = console.hover("#an-ratio", 0, 5)
    assert tooltip.startswith("σ₁/σ_max(W) = "), tooltip
    console.screenshot("analysis")

    page.fill("#an-layers", r"v_proj$")  # a regex restricts the layers
    page.click("#an-load")
    expect(page.locator("#an-status")).to_contain_text("30 layers")
    assert sum(console.chart("#an-effrank")["points"]) == 30


def test_analysis_view_shows_screening_and_the_probe(console: Console, server: str) -> None:
    page = console.open("analysis/caps")
    summary = httpx.get(server + "/adapters/caps", timeout=60).json()
    expect(page.locator("#an-coverage")).to_contain_text(f"Adapts {summary['coverage']['modules']} of the")
    if summary["warnings"]:
        expect(page.locator("#an-warnings li.warning")).to_have_count(len(summary["warnings"]))
    else:
        expect(page.locator("#an-warnings")).to_have_text("No warnings.")
    page.click("#an-probe")
    expect(page.locator("[data-stat=probe_tokens] .value")).not_to_be_empty()
    probe = httpx.get(server + "/adapters/caps/probe", timeout=120).json()
    assert probe["cached"] is True and probe["mean_kl"] > 0  # the console's click computed it
    expect(page.locator("[data-stat=probe_tokens] .value")).to_have_text(str(probe["tokens"]))
    shown_kl = float(page.locator("[data-stat=probe_kl] .value").inner_text())
    assert shown_kl == pytest.approx(probe["mean_kl"], rel=1e-3)
    agreement = f"{probe['top1_agreement'] * 100:.1f}%"
    expect(page.locator("[data-stat=probe_agreement] .value")).to_have_text(agreement)


def test_compare_two_adapters_heat_map(console: Console, server: str) -> None:
    page = console.open("compare/caps/pirate")
    expect(page.locator("#cmp-status")).to_contain_text("60 modules adapted by both")
    compared = httpx.get(server + "/adapters/compare", params={"a": "caps", "b": "pirate"}, timeout=60).json()
    heat = console.chart("#cmp-heatmap")
    n = len(compared["layers"][0]["phi_left"])
    assert heat["points"] == [n * n]
    assert heat["values"][0] == pytest.approx(compared["summary"]["mean_phi_left_top"])  # φ(1, 1), mean
    assert all(0 <= v <= 1 + 1e-9 for v in heat["values"]) and max(heat["values"]) > 0
    assert console.hover("#cmp-heatmap", 0, 0).startswith("φ(i=1, j=1) = ")
    console.screenshot("compare")

    one = compared["layers"][7]
    page.select_option("#cmp-module", one["module"])
    page.select_option("#cmp-side", "right")
    flat = [v for row in one["phi_right"] for v in row]
    expect(page.locator("#cmp-scale")).to_contain_text(f"{max(flat):.3g}")
    assert console.chart("#cmp-heatmap")["values"] == pytest.approx(flat)
    layers = console.chart("#cmp-layers")
    assert sum(layers["points"]) == 2 * 60


# --------------------------------------------------------------------------- shrink, delete


def test_shrink_then_delete(console: Console, server: str) -> None:
    page = console.open("adapters")
    page.click("#adapters-table tbody tr[data-id=caps] >> text=Shrink")
    page.select_option("#shrink-method", "rank")
    page.fill("#shrink-value", "2")
    page.fill("#shrink-new-id", "caps-r2")
    page.click("#shrink-submit")
    row = page.locator("#adapters-table tbody tr[data-id=caps-r2]")
    expect(row.locator("td").nth(1)).to_have_text("2")
    expect(page.locator("#notice-text")).to_contain_text("Stored caps-r2: rank 2 (was 8)")

    # Shrinking to a rank that is not lower: the server's 422 message is shown.
    page.click("#adapters-table tbody tr[data-id=caps-r2] >> text=Shrink")
    page.fill("#shrink-value", "2")
    page.fill("#shrink-new-id", "caps-r2-again")
    page.click("#shrink-submit")
    console.expect_refusal(422)
    expect(page.locator("#notice-text")).to_contain_text("422")
    assert "caps-r2-again" not in [a["id"] for a in httpx.get(server + "/adapters").json()]

    delete = page.locator("button[aria-label='Delete caps-dropped']")
    delete.click()
    expect(delete).to_have_text("Confirm delete")
    delete.click()
    expect(page.locator("#adapters-table tbody tr[data-id=caps-dropped]")).to_have_count(0)
    assert "caps-dropped" not in [a["id"] for a in httpx.get(server + "/adapters").json()]


# --------------------------------------------------------------------------- compose


def test_compose_with_weights_and_the_refusals(console: Console, server: str) -> None:
    page = console.open("adapters")
    submit = page.locator("#compose-submit")
    expect(page.locator("#compose-sources input[value=caps-r2]")).to_be_visible()
    expect(submit).to_be_disabled()  # fewer than two adapters picked
    page.check("#compose-sources input[value=caps]")
    page.check("#compose-sources input[value=pirate]")
    page.fill("[aria-label='Weight of caps']", "1")
    page.fill("[aria-label='Weight of pirate']", "0.5")
    page.select_option("#compose-strategy", "linear")
    expect(page.locator("#compose-density")).to_be_disabled()  # linear ignores it
    page.fill("#compose-rank", "8")
    page.fill("#compose-new-id", "caps-pirate")
    with page.expect_response("**/adapters/compose") as answer:
        submit.click()
    assert answer.value.status == 201
    report = answer.value.json()["compose"]
    assert [(s["id"], s["weight"]) for s in report["sources"]] == [("caps", 1.0), ("pirate", 0.5)]
    row = page.locator("#adapters-table tbody tr[data-id=caps-pirate]")
    expect(row.locator("td").nth(1)).to_have_text("8")
    assert httpx.get(server + "/adapters/caps-pirate").json()["rank"] == 8
    expect(page.locator("#compose-result-title")).to_have_text("caps-pirate: caps × 1 + pirate × 0.5")
    shown_max = page.locator("[data-stat=max_relative_error] .value").inner_text()
    assert 0 < report["max_relative_error"] < 1 and float(shown_max) == pytest.approx(
        report["max_relative_error"], rel=1e-2
    )
    page.click("#compose-result summary")  # opens the table of modules
    layers = page.locator("#compose-layers tbody tr")
    expect(layers).to_have_count(60)
    worst = layers.first.locator("td")
    assert worst.nth(1).inner_text() == "16" and worst.nth(2).inner_text() == "8"  # rank 8 + 8 cut to 8
    assert float(worst.nth(3).inner_text()) == pytest.approx(report["max_relative_error"], rel=1e-2)
    page.click("#compose-result summary")  # closed again, for a screenshot of the whole view
    page.evaluate("window.scrollTo(0, 0)")
    console.screenshot("adapters")

    # DARE: density applies, no rank (stored as composed), the seed of its masks is shown.
    page.select_option("#compose-strategy", "dare_linear")
    page.fill("#compose-density", "0.5")
    page.fill("#compose-rank", "")
    page.fill("#compose-new-id", "caps-pirate-dare")
    with page.expect_response("**/adapters/compose") as answer:
        submit.click()
    body = answer.value.json()
    assert answer.value.status == 201 and body["compose"]["density"] == 0.5
    expect(page.locator("[data-stat=seed] .value")).to_have_text(str(body["compose"]["seed"]))
    expect(page.locator("[data-stat=max_relative_error] .value")).to_have_text("0 (exact)")
    expect(page.locator("#adapters-table tbody tr[data-id=caps-pirate-dare] td").nth(1)).to_have_text("8")

    # Refused: ties across different ranks (caps 8, caps-r2 2), then an id that exists.
    page.uncheck("#compose-sources input[value=pirate]")
    page.check("#compose-sources input[value=caps-r2]")
    page.select_option("#compose-strategy", "ties")
    page.fill("#compose-new-id", "caps-ties")
    with page.expect_response("**/adapters/compose") as answer:
        submit.click()
    refusal = answer.value.json()
    assert answer.value.status == 422 and refusal["error_type"] == "incompatible_ranks"
    expect(page.locator("#notice-text")).to_have_text(f"422: {refusal['error']}")
    page.select_option("#compose-strategy", "linear")
    page.fill("#compose-new-id", "pirate")
    with page.expect_response("**/adapters/compose") as answer:
        submit.click()
    assert answer.value.status == 409
    expect(page.locator("#notice-text")).to_have_text(f"409: {answer.value.json()['error']}")
    console.expect_refusal(422, 409)
    ids = [a["id"] for a in httpx.get(server + "/adapters").json()]
    assert "caps-ties" not in ids and ids.count("pirate") == 1


# --------------------------------------------------------------------------- live view


def test_live_view_follows_a_running_request(console: Console, server: str) -> None:
    page = console.open("live")
    expect(page.locator("[data-stat=mode] .value")).to_have_text("auto")
    before = int(page.locator("[data-stat=generated] .value").inner_text())
    body = {
        "inputs": "Count from one to one hundred:",
        "parameters": {"adapter_id": "pirate", "max_new_tokens": 64, "ignore_eos": True},
    }
    worker = threading.Thread(target=lambda: httpx.post(server + "/generate", json=body, timeout=120))
    worker.start()
    try:
        expect(page.locator("[data-stat=running] .value")).to_have_text("1")
        expect(page.locator("[data-stat=tps] .value")).not_to_have_text("0")
        expect(page.locator("#live-resident")).to_contain_text("pirate")
        while worker.is_alive() and console.chart("#live-tps")["points"][0] < 6:  # a few seconds charted
            page.wait_for_timeout(250)
        console.screenshot("live")
    finally:
        worker.join(120)
    expect(page.locator("[data-stat=running] .value")).to_have_text("0")
    after = int(page.locator("[data-stat=generated] .value").inner_text())
    assert after - before >= 64
    tps = console.chart("#live-tps")
    assert tps["points"][0] >= 3 and max(tps["values"]) > 0


# --------------------------------------------------------------------------- keys


def test_with_keys_set_the_console_asks_for_a_key_and_admin_actions_say_so(
    browser: Browser, tiny_base, tokenizer, tmp_path
) -> None:
    make_peft_adapter(tiny_base, tmp_path / "demo", seed=3, r=4, lora_alpha=8, target_modules=["q_proj"])
    make_peft_adapter(tiny_base, tmp_path / "other", seed=4, r=4, lora_alpha=8, target_modules=["q_proj"])
    live = start_live_server(
        tiny_base,
        tokenizer,
        tmp_path,
        api_key="read-key",
        admin_key="admin-key",
        adapter=[f"demo={tmp_path / 'demo'}", f"other={tmp_path / 'other'}"],
    )
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.set_default_timeout(30_000)
    console = Console(context.new_page(), live.url)
    try:
        page = console.open("adapters")
        expect(page.locator("#key-dialog")).to_be_visible()  # refused without a key: 401
        expect(page.locator("#key-reason")).to_contain_text("needs the API key")
        expect(page.locator("#adapters-table tbody tr")).to_have_count(0)
        console.screenshot("key")
        console.expect_refusal(401, 401)  # GET /adapters and GET /info

        page.fill("#key-input", "read-key")
        page.click("#key-save")
        expect(page.locator("#adapters-table tbody tr[data-id=demo]")).to_be_visible()
        expect(page.locator("#key-button")).to_have_text("Key: set")

        delete = page.locator("button[aria-label='Delete demo']")
        delete.click()
        delete.click()
        expect(page.locator("#notice-text")).to_contain_text("Admin action refused (403)")
        expect(page.locator("#notice-text")).to_contain_text("needs the admin key")
        expect(page.locator("#adapters-table tbody tr[data-id=demo]")).to_be_visible()
        console.expect_refusal(403)

        # Composing is an admin action too: refused with the API key, done with the admin key.
        page.check("#compose-sources input[value=demo]")
        page.check("#compose-sources input[value=other]")
        page.fill("#compose-new-id", "demo-other")
        page.click("#notice-close")
        page.click("#compose-submit")
        expect(page.locator("#compose-status")).to_have_text("refused")
        expect(page.locator("#notice")).to_be_visible()
        expect(page.locator("#notice-text")).to_contain_text("Admin action refused (403)")
        console.expect_refusal(403)

        page.click("#key-button")
        page.fill("#key-input", "admin-key")
        page.click("#key-save")
        page.click("#compose-submit")  # the picks and the new id are still there
        expect(page.locator("#adapters-table tbody tr[data-id=demo-other] td").nth(1)).to_have_text("8")
        delete = page.locator("button[aria-label='Delete demo']")
        delete.click()
        delete.click()
        expect(page.locator("#adapters-table tbody tr[data-id=demo]")).to_have_count(0)
        left = httpx.get(live.url + "/adapters", headers={"Authorization": "Bearer read-key"}).json()
        assert sorted(a["id"] for a in left) == ["demo-other", "other"]
        console.check()
    finally:
        context.close()
        live.stop()


def test_the_console_with_a_tenant_key_shows_the_tenant_and_its_namespace(
    browser: Browser, tiny_base, tokenizer, tmp_path
) -> None:
    """Issue 28: a tenant's key in the console: the key button names the tenant, the table lists its
    own adapters and the shared ones (not another tenant's), and deleting its own works."""
    make_peft_adapter(tiny_base, tmp_path / "shared", seed=3, r=4, lora_alpha=8, target_modules=["q_proj"])
    live = start_live_server(tiny_base, tokenizer, tmp_path, api_key="read-key", admin_key="admin-key",
                             adapter=[f"shared={tmp_path / 'shared'}"])  # fmt: skip
    admin = {"Authorization": "Bearer admin-key"}
    keys = {t: httpx.post(live.url + "/admin/tenants", json={"id": t}, headers=admin).json()["key"]
            for t in ("acme", "globex")}  # fmt: skip
    config, weights = make_adapter(tiny_base, seed=5, r=4, targets=("q_proj",))
    for tenant, adapter_id in (("acme", "mine"), ("globex", "theirs")):
        made = httpx.post(live.url + "/adapters", files=files_parts(config, weights),
                          data={"adapter_id": adapter_id}, headers={"Authorization": f"Bearer {keys[tenant]}"})  # fmt: skip
        assert made.status_code == 201, made.text
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.set_default_timeout(30_000)
    console = Console(context.new_page(), live.url)
    try:
        page = console.open("adapters")
        expect(page.locator("#key-dialog")).to_be_visible()
        console.expect_refusal(401, 401)
        page.fill("#key-input", keys["acme"])
        page.click("#key-save")
        expect(page.locator("#key-button")).to_have_text("Key: tenant acme")
        expect(page.locator("#adapters-table tbody tr[data-id=mine]")).to_be_visible()
        expect(page.locator("#adapters-table tbody tr[data-id=shared]")).to_be_visible()
        expect(page.locator("#adapters-table tbody tr")).to_have_count(2)  # not globex's 'theirs'
        delete = page.locator("button[aria-label='Delete mine']")
        delete.click()
        delete.click()
        expect(page.locator("#adapters-table tbody tr[data-id=mine]")).to_have_count(0)
        left = httpx.get(live.url + "/adapters", headers=admin).json()
        assert sorted(a["id"] for a in left) == ["globex~theirs", "shared"]
        console.check()
    finally:
        context.close()
        live.stop()
