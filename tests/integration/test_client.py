"""The Python clients (sync and async) against a real server, and their request shapes on a mock."""

from __future__ import annotations

import contextlib
import itertools
import json
import zipfile
from pathlib import Path

import httpx
import pytest

from clients import AsyncLoraplexClient, LoraplexClient, LoraplexError
from clients.types import AdapterSummary
from tests.conftest import make_peft_adapter
from tests.live_server import free_port, start_live_server

PROMPT = "Hello there"
SUMMARY = {
    "id": "a1", "rank": 8, "lora_alpha": 16.0, "use_rslora": False, "target_modules": ["q_proj", "v_proj"],
    "layers": 4, "parameters": 4096, "bytes": 17000, "sha256": "ab" * 32, "created_at": "2025-01-01T00:00:00.000Z",
}  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("client")


@pytest.fixture(scope="module")
def adapter_dir(tiny_base, workdir) -> Path:
    path = workdir / "qv-adapter"
    make_peft_adapter(tiny_base, path, seed=3, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    return path


@pytest.fixture(scope="module")
def server(tiny_base, tokenizer, workdir, adapter_dir):
    live = start_live_server(
        tiny_base, tokenizer, workdir, adapter=[f"qv={adapter_dir}"], max_total_tokens=256
    )
    yield live
    live.stop()


@pytest.fixture
def client(server):
    with LoraplexClient(server.url) as c:
        yield c


# ---------------------------------------------------------------------- generation, real server


def test_generate_and_stream_agree(client) -> None:
    result = client.generate(PROMPT, adapter_id="qv", max_new_tokens=6, details=True)
    assert result.adapter_id == "qv" and result.generated_tokens == len(result.tokens) == 6
    assert result.finish_reason in ("length", "eos_token") and result.prompt_tokens > 0
    tokens = list(client.generate_stream(PROMPT, adapter_id="qv", max_new_tokens=6))
    assert [t.id for t in tokens] == [t.id for t in result.tokens]
    assert "".join(t.text for t in tokens) == result.generated_text
    base = client.generate(PROMPT, max_new_tokens=6)
    assert base.adapter_id is None and base.tokens is None and base.generated_text != result.generated_text


def test_sampling_parameters_pass_through(client) -> None:
    one = client.generate(PROMPT, max_new_tokens=5, temperature=0.8, top_k=50, seed=11)
    two = client.generate(PROMPT, max_new_tokens=5, temperature=0.8, top_k=50, seed=11)
    assert one.seed == 11 and one.generated_text == two.generated_text
    full = client.generate(PROMPT, max_new_tokens=12)
    stop = full.generated_text.strip()[:2]
    cut = client.generate(PROMPT, max_new_tokens=12, stop=[stop])
    assert cut.finish_reason == "stop_sequence" and cut.generated_text.endswith(stop)


def test_errors_carry_status_type_and_message(client, server) -> None:
    with pytest.raises(LoraplexError) as info:
        client.generate(PROMPT, adapter_id="nope")
    assert info.value.status_code == 404 and info.value.error_type == "adapter_not_found"
    assert "'nope'" in info.value.message and "'nope'" in str(info.value)
    with pytest.raises(LoraplexError) as info:
        list(client.generate_stream(PROMPT, adapter_id="nope"))
    assert info.value.status_code == 404
    with pytest.raises(LoraplexError) as info:
        client.generate(PROMPT, max_new_tokens=10_000)
    assert info.value.status_code == 422 and info.value.error_type == "validation"
    with (
        LoraplexClient(f"http://127.0.0.1:{free_port()}", timeout=5) as nowhere,
        pytest.raises(LoraplexError) as info,
    ):
        nowhere.generate(PROMPT)
    assert info.value.status_code == 0 and info.value.error_type == "connection_error"
    assert "LORAPLEX_URL" in info.value.message


async def test_async_client_generates_and_streams(server) -> None:
    async with AsyncLoraplexClient(server.url) as client:
        result = await client.generate(PROMPT, adapter_id="qv", max_new_tokens=5)
        tokens = [t async for t in client.generate_stream(PROMPT, adapter_id="qv", max_new_tokens=5)]
        assert "".join(t.text for t in tokens) == result.generated_text
        with pytest.raises(LoraplexError) as info:
            await client.generate(PROMPT, adapter_id="nope")
        assert info.value.status_code == 404
        assert [a.id for a in await client.list_adapters()] == ["qv"]


# ---------------------------------------------------------------------- adapters, real server


def test_adapter_lifecycle_against_the_server(client, adapter_dir, workdir) -> None:
    seen: list[tuple[int, int]] = []
    summary = client.upload_adapter(adapter_dir, adapter_id="copy", progress=lambda s, t: seen.append((s, t)))
    total = sum(p.stat().st_size for p in adapter_dir.iterdir() if p.name.startswith("adapter_"))
    assert isinstance(summary, AdapterSummary) and summary.id == "copy" and summary.rank == 8
    assert seen and seen[-1] == (total, total) and all(a <= b for a, b in itertools.pairwise(seen))
    with pytest.raises(LoraplexError) as info:
        client.upload_adapter(adapter_dir, adapter_id="copy")
    assert info.value.status_code == 409
    archive = workdir / "copy.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            zf.write(adapter_dir / name, name)
    replaced = client.upload_adapter(archive, adapter_id="copy", replace=True)
    assert replaced.sha256 == summary.sha256
    assert {a.id for a in client.list_adapters()} == {"qv", "copy"}
    assert client.get_adapter("copy") == replaced
    assert client.generate(PROMPT, adapter_id="copy", max_new_tokens=3).adapter_id == "copy"
    client.delete_adapter("copy")
    with pytest.raises(LoraplexError) as info:
        client.get_adapter("copy")
    assert info.value.status_code == 404 and info.value.error_type == "adapter_not_found"
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        client.upload_adapter(workdir)


def test_analysis_compare_shrink_against_the_server(client, adapter_dir) -> None:
    client.upload_adapter(adapter_dir, adapter_id="other", replace=True)
    try:
        analysis = client.analysis("qv")
        assert analysis.adapter_id == "qv" and analysis.rank == 8 and len(analysis.layers) == 4
        only_q = client.analysis("qv", layers="q_proj")
        assert len(only_q.layers) == 2 and all("q_proj" in layer["module"] for layer in only_q.layers)
        comparison = client.compare("qv", "other")
        assert (comparison.a, comparison.b) == ("qv", "other") and len(comparison.layers) == 4
        shrunk = client.shrink("qv", method="rank", value=2, new_id="qv-r2")
        assert shrunk.adapter.id == "qv-r2" and shrunk.adapter.rank == 2 and 0 < shrunk.fro_retained <= 1
        assert {layer["kept_rank"] for layer in shrunk.layers} == {2}
        assert client.get_adapter("qv-r2") == shrunk.adapter
        with pytest.raises(LoraplexError) as info:
            client.shrink("qv", method="rank", value=8, new_id="qv-r8")
        assert info.value.status_code == 422
    finally:
        for adapter_id in ("other", "qv-r2"):
            with contextlib.suppress(LoraplexError):
                client.delete_adapter(adapter_id)


# ---------------------------------------------------------------------- request shapes, mock transport


class Recorder:
    """A MockTransport handler that records requests and answers from a table."""

    def __init__(self, answers: dict[tuple[str, str], httpx.Response]) -> None:
        self.answers = answers
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        return self.answers.get((request.method, request.url.path), httpx.Response(404, json={
            "error": f"no route {request.url.path}", "error_type": "not_found"}))  # fmt: skip


ANALYSIS = {
    "adapter_id": "a1",
    "rank": 8,
    "lora_alpha": 16,
    "summary": {"layers": 1},
    "layers": [{"module": "m"}],
}
COMPARISON = {"a": "a1", "b": "b1", "summary": {"mean_phi": 0.5}, "layers": [{"module": "m"}]}
SHRUNK = {
    **SUMMARY,
    "id": "a1-small",
    "rank": 4,
    "shrink": {"fro_retained": 0.95, "layers": [{"module": "m", "kept_rank": 4, "fro_retained": 0.9}]},
}


def _mock_answers() -> dict[tuple[str, str], httpx.Response]:
    return {
        ("POST", "/adapters"): httpx.Response(201, json=SUMMARY),
        ("GET", "/adapters"): httpx.Response(200, json=[SUMMARY]),
        ("GET", "/adapters/a1"): httpx.Response(200, json={**SUMMARY, "future_field": 1}),
        ("DELETE", "/adapters/a1"): httpx.Response(204),
        ("GET", "/adapters/a1/analysis"): httpx.Response(200, json=ANALYSIS),
        ("GET", "/adapters/compare"): httpx.Response(200, json=COMPARISON),
        ("POST", "/adapters/a1/shrink"): httpx.Response(201, json=SHRUNK),
        ("POST", "/generate"): httpx.Response(
            401, json={"error": "needs a key", "error_type": "unauthorized"}, headers={"Retry-After": "3"}
        ),
    }


def test_adapter_methods_request_shapes(adapter_dir, tmp_path) -> None:
    recorder = Recorder(_mock_answers())
    with LoraplexClient("http://mock", api_key="k1", transport=httpx.MockTransport(recorder)) as client:
        assert client.upload_adapter(adapter_dir, adapter_id="a1", replace=True).id == "a1"
        archive = tmp_path / "a.tar.gz"
        archive.write_bytes(b"not really an archive")
        client.upload_adapter(archive)
        assert [a.id for a in client.list_adapters()] == ["a1"]
        got = client.get_adapter("a1")
        assert got.raw["future_field"] == 1 and got.lora_alpha == 16.0
        assert client.delete_adapter("a1") is None
        analysis = client.analysis("a1", layers="q_proj")
        assert analysis.rank == 8 and analysis.layers == [{"module": "m"}]
        comparison = client.compare("a1", "b1")
        assert comparison.a == "a1" and comparison.summary == {"mean_phi": 0.5}
        shrunk = client.shrink("a1", method="sv_fro", value=0.9, new_id="a1-small")
        assert (
            shrunk.adapter.id == "a1-small"
            and shrunk.adapter.rank == 4
            and shrunk.layers[0]["kept_rank"] == 4
            and shrunk.fro_retained == 0.95
        )
        with pytest.raises(LoraplexError) as info:
            client.generate("x")
        assert (info.value.status_code, info.value.error_type, info.value.retry_after) == (
            401,
            "unauthorized",
            3.0,
        )

    upload_dir, upload_archive, *_ = recorder.requests
    assert all(r.headers["authorization"] == "Bearer k1" for r in recorder.requests)
    assert upload_dir.url.params["replace"] == "true" and "replace" not in upload_archive.url.params
    body = upload_dir.content
    assert b'name="files"; filename="adapter_config.json"' in body
    assert b'name="files"; filename="adapter_model.safetensors"' in body
    assert b'name="adapter_id"\r\n\r\na1' in body
    assert b'name="archive"; filename="a.tar.gz"' in upload_archive.content
    assert b"adapter_id" not in upload_archive.content
    assert int(upload_dir.headers["content-length"]) == len(body)  # sized, not chunked
    analysis_req, compare_req, shrink_req = recorder.requests[5:8]
    assert analysis_req.url.params["layers"] == "q_proj"
    assert dict(compare_req.url.params) == {"a": "a1", "b": "b1"}
    assert json.loads(shrink_req.content) == {"method": "sv_fro", "value": 0.9, "new_id": "a1-small"}


async def test_async_adapter_methods_on_a_mock(adapter_dir) -> None:
    recorder = Recorder(_mock_answers())
    async with AsyncLoraplexClient("http://mock", transport=httpx.MockTransport(recorder)) as client:
        assert (await client.upload_adapter(adapter_dir)).id == "a1"
        assert (await client.get_adapter("a1")).id == "a1"
        await client.delete_adapter("a1")
        assert (await client.analysis("a1")).adapter_id == "a1"
        assert (await client.compare("a1", "b1")).b == "b1"
        assert (await client.shrink("a1", method="rank", value=4, new_id="a1-small")).adapter.rank == 4
    assert "authorization" not in recorder.requests[0].headers


def test_openai_shaped_errors_are_understood() -> None:
    body = {"error": {"message": "no such model", "type": "invalid_request_error", "param": "model",
                      "code": "model_not_found"}}  # fmt: skip
    transport = httpx.MockTransport(lambda request: httpx.Response(404, json=body))
    with LoraplexClient("http://mock", transport=transport) as client, pytest.raises(LoraplexError) as info:
        client.list_adapters()
    assert (info.value.error_type, info.value.message) == ("model_not_found", "no such model")
