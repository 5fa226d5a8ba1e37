"""POST/GET/DELETE /adapters over HTTP on the tiny model: uploads, untrusted input, versions, restarts.

Every refused upload is checked the same way (:func:`assert_refused`): its status and
``error_type``, a message that names the problem, nothing new in ``GET /adapters`` or on disk,
and a good generation and a good upload right after it.
"""

from __future__ import annotations

import asyncio
import gc
import json
import pickle
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from tests.adapter_files import (
    CONFIG,
    WEIGHTS,
    adapter_config,
    adapter_tensors,
    files_parts,
    make_adapter,
    raw_safetensors,
    tar_bytes,
    zip_bytes,
)
from tests.api_helpers import start_client
from tests.conftest import make_peft_adapter

MAX_UPLOAD_MB = 1
MAX_RANK = 16
SUMMARY_FIELDS = {
    "id", "rank", "lora_alpha", "use_rslora", "target_modules", "layers", "parameters", "bytes", "sha256",
    "created_at",
}  # fmt: skip


@dataclass
class Server:
    client: TestClient
    data_dir: Path
    model: torch.nn.Module
    baseline: tuple | None = None

    def snapshot(self) -> tuple:
        """What a refused upload must not change: the listing and the data dir."""
        listing = self.client.get("/adapters").json()
        on_disk = sorted(p.name for p in (self.data_dir / "adapters").iterdir())
        staged = sorted(p.name for p in (self.data_dir / "tmp").iterdir())
        return listing, on_disk, staged


def upload(
    client: TestClient,
    config: bytes,
    weights: bytes,
    adapter_id: str | None = None,
    *,
    replace: bool = False,
    prefix: str = "",
) -> httpx.Response:
    data = {"adapter_id": adapter_id} if adapter_id is not None else None
    params = {"replace": "true"} if replace else None
    return client.post(
        "/adapters", files=files_parts(config, weights, prefix=prefix), data=data, params=params
    )


def upload_archive(
    client: TestClient, blob: bytes, filename: str = "adapter.zip", adapter_id: str | None = None
) -> httpx.Response:
    data = {"adapter_id": adapter_id} if adapter_id is not None else None
    return client.post(
        "/adapters", files=[("archive", (filename, blob, "application/octet-stream"))], data=data
    )


def generate(
    client: TestClient, adapter_id: str | None, inputs: str = "Hello there", n: int = 8, **extra
) -> str:
    parameters = {"adapter_id": adapter_id, "max_new_tokens": n, **extra}
    r = client.post("/generate", json={"inputs": inputs, "parameters": parameters})
    assert r.status_code == 200, r.text
    return r.json()["generated_text"]


def wait_for(predicate: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        gc.collect()
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture(scope="module")
def server(tiny_base, tokenizer, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapters-api")
    client = start_client(
        tiny_base, tokenizer, tmp, max_upload_mb=MAX_UPLOAD_MB, max_rank=MAX_RANK, max_total_tokens=256
    )
    srv = Server(client, tmp / "data", tiny_base)
    r = upload(client, *make_adapter(tiny_base, seed=100), "resident")
    assert r.status_code == 201, r.text
    srv.baseline = srv.snapshot()
    yield srv
    client.__exit__(None, None, None)


@pytest.fixture
def clean(server):
    """Leave the module's server as it was: tests that add adapters delete them afterwards."""
    yield server
    for summary in server.client.get("/adapters").json():
        if summary["id"] != "resident":
            server.client.delete(f"/adapters/{summary['id']}")
    assert wait_for(lambda: server.snapshot() == server.baseline), server.snapshot()


def assert_refused(
    server: Server, response: httpx.Response, status: int, error_type: str, *words: str
) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"}, body
    assert body["error_type"] == error_type, body
    for word in words:
        assert word in body["error"], body
    assert server.snapshot() == server.baseline
    # the server keeps serving: a generation and a good upload right after
    generate(server.client, "resident", n=2)
    good = upload(server.client, *make_adapter(server.model, seed=7), "probe")
    assert good.status_code == 201, good.text
    assert server.client.delete("/adapters/probe").status_code == 204
    assert server.snapshot() == server.baseline


# --------------------------------------------------------------------------- happy paths


def test_upload_list_get_delete(clean) -> None:
    client, model = clean.client, clean.model
    config, weights = make_adapter(model, seed=1, r=4, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    r = upload(client, config, weights, "mine")
    assert r.status_code == 201, r.text
    summary = r.json()
    assert (
        set(summary) == SUMMARY_FIELDS | {"coverage", "warnings"}
        and r.headers["location"] == "/adapters/mine"
    )
    assert summary["coverage"]["modules"] == 8 and summary["coverage"]["of"] == 14
    assert summary["id"] == "mine" and summary["rank"] == 4 and summary["layers"] == 8
    assert summary["bytes"] == len(config) + len(weights) and summary["lora_alpha"] == 16
    assert summary["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    tensors = adapter_tensors(model, seed=1, r=4, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    assert summary["parameters"] == sum(t.numel() for t in tensors.values())
    assert client.get("/adapters/mine").json() == summary
    assert [s["id"] for s in client.get("/adapters").json()] == ["mine", "resident"]
    assert client.get("/info").json()["adapters"] == ["mine", "resident"]
    assert generate(client, "mine") != generate(client, None)

    assert client.delete("/adapters/mine").status_code == 204
    r = client.get("/adapters/mine")
    assert (
        r.status_code == 404
        and r.json()["error_type"] == "adapter_not_found"
        and "'mine'" in r.json()["error"]
    )
    assert client.delete("/adapters/mine").status_code == 404
    assert (
        client.post("/generate", json={"inputs": "x", "parameters": {"adapter_id": "mine"}}).status_code
        == 404
    )
    r = client.get("/adapters/.hidden")
    assert r.status_code == 400 and r.json()["error_type"] == "invalid_adapter_id"


@pytest.mark.parametrize(
    ("filename", "pack", "top", "expected_id"),
    [
        ("my-lora.zip", zip_bytes, "", "my-lora"),
        ("bundle.tar", tar_bytes, "Folder Name/", "Folder-Name"),
        ("x.tar.gz", lambda m: tar_bytes(m, gz=True), "tuned_v1/", "tuned_v1"),
        ("x.tgz", lambda m: tar_bytes(m, gz=True), "", "x"),
    ],
)
def test_archive_uploads_and_derived_ids(clean, filename, pack, top, expected_id) -> None:
    config, weights = make_adapter(clean.model, seed=2)
    blob = pack({top + CONFIG: config, top + WEIGHTS: weights, top + "README.md": b"model card"})
    r = upload_archive(clean.client, blob, filename)
    assert r.status_code == 201, r.text
    assert r.json()["id"] == expected_id
    direct = upload(clean.client, config, weights, "direct")
    assert direct.json()["sha256"] == r.json()["sha256"]
    assert generate(clean.client, expected_id) == generate(clean.client, "direct")


def test_files_without_an_id_get_one(clean) -> None:
    config, weights = make_adapter(clean.model, seed=3)
    r = upload(clean.client, config, weights)
    assert r.status_code == 201 and r.json()["id"] == f"adapter-{r.json()['sha256'][:12]}"
    r = upload(clean.client, config, weights, prefix="from-a-folder/")
    assert r.status_code == 201 and r.json()["id"] == "from-a-folder"
    assert upload(clean.client, config, weights, prefix="from-a-folder/").status_code == 409


def test_real_peft_adapter(clean, tmp_path) -> None:
    path = tmp_path / "peft"
    make_peft_adapter(
        clean.model, path, seed=5, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]
    )
    r = upload(clean.client, (path / CONFIG).read_bytes(), (path / WEIGHTS).read_bytes(), "peft")
    assert r.status_code == 201, r.text
    assert r.json()["layers"] == 6 and r.json()["rank"] == 4
    assert generate(clean.client, "peft") != generate(clean.client, None)


def test_replace(clean) -> None:
    client, model = clean.client, clean.model
    assert upload(client, *make_adapter(model, seed=10), "swap").status_code == 201
    v1 = generate(client, "swap")
    r = upload(client, *make_adapter(model, seed=11), "swap")
    assert (
        r.status_code == 409
        and r.json()["error_type"] == "adapter_exists"
        and "replace=true" in r.json()["error"]
    )
    assert generate(client, "swap") == v1
    r = upload(client, *make_adapter(model, seed=11), "swap", replace=True)
    assert r.status_code == 201
    v2 = generate(client, "swap")
    assert upload(client, *make_adapter(model, seed=11), "fresh").status_code == 201
    assert v2 == generate(client, "fresh") and v2 != v1
    assert len([p for p in (clean.data_dir / "adapters").iterdir() if p.name.startswith("swap@")]) == 1


def _run_long(client: TestClient, adapter_id: str, out: dict) -> threading.Thread:
    def run() -> None:
        out["text"] = generate(client, adapter_id, n=200, ignore_eos=True)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _wait_running(server: Server) -> None:
    engine = server.client.app.state.engine
    assert wait_for(lambda: engine.num_running >= 1, 10), "the long request never started"


def test_running_requests_finish_on_the_version_they_started_with(clean) -> None:
    client, model = clean.client, clean.model
    assert upload(client, *make_adapter(model, seed=20), "live").status_code == 201
    solo_v1 = generate(client, "live", n=200, ignore_eos=True)
    out: dict = {}
    thread = _run_long(client, "live", out)
    _wait_running(clean)
    assert upload(client, *make_adapter(model, seed=21), "live", replace=True).status_code == 201
    after = generate(client, "live", n=200, ignore_eos=True)  # new requests get the new version
    thread.join(60)
    assert out["text"] == solo_v1 and after != solo_v1


def test_delete_waits_for_running_requests(clean) -> None:
    client, model = clean.client, clean.model
    assert upload(client, *make_adapter(model, seed=30), "doomed").status_code == 201
    solo = generate(client, "doomed", n=200, ignore_eos=True)
    out: dict = {}
    thread = _run_long(client, "doomed", out)
    _wait_running(clean)
    assert client.delete("/adapters/doomed").status_code == 204
    assert client.get("/adapters/doomed").status_code == 404
    assert (
        client.post("/generate", json={"inputs": "x", "parameters": {"adapter_id": "doomed"}}).status_code
        == 404
    )
    folders = lambda: [p for p in (clean.data_dir / "adapters").iterdir() if p.name.startswith("doomed@")]  # noqa: E731
    if thread.is_alive():
        assert len(folders()) == 1  # still in use: the files stay
    thread.join(60)
    assert out["text"] == solo
    assert wait_for(lambda: not folders())


# --------------------------------------------------------------------------- untrusted input

BadUpload = Callable[[TestClient, torch.nn.Module], httpx.Response]
TensorChange = Callable[[dict[str, torch.Tensor]], None]
MARKER = Path("/tmp/loraplex-test-pickle-was-loaded")  # created if a pickle were ever loaded
_TOO_BIG = (MAX_UPLOAD_MB << 20) + 1
_PREFIX = "base_model.model.model.layers.0."


def _first(tensors: dict[str, torch.Tensor], which: str = "lora_A") -> str:
    return next(k for k in tensors if which in k)


def _shape_mismatch(tensors: dict[str, torch.Tensor]) -> None:
    tensors[_first(tensors)] = torch.randn(8, 128)  # as if trained on a base with hidden size 128


def _drop(what: str) -> TensorChange:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        keys = [k for k in tensors if ".layers.1." in k] if what == "module" else [_first(tensors, "lora_B")]
        for key in keys:
            del tensors[key]

    return change


def _poison(value: float) -> TensorChange:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[_first(tensors, "lora_B")][0, 0] = value

    return change


def _add(key: str, shape: tuple[int, ...]) -> TensorChange:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = torch.zeros(shape)

    return change


def _config(**changes) -> BadUpload:
    """A valid adapter whose config gets ``changes`` (None removes the key)."""

    def post(client: TestClient, model) -> httpx.Response:
        config = {**adapter_config(), **changes}
        config = {k: v for k, v in config.items() if v is not None}
        return upload(client, json.dumps(config).encode(), make_adapter(model, seed=1)[1], "bad")

    return post


def _weights(change: TensorChange) -> BadUpload:
    def post(client: TestClient, model) -> httpx.Response:
        tensors = adapter_tensors(model, seed=1)
        change(tensors)
        return upload(client, json.dumps(adapter_config()).encode(), st_save(tensors), "bad")

    return post


def _raw_weights(blob: bytes) -> BadUpload:
    return lambda client, model: upload(client, make_adapter(model)[0], blob, "bad")


def _truncated_weights(client: TestClient, model) -> httpx.Response:
    config, weights = make_adapter(model)
    return upload(client, config, weights[:-100], "bad")


def _archive(pack: Callable[[bytes, bytes], bytes], filename: str = "bad.zip") -> BadUpload:
    return lambda client, model: upload_archive(client, pack(*make_adapter(model, seed=1)), filename)


def _id(adapter_id: str) -> BadUpload:
    return lambda client, model: upload(client, *make_adapter(model, seed=1), adapter_id)


def _post(**kwargs) -> BadUpload:
    return lambda client, model: client.post("/adapters", **kwargs)


def _files_and_archive(client: TestClient, model) -> httpx.Response:
    archive = ("archive", ("a.zip", zip_bytes({}), "application/zip"))
    return client.post("/adapters", files=[*files_parts(*make_adapter(model)), archive])


def _one_file_part(client: TestClient, model) -> httpx.Response:
    return client.post("/adapters", files=files_parts(*make_adapter(model))[:1])


def _malicious_pickle() -> bytes:
    class Payload:
        def __reduce__(self):
            return (open, (str(MARKER), "w"))

    return pickle.dumps(Payload())


def _pickle_part(client: TestClient, model) -> httpx.Response:
    files = [
        ("files", (CONFIG, make_adapter(model)[0])),
        ("files", ("adapter_model.bin", _malicious_pickle())),
    ]
    return client.post("/adapters", files=files)


def _unknown_module(client: TestClient, model) -> httpx.Response:
    """An adapter for GPT-2's c_attn: modules this (Llama) base does not have."""
    tensors = {
        "base_model.model.h.0.attn.c_attn.lora_A.weight": torch.zeros(8, 64),
        "base_model.model.h.0.attn.c_attn.lora_B.weight": torch.zeros(64, 8),
    }
    return upload(client, json.dumps(adapter_config(targets=("c_attn",))).encode(), st_save(tensors), "bad")


def _pair(c: bytes, w: bytes) -> dict[str, bytes]:
    return {CONFIG: c, WEIGHTS: w}


def _bad(name: str, post: BadUpload, status: int, error_type: str, *words: str):
    return pytest.param(post, status, error_type, words, id=name)


_I32_HEADER = {"x.lora_A.weight": {"dtype": "I32", "shape": [1], "data_offsets": [0, 4]}}
BAD_UPLOADS = [
    # the request itself
    _bad("json-body", _post(json={"adapter_id": "x"}), 400, "invalid_multipart", "multipart/form-data"),
    _bad("no-boundary", _post(content=b"xx", headers={"content-type": "multipart/form-data"}), 400,
         "invalid_multipart", "not valid multipart"),
    _bad("no-file-parts", _post(data={"adapter_id": "x"}, files={"other": ("a", b"b")}), 400, "invalid_upload",
         "other"),
    _bad("files-and-archive", _files_and_archive, 400, "invalid_upload", "'archive'"),
    _bad("one-file-part", _one_file_part, 422, "missing_file", WEIGHTS),
    # archives
    _bad("not-an-archive", _archive(lambda c, w: b"not an archive" * 10), 422, "invalid_archive", "zip", "tar"),
    _bad("absolute-path", _archive(lambda c, w: zip_bytes({**_pair(c, w), "/etc/cron.d/x": b"x"})), 422,
         "unsafe_archive", "/etc/cron.d/x", "zip-slip"),
    _bad("dotdot-path", _archive(lambda c, w: tar_bytes({"a/" + CONFIG: c, "a/../../" + WEIGHTS: w}), "b.tar"),
         422, "unsafe_archive", "..", "zip-slip"),
    _bad("tar-symlink", _archive(lambda c, w: tar_bytes({CONFIG: c}, symlinks={WEIGHTS: "/etc/shadow"}), "b.tar"),
         422, "unsafe_archive", "link"),
    _bad("tar-hardlink", _archive(lambda c, w: tar_bytes(_pair(c, w), hardlinks={"x": "/etc/shadow"})), 422,
         "unsafe_archive", "link"),
    _bad("zip-symlink", _archive(lambda c, w: zip_bytes(_pair(c, w), symlinks={"s": "/etc"})), 422,
         "unsafe_archive", "link"),
    _bad("two-adapters", _archive(lambda c, w: zip_bytes({"a/" + CONFIG: c, "a/" + WEIGHTS: w, "b/" + CONFIG: c,
         "b/" + WEIGHTS: w})), 422, "multiple_adapters", "more than one adapter"),
    _bad("zip-bomb", _archive(lambda c, w: zip_bytes(_pair(c, b"\0" * _TOO_BIG))), 413, "too_large",
         "--max-upload-mb"),
    # pickles
    _bad("pickle-part", _pickle_part, 422, "pickle_refused", "adapter_model.bin", "safetensors"),
    _bad("pickle-in-archive", _archive(lambda c, w: tar_bytes({CONFIG: c, "adapter_model.pt": _malicious_pickle()},
         gz=True), "p.tgz"), 422, "pickle_refused", "adapter_model.pt", "safetensors"),
    # safetensors
    _bad("garbage-weights", _raw_weights((16).to_bytes(8, "little") + b"not json at all!"), 422, "invalid_weights",
         "not JSON"),
    _bad("truncated-weights", _truncated_weights, 422, "invalid_weights", "truncated"),
    _bad("tiny-weights", _raw_weights(b"\x01\x02"), 422, "invalid_weights", "truncated"),
    _bad("oversized-header", _raw_weights((1 << 40).to_bytes(8, "little") + b"{}"), 422, "invalid_weights",
         "header"),
    _bad("unknown-dtype", _raw_weights(raw_safetensors(_I32_HEADER, b"\0" * 4)), 422, "invalid_weights", "'I32'"),
    # adapter_config.json
    _bad("config-not-json", lambda c, m: upload(c, b"{r: 8,", make_adapter(m)[1], "bad"), 422, "invalid_config",
         "not valid JSON"),
    _bad("config-no-r", _config(r=None), 422, "invalid_config", "missing r"),
    _bad("config-no-alpha", _config(lora_alpha=None), 422, "invalid_config", "lora_alpha"),
    _bad("config-no-targets", _config(target_modules=None), 422, "invalid_config", "target_modules"),
    _bad("not-lora", _config(peft_type="PREFIX_TUNING"), 422, "unsupported", "PREFIX_TUNING"),
    _bad("dora-no-magnitudes", _config(use_dora=True), 422, "invalid_weights", "use_dora=true",
         "lora_magnitude_vector"),
    _bad("modules-to-save", _config(modules_to_save=["norm"]), 422, "unsupported", "modules_to_save names 'norm'",
         "Train without 'norm'"),
    _bad("modules-to-save-no-weight", _config(modules_to_save=["lm_head"]), 422, "invalid_weights",
         "no 'lm_head.weight'"),
    _bad("bias", _config(bias="lora_only"), 422, "unsupported", "bias"),
    _bad("embedding-lora-untargeted", _weights(_add("base_model.model.model.embed_tokens.lora_embedding_A", (8, 10))),
         422, "incompatible", "embedding LoRA", "target_modules does not name it"),
    # against the base model
    _bad("unknown-target-module", _unknown_module, 422, "incompatible", "h.0.attn.c_attn", "another base model"),
    _bad("shape-mismatch", _weights(_shape_mismatch), 422, "incompatible", "lora_A.weight", "[8, 128]", "[8, 64]"),
    _bad("missing-lora-b", _weights(_drop("lora_B")), 422, "invalid_weights", "no lora_B.weight"),
    _bad("missing-module", _weights(_drop("module")), 422, "incompatible", "no weights", "layers.1"),
    _bad("half-a-module", _weights(_add(_PREFIX + "mlp.up_proj.lora_A.weight", (8, 64))), 422, "invalid_weights",
         "up_proj"),
    _bad("extra-tensor", _weights(_add(_PREFIX + "self_attn.q_proj.bias", (64,))), 422, "invalid_weights",
         "q_proj.bias", "not a LoRA weight"),
    _bad("rank-too-high", lambda c, m: upload(c, *make_adapter(m, r=32), "bad"), 422, "rank_too_large", "32",
         "--max-rank"),
    _bad("nan-weights", _weights(_poison(float("nan"))), 422, "invalid_weights", "NaN"),
    _bad("inf-weights", _weights(_poison(float("inf"))), 422, "invalid_weights", "Inf"),
    # size
    _bad("too-large-declared", _raw_weights(b"\0" * _TOO_BIG), 413, "too_large", "--max-upload-mb"),
    # ids
    _bad("id-traversal", _id("../x"), 400, "invalid_adapter_id", "'../x'"),
    _bad("id-slash", _id("a/b"), 400, "invalid_adapter_id", "'a/b'"),
    _bad("id-too-long", _id("x" * 65), 400, "invalid_adapter_id", "65", "64"),
    _bad("id-empty", _id(""), 400, "invalid_adapter_id", "empty"),
    _bad("id-duplicate", _id("resident"), 409, "adapter_exists", "'resident'", "replace=true"),
]  # fmt: skip


@pytest.mark.parametrize(("post", "status", "error_type", "words"), BAD_UPLOADS)
def test_bad_upload_is_refused_and_stores_nothing(server, post, status, error_type, words) -> None:
    MARKER.unlink(missing_ok=True)
    response = post(server.client, server.model)
    assert_refused(server, response, status, error_type, *words)
    assert not MARKER.exists(), "a pickle was loaded"


def test_untargeted_tensors_named(server) -> None:
    """Tensors for a module target_modules does not select: named, whatever the key layout."""
    config = json.dumps(adapter_config(targets=("q_proj",))).encode()
    tensors = adapter_tensors(server.model, seed=1, targets=("q_proj", "v_proj"))
    r = upload(server.client, config, st_save(tensors), "bad")
    assert_refused(server, r, 422, "incompatible", "v_proj", "target_modules")


def test_streamed_upload_over_the_limit_is_413(server) -> None:
    """No Content-Length (chunked): the limit is enforced while the body is read.

    TestClient hands the app the body in one piece; that the rest of a streamed body is never
    read is checked in tests/unit/test_upload_limit.py with a lazily streaming transport.
    """
    config, _ = make_adapter(server.model)
    boundary = "loraplexboundary"
    part = 'Content-Disposition: form-data; name="files"; filename="{}"\r\n\r\n'
    head = (
        f"--{boundary}\r\n{part.format(CONFIG)}".encode()
        + config
        + f"\r\n--{boundary}\r\n{part.format(WEIGHTS)}".encode()
    )

    def body():
        yield head
        for _ in range(4 * MAX_UPLOAD_MB * 16):  # 4x the limit, in 64 KiB chunks
            yield b"\0" * (1 << 16)
        yield f"\r\n--{boundary}--\r\n".encode()

    r = server.client.post(
        "/adapters", content=body(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert_refused(server, r, 413, "too_large", "--max-upload-mb")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=3000), magic=st.sampled_from([b"", b"PK\x03\x04", b"\x1f\x8b\x08\x00"]))
def test_random_bytes_as_archive(server, blob: bytes, magic: bytes) -> None:
    r = upload_archive(server.client, magic + blob, "random.zip")
    assert 400 <= r.status_code < 500 and set(r.json()) == {"error", "error_type"}
    assert server.snapshot() == server.baseline


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=3000), header=st.booleans())
def test_random_bytes_as_safetensors(server, blob: bytes, header: bool) -> None:
    if header:  # a plausible header length, so the parser gets further
        blob = min(len(blob), 200).to_bytes(8, "little") + blob
    r = upload(server.client, make_adapter(server.model)[0], blob, "random")
    assert 400 <= r.status_code < 500 and set(r.json()) == {"error", "error_type"}
    assert server.snapshot() == server.baseline


# --------------------------------------------------------------------------- concurrency


def test_generations_are_unaffected_by_concurrent_uploads_replaces_deletes(clean) -> None:
    client, model = clean.client, clean.model
    stable = ["s0", "s1", "s2", "s3"]
    for i, adapter_id in enumerate(stable):
        assert upload(client, *make_adapter(model, seed=40 + i), adapter_id).status_code == 201
    prompts = ["Hello there", "The capital of France is"]
    combos = [(a, p) for a in [None, *stable] for p in prompts]
    solo = {(a, p): generate(client, a, p, n=16, ignore_eos=True) for a, p in combos}
    assert len({solo[(a, prompts[0])] for a in [None, *stable]}) == 5  # every adapter changes the output

    done = threading.Event()
    churn_log: list[tuple[str, int, float]] = []

    def churn() -> int:
        rounds = 0

        def log(op: str, response: httpx.Response) -> None:
            churn_log.append((op, response.status_code, time.monotonic()))

        while not done.is_set() or rounds < 3:
            cid = f"c{rounds}"
            log("upload", upload(client, *make_adapter(model, seed=60 + rounds), cid))
            log("replace", upload(client, *make_adapter(model, seed=80 + rounds), cid, replace=True))
            if rounds:
                log("delete", client.delete(f"/adapters/c{rounds - 1}"))
            generate(client, cid, n=2)
            rounds += 1
        return rounds

    def one(i: int) -> tuple[tuple[str | None, str], str]:
        adapter_id, prompt = combos[i % len(combos)]
        return (adapter_id, prompt), generate(client, adapter_id, prompt, n=16, ignore_eos=True)

    with ThreadPoolExecutor(max_workers=34) as pool:
        churner = pool.submit(churn)
        started = time.monotonic()
        results = list(pool.map(one, range(32)))
        finished = time.monotonic()
        done.set()
        rounds = churner.result(timeout=120)

    assert len(results) == 32
    assert any(started <= t <= finished for _, _, t in churn_log), "no store write overlapped the generations"
    for combo, text in results:
        assert text == solo[combo], combo
    expected = {"upload": 201, "replace": 201, "delete": 204}
    assert all(status == expected[op] for op, status, _ in churn_log), churn_log
    listed = [s["id"] for s in client.get("/adapters").json()]
    assert listed == sorted(["resident", *stable, f"c{rounds - 1}"])
    on_disk = sorted(p.name.partition("@")[0] for p in (clean.data_dir / "adapters").iterdir())
    assert wait_for(lambda: sorted(p.name.partition("@")[0] for p in (clean.data_dir / "adapters").iterdir())
                    == listed), on_disk  # fmt: skip


# --------------------------------------------------------------------------- persistence


def test_restart_keeps_adapters_and_outputs(tiny_base, tokenizer, tmp_path) -> None:
    client = start_client(tiny_base, tokenizer, tmp_path)
    try:
        for i, adapter_id in enumerate(["one", "two"]):
            assert upload(client, *make_adapter(tiny_base, seed=i), adapter_id).status_code == 201
        client.delete("/adapters/two")
        assert upload(client, *make_adapter(tiny_base, seed=9), "three").status_code == 201
        listing = client.get("/adapters").json()
        before = {a: generate(client, a, n=12) for a in ["one", "three"]}
    finally:
        client.__exit__(None, None, None)

    client = start_client(tiny_base, tokenizer, tmp_path)
    try:
        assert client.get("/adapters").json() == listing
        assert {a: generate(client, a, n=12) for a in ["one", "three"]} == before
        assert client.get("/adapters/two").status_code == 404
    finally:
        client.__exit__(None, None, None)


def test_startup_adapters_register_into_the_store(tiny_base, tokenizer, tmp_path) -> None:
    path = tmp_path / "peft"
    make_peft_adapter(tiny_base, path, seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])

    def run(spec: list[str]) -> tuple[dict, str]:
        client = start_client(tiny_base, tokenizer, tmp_path, adapter=spec)
        try:
            return client.get("/adapters/boot").json(), generate(client, "boot")
        finally:
            client.__exit__(None, None, None)

    first, text = run([f"boot={path}"])
    assert first["sha256"] and first["rank"] == 4
    assert run([f"boot={path}"]) == (first, text)  # identical: kept as it was (same created_at)
    assert run([]) == (first, text)  # persisted without the flag too
    make_peft_adapter(tiny_base, path, seed=2, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    replaced, new_text = run([f"boot={path}"])
    assert replaced["sha256"] != first["sha256"] and new_text != text


def test_cold_adapters_are_read_off_the_event_loop(tiny_base, tokenizer, tmp_path) -> None:
    """With an empty host tier every generation reads its adapter from disk, never on the event loop."""
    client = start_client(tiny_base, tokenizer, tmp_path, host_cache_mb=0)
    try:
        for i, adapter_id in enumerate(["a", "b"]):
            assert upload(client, *make_adapter(tiny_base, seed=i), adapter_id).status_code == 201
        store = client.app.state.store
        original, where = store._load, []

        def spy(record):
            try:
                asyncio.get_running_loop()
                where.append("event loop")
            except RuntimeError:
                where.append("worker")
            return original(record)

        store._load = spy
        texts = {a: generate(client, a) for a in ["a", "b"]}
        assert where == ["worker", "worker"]
        assert {a: generate(client, a) for a in ["a", "b"]} == texts
    finally:
        client.__exit__(None, None, None)


def test_deleted_adapter_leaves_its_memory_slot(tiny_base, tokenizer, tmp_path, peft_adapter_factory) -> None:
    from tests.api_helpers import start_client

    path, _ = peft_adapter_factory(tiny_base, "gone", seed=9)
    client = start_client(tiny_base, tokenizer, tmp_path, adapter=[f"gone={path}"], mode="unmerged")
    try:
        body = {"inputs": "Hello", "parameters": {"adapter_id": "gone", "max_new_tokens": 2}}
        assert client.post("/generate", json=body).status_code == 200
        engine = client.app.state.engine
        assert any(k.startswith("gone@") for k in engine.slots.resident_keys)
        assert client.delete("/adapters/gone").status_code == 204
        deadline = time.monotonic() + 5
        while any(k.startswith("gone@") for k in engine.slots.resident_keys):
            assert time.monotonic() < deadline, "deleted adapter still in a memory slot"
            time.sleep(0.02)
        assert client.post("/generate", json=body).status_code == 404
    finally:
        client.__exit__(None, None, None)
