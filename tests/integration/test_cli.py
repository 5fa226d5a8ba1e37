"""The ``loraplex`` client commands (typer CliRunner) against a real server with keys."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from server.cli import app
from tests.conftest import make_peft_adapter
from tests.live_server import free_port, start_live_server

API_KEY, ADMIN_KEY = "cli-api", "cli-admin"


@pytest.fixture(scope="module")
def adapter_dir(tiny_base, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli-adapter") / "pirate"
    make_peft_adapter(tiny_base, path, seed=5, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return path


@pytest.fixture(scope="module")
def server(tiny_base, tokenizer, tmp_path_factory):
    live = start_live_server(tiny_base, tokenizer, tmp_path_factory.mktemp("cli"), api_key=API_KEY,
                             admin_key=ADMIN_KEY, max_total_tokens=256)  # fmt: skip
    yield live
    live.stop()


@pytest.fixture
def run(server):
    runner = CliRunner()

    def invoke(*args: str, admin: bool = False, **env: str):
        env = {"LORAPLEX_URL": server.url, "LORAPLEX_API_KEY": API_KEY, "LORAPLEX_ADMIN_KEY": None, **env}
        if admin:
            env["LORAPLEX_ADMIN_KEY"] = ADMIN_KEY
        return runner.invoke(app, list(args), env=env)

    return invoke


def test_upload_generate_list_show_delete(run, adapter_dir) -> None:
    refused = run("upload", str(adapter_dir), "--id", "pirate")
    assert (
        refused.exit_code == 1
        and "403 forbidden" in refused.stderr
        and "LORAPLEX_ADMIN_KEY" in refused.stderr
    )
    up = run("upload", str(adapter_dir), "--id", "pirate", admin=True)
    assert up.exit_code == 0, up.output
    assert "uploaded pirate: rank 4" in up.stdout and "(100%)" in up.stderr
    again = run("upload", str(adapter_dir), "--id", "pirate", admin=True)
    assert again.exit_code == 1 and "409" in again.stderr
    assert run("upload", str(adapter_dir), "--id", "pirate", "--replace", admin=True).exit_code == 0

    listed = run("adapters", "list")
    assert listed.exit_code == 0 and listed.stdout.splitlines()[0].split()[:3] == ["ID", "RANK", "ALPHA"]
    assert listed.stdout.splitlines()[1].split()[:2] == ["pirate", "4"]
    as_json = json.loads(run("adapters", "list", "--json").stdout)
    assert [a["id"] for a in as_json] == ["pirate"] and "raw" not in as_json[0]
    shown = run("adapters", "show", "pirate")
    assert shown.exit_code == 0 and "lora_alpha" in shown.stdout and "sha256" in shown.stdout

    plain = run("generate", "Hello there", "--adapter", "pirate", "--max-new-tokens", "5")
    streamed = run("generate", "Hello there", "--adapter", "pirate", "--max-new-tokens", "5", "--stream")
    base = run("generate", "Hello there", "--max-new-tokens", "5")
    assert plain.exit_code == streamed.exit_code == base.exit_code == 0
    assert plain.stdout == streamed.stdout and plain.stdout != base.stdout and plain.stdout.strip()

    assert run("adapters", "delete", "pirate").exit_code == 1  # the API key cannot delete
    deleted = run("adapters", "delete", "pirate", admin=True)
    assert deleted.exit_code == 0 and "deleted pirate" in deleted.stdout
    missing = run("adapters", "show", "pirate")
    assert (
        missing.exit_code == 1 and "404 adapter_not_found" in missing.stderr and "'pirate'" in missing.stderr
    )


def test_errors_are_messages_not_tracebacks(run, tmp_path) -> None:
    unauthorized = run("generate", "Hi", LORAPLEX_API_KEY="wrong")
    assert unauthorized.exit_code == 1 and "401 unauthorized" in unauthorized.stderr
    nowhere = run("adapters", "list", LORAPLEX_URL=f"http://127.0.0.1:{free_port()}")
    assert nowhere.exit_code == 1 and "cannot reach the server" in nowhere.stderr
    not_adapter = run("upload", str(tmp_path), admin=True)
    assert not_adapter.exit_code == 2 and "adapter_config.json" in not_adapter.stderr
    assert run("generate", "Hi", "--url", "http://127.0.0.1:1", "--max-new-tokens", "0").exit_code == 2


def test_analyze_calls_analyze_local_and_reports_bad_paths(monkeypatch, adapter_dir, tmp_path) -> None:
    import adapters.report
    import server.analyze_local

    runner = CliRunner()
    calls = []
    monkeypatch.setattr(
        server.analyze_local,
        "analyze_local",
        lambda path, base: calls.append((path, base)) or {"summary": {"layers": 4}},
    )
    monkeypatch.setattr(
        adapters.report, "format_report", lambda result: f"layers: {result['summary']['layers']}"
    )
    done = runner.invoke(app, ["analyze", str(adapter_dir), "--base", "/models/x"])
    assert done.exit_code == 0 and done.stdout.strip() == "layers: 4"
    assert calls == [(adapter_dir, "/models/x")]

    def refuse(path, base):
        raise FileNotFoundError(f"{path} has no adapter_config.json")

    monkeypatch.setattr(server.analyze_local, "analyze_local", refuse)
    bad = runner.invoke(app, ["analyze", str(tmp_path)])
    assert bad.exit_code == 2 and "no adapter_config.json" in bad.stderr and "Traceback" not in bad.stderr
