"""Analysis routes over HTTP on the tiny model, against dense references computed here with numpy.

Every reference forms ΔW = s·B·A explicitly (float64) and takes a full SVD: exactly what the
server must never do. One server is shared by the module (ids are distinct per test).
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from safetensors.numpy import load as np_load
from safetensors.torch import save as st_save

from adapters.analysis import weights_digest
from tests.adapter_files import adapter_config, adapter_tensors, files_parts, linear_shapes
from tests.api_helpers import start_client

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
R, ALPHA = 8, 16.0
LAYER_FIELDS = {
    "module", "shape", "rank", "singular_values", "delta_fro", "delta_spectral", "base_spectral_norm",
    "base_fro", "sval_ratios", "subspace_factors", "subspace_ratios", "amplification_factor",
    "base_alignment", "effective_rank", "stable_rank", "energy_rank", "recommended_rank",
}  # fmt: skip
SUMMARY_FIELDS = {
    "layers", "total_delta_fro", "mean_effective_rank", "median_amplification_factor", "max_sval_ratio",
    "recommended_rank",
}  # fmt: skip
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Small matrices gain nothing from threads; on a busy 2-core box they only slow things down."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def server(tiny_base, tokenizer, tmp_path_factory):
    client = start_client(tiny_base, tokenizer, tmp_path_factory.mktemp("analysis"), max_total_tokens=256)
    yield client
    client.__exit__(None, None, None)


# --------------------------------------------------------------------------- dense references


@dataclass
class Reference:
    """What was uploaded: the LoRA factors (float64 numpy) and the scale, to form ΔW densely."""

    tensors: dict[str, np.ndarray]
    scale: float

    @property
    def modules(self) -> list[str]:
        return sorted({k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in self.tensors})


def upload(
    client, adapter_id: str, model, *, seed: int, r: int = R, replace: bool = False, **extra
) -> Reference:
    """Upload a random adapter on every linear layer of ``model``; return its dense reference."""
    tensors = adapter_tensors(model, seed=seed, r=r, targets=ALL)
    config = adapter_config(r=r, alpha=ALPHA, targets=ALL, **extra)
    resp = client.post(
        "/adapters",
        files=files_parts(json.dumps(config).encode(), st_save(tensors)),
        data={"adapter_id": adapter_id},
        params={"replace": "true"} if replace else None,
    )
    assert resp.status_code == 201, resp.text
    scale = ALPHA / math.sqrt(r) if extra.get("use_rslora") else ALPHA / r
    return Reference({k: v.double().numpy() for k, v in tensors.items()}, scale)


def dense_delta(ref: Reference, module: str) -> np.ndarray:
    A = ref.tensors[f"base_model.model.{module}.lora_A.weight"]  # [r, k]
    B = ref.tensors[f"base_model.model.{module}.lora_B.weight"]  # [d, r]
    return ref.scale * B @ A  # [d, k]


def base_weight(model, module: str) -> np.ndarray:
    return model.get_submodule(module).weight.detach().double().numpy()  # [d, k]


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


# --------------------------------------------------------------------------- analysis


def test_analysis_matches_dense_definitions(server, tiny_base) -> None:
    ref = upload(server, "dense-a", tiny_base, seed=1, use_rslora=True)
    resp = server.get("/adapters/dense-a/analysis")
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert set(doc) == {"adapter_id", "rank", "lora_alpha", "summary", "layers"}
    assert (doc["adapter_id"], doc["rank"], doc["lora_alpha"]) == ("dense-a", R, ALPHA)
    assert set(doc["summary"]) == SUMMARY_FIELDS and doc["summary"]["layers"] == 14
    assert [row["module"] for row in doc["layers"]] == sorted(
        ref.modules, key=lambda m: (int(m.split(".")[2]), m)
    )  # model order
    for row in doc["layers"]:
        assert set(row) == LAYER_FIELDS
        module = row["module"]
        delta, W = dense_delta(ref, module), base_weight(tiny_base, module)
        U, S, Vh = np.linalg.svd(delta, full_matrices=False)
        U, S, Vh = U[:, :R], S[:R], Vh[:R]
        U_W, S_W, _ = np.linalg.svd(W, full_matrices=False)
        assert row["shape"] == list(delta.shape) and row["rank"] == R
        assert rel(row["singular_values"], S) < 1e-6
        assert rel(row["delta_fro"], np.linalg.norm(delta)) < 1e-6
        assert rel(row["delta_spectral"], S[0]) < 1e-6
        assert rel(row["base_spectral_norm"], S_W[0]) < 1e-3
        assert rel(row["base_fro"], np.linalg.norm(W)) < 1e-6
        assert rel(row["sval_ratios"], S / S_W[0]) < 1e-3
        M = U.T @ W @ Vh.T  # [r, r]; u_i^T W v_i is invariant under the joint sign flip of u_i, v_i
        assert np.allclose(row["subspace_factors"], np.diag(M), rtol=1e-5, atol=1e-9)
        assert rel(row["amplification_factor"], np.linalg.norm(delta) / np.linalg.norm(M)) < 1e-5
        phi = np.linalg.norm(U.T @ U_W[:, :R]) ** 2 / R
        assert abs(row["base_alignment"] - phi) < 1e-6
        p = S / S.sum()
        assert rel(row["effective_rank"], np.exp(-(p * np.log(p)).sum())) < 1e-6
        assert rel(row["stable_rank"], (S**2).sum() / S[0] ** 2) < 1e-6
        energy = np.cumsum(S**2) / (S**2).sum()
        for t, k in row["energy_rank"].items():
            assert k == int(np.argmax(energy >= float(t) - 1e-12)) + 1
    total = math.sqrt(sum(np.linalg.norm(dense_delta(ref, m)) ** 2 for m in ref.modules))
    assert rel(doc["summary"]["total_delta_fro"], total) < 1e-6


def test_layers_filter_and_bad_regex(server, tiny_base) -> None:
    upload(server, "filtered", tiny_base, seed=2)
    full = server.get("/adapters/filtered/analysis").json()
    only_q = server.get("/adapters/filtered/analysis", params={"layers": "q_proj"}).json()
    assert [r["module"] for r in only_q["layers"]] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    assert only_q["summary"]["layers"] == 2
    assert only_q["layers"] == [r for r in full["layers"] if r["module"].endswith("q_proj")]
    layer1 = server.get(
        "/adapters/filtered/analysis", params={"layers": r"layers\.1\.(mlp|self_attn)"}
    ).json()
    assert len(layer1["layers"]) == 7 and all(".1." in r["module"] for r in layer1["layers"])
    none = server.get("/adapters/filtered/analysis", params={"layers": "no_such_module"}).json()
    assert none["layers"] == [] and none["summary"]["layers"] == 0
    bad = server.get("/adapters/filtered/analysis", params={"layers": "q_proj("})
    assert bad.status_code == 422 and bad.json()["error_type"] == "invalid_layers"
    assert "regular expression" in bad.json()["error"]


def test_unknown_adapter_is_404_everywhere(server) -> None:
    for path in ("analysis", "analysis.png", "analysis.html", "download"):
        resp = server.get(f"/adapters/nope/{path}")
        assert resp.status_code == 404 and "nope" in resp.json()["error"], path
    resp = server.post("/adapters/nope/shrink", json={"method": "rank", "value": 2, "new_id": "x"})
    assert resp.status_code == 404


def test_analysis_is_cached_until_replaced_or_deleted(server, tiny_base) -> None:
    ref1 = upload(server, "cached", tiny_base, seed=3)
    memo = server.app.state.analysis.memo
    first = server.get("/adapters/cached/analysis").json()
    hits = memo.hits
    assert server.get("/adapters/cached/analysis").json() == first
    assert memo.hits == hits + 1
    module = first["layers"][0]["module"]
    S1 = np.linalg.svd(dense_delta(ref1, module), compute_uv=False)[:R]
    assert rel(first["layers"][0]["singular_values"], S1) < 1e-6

    ref2 = upload(server, "cached", tiny_base, seed=4, replace=True)
    second = server.get("/adapters/cached/analysis").json()
    S2 = np.linalg.svd(dense_delta(ref2, module), compute_uv=False)[:R]
    assert rel(second["layers"][0]["singular_values"], S2) < 1e-6
    assert sum(k.startswith("cached@") for k in memo.cached_keys()) == 1  # the old version's entry is gone

    assert server.delete("/adapters/cached").status_code == 204
    assert server.get("/adapters/cached/analysis").status_code == 404
    assert not any(k.startswith("cached@") for k in memo.cached_keys())


def test_base_stats_are_cached_on_disk(server, tiny_base) -> None:
    upload(server, "disk", tiny_base, seed=5)
    assert server.get("/adapters/disk/analysis").status_code == 200
    cache = server.app.state.analysis.base_cache()
    assert cache.path is not None and cache.path.is_file()
    assert cache.path.parent.name == "analysis" and "tiny-llama" in cache.path.name
    data = torch.load(cache.path, weights_only=True)
    assert len(data["layers"]) == 14 and data["digest"] == server.app.state.engine.base_weights().digest
    # `loraplex analyze` (no engine) keys its cache file the same way, so the two share it.
    names = linear_shapes(tiny_base)
    assert weights_digest((n, tiny_base.get_submodule(n).weight) for n in names) == data["digest"]


def test_png_and_html(server, tiny_base) -> None:
    upload(server, "pictures", tiny_base, seed=6)
    png = server.get("/adapters/pictures/analysis.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content.startswith(PNG_MAGIC) and len(png.content) > 10_000
    page = server.get("/adapters/pictures/analysis.html")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    text = page.text
    assert text.count("data:image/png;base64,") == 3 and "<table" in text
    doc = server.get("/adapters/pictures/analysis").json()
    for row in doc["layers"]:
        assert f"<td>{row['module']}</td>" in text
    assert server.get("/adapters/pictures/analysis.png", params={"layers": "("}).status_code == 422


# --------------------------------------------------------------------------- compare


def test_compare_matches_dense_phi(server, tiny_base) -> None:
    ref_a = upload(server, "cmp-a", tiny_base, seed=7)
    ref_b = upload(server, "cmp-b", tiny_base, seed=8, r=4)
    resp = server.get("/adapters/compare", params={"a": "cmp-a", "b": "cmp-b"})
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert doc["a"] == "cmp-a" and doc["b"] == "cmp-b" and doc["summary"]["shared_modules"] == 14
    for row in doc["layers"]:
        module = row["module"]
        assert (row["rank_a"], row["rank_b"]) == (R, 4)
        Ua, _, Vha = np.linalg.svd(dense_delta(ref_a, module), full_matrices=False)
        Ub, _, Vhb = np.linalg.svd(dense_delta(ref_b, module), full_matrices=False)
        for side, X, Y in (("phi_left", Ua, Ub), ("phi_right", Vha.T, Vhb.T)):
            phi = np.array(row[side])
            assert phi.shape == (4, 4)
            want = np.array(
                [
                    [np.linalg.norm(X[:, :i].T @ Y[:, :j]) ** 2 / min(i, j) for j in range(1, 5)]
                    for i in range(1, 5)
                ]
            )
            assert np.allclose(phi, want, atol=1e-6), (module, side)
    means = doc["summary"]
    assert means["mean_phi_left_full"] == pytest.approx(np.mean([r["phi_left_full"] for r in doc["layers"]]))


def test_compare_with_itself_is_one_and_errors(server, tiny_base) -> None:
    upload(server, "cmp-self", tiny_base, seed=9)
    doc = server.get(
        "/adapters/compare", params={"a": "cmp-self", "b": "cmp-self", "layers": "v_proj"}
    ).json()
    assert doc["summary"]["shared_modules"] == 2
    for row in doc["layers"]:
        assert np.allclose(row["phi_left"], 1.0, atol=1e-9) and np.allclose(row["phi_right"], 1.0, atol=1e-9)
    assert doc["summary"]["mean_phi_left_top"] == pytest.approx(1.0)
    missing = server.get("/adapters/compare", params={"a": "cmp-self", "b": "nope"})
    assert missing.status_code == 404 and "nope" in missing.json()["error"]
    assert server.get("/adapters/compare", params={"a": "cmp-self"}).status_code == 422


# --------------------------------------------------------------------------- shrink and download


def _zip_files(content: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    with zipfile.ZipFile(io.BytesIO(content)) as zf:
        names = sorted(zf.namelist())
        folder = names[0].split("/")[0]
        assert names == [f"{folder}/adapter_config.json", f"{folder}/adapter_model.safetensors"]
        config = json.loads(zf.read(f"{folder}/adapter_config.json"))
        tensors = np_load(zf.read(f"{folder}/adapter_model.safetensors"))
    return config, tensors


def _peft_scale(config: dict, module: str) -> float:
    """PEFT's rule, written out: the first rank/alpha pattern key matching the end of the name."""

    def pick(patterns: dict, default):
        return next((v for k, v in patterns.items() if module == k or module.endswith("." + k)), default)

    r, alpha = (
        pick(config.get("rank_pattern") or {}, config["r"]),
        pick(config.get("alpha_pattern") or {}, config["lora_alpha"]),
    )
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def test_shrink_is_the_truncated_svd_and_serves_it(server, tiny_base, tokenizer) -> None:
    ref = upload(server, "big", tiny_base, seed=10)
    resp = server.post("/adapters/big/shrink", json={"method": "sv_fro", "value": 0.9, "new_id": "small"})
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["id"] == "small" and resp.headers["location"] == "/adapters/small"
    assert server.get("/adapters/small").json() == {k: v for k, v in body.items() if k != "shrink"}
    report = {row["module"]: row for row in body["shrink"]["layers"]}
    assert body["shrink"]["source_id"] == "big" and set(report) == set(ref.modules)

    config, tensors = _zip_files(server.get("/adapters/small/download").content)
    truncated: dict[str, np.ndarray] = {}
    for module, row in report.items():
        delta = dense_delta(ref, module)
        U, S, Vh = np.linalg.svd(delta, full_matrices=False)
        fro = np.sqrt(np.cumsum(S[:R] ** 2) / (S[:R] ** 2).sum())
        k = int(np.argmax(fro >= 0.9 - 1e-12)) + 1  # minimal rank meeting the criterion
        assert row["original_rank"] == R and row["kept_rank"] == k
        assert row["fro_retained"] == pytest.approx(fro[k - 1], rel=1e-9)
        A = tensors[f"base_model.model.{module}.lora_A.weight"].astype(np.float64)  # [k, in]
        B = tensors[f"base_model.model.{module}.lora_B.weight"].astype(np.float64)  # [out, k]
        assert A.shape == (k, delta.shape[1]) and B.shape == (delta.shape[0], k)
        new_delta = _peft_scale(config, module) * B @ A
        truncated[module] = (U[:, :k] * S[:k]) @ Vh[:k]  # Eckart–Young: the best rank-k approximation
        assert np.abs(new_delta - truncated[module]).max() < 1e-5 * S[0]
        residual = np.linalg.norm(delta - new_delta)
        assert residual == pytest.approx(np.sqrt((S[k:] ** 2).sum()), rel=1e-4, abs=1e-6 * S[0])
    assert any(row["kept_rank"] < R for row in report.values())

    # Served outputs equal the base model with the dense truncation merged into its weights.
    reference = type(tiny_base)(tiny_base.config).eval()
    reference.load_state_dict(tiny_base.state_dict())
    with torch.no_grad():
        for module, delta in truncated.items():
            reference.get_submodule(module).weight += torch.from_numpy(delta).float()
    prompt = "Hello there, how are you"
    out = server.post(
        "/generate",
        json={"inputs": prompt, "parameters": {"max_new_tokens": 8, "adapter_id": "small", "details": True}},
    ).json()
    ids = tokenizer(prompt, add_special_tokens=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        generated = reference.generate(
            ids, max_new_tokens=8, do_sample=False, pad_token_id=2, eos_token_id=None
        )
        logits = reference(generated).logits[0, ids.shape[1] - 1 : -1].log_softmax(-1)  # [8, vocab]
    want = generated[0, ids.shape[1] :].tolist()
    got = [t["id"] for t in out["details"]["tokens"]]
    assert got == want
    logprobs = [t["logprob"] for t in out["details"]["tokens"]]
    assert np.allclose(logprobs, logits[range(8), want].numpy(), atol=1e-3)
    # ... and the shrunk adapter is analysed like any other.
    assert server.get("/adapters/small/analysis").json()["rank"] == max(
        r["kept_rank"] for r in report.values()
    )


def _expected_rank(method: str, value: float, S: np.ndarray, base_norm: float) -> int:
    """The minimal kept rank per method, written out from docs/analysis.md (brute force over k)."""
    ok = {
        "rank": lambda k: k >= value,
        "sv_ratio": lambda k: k == len(S) or S[k] < S[0] / value,
        "sv_cumulative": lambda k: S[:k].sum() / S.sum() >= value - 1e-12,
        "spn_ckpt": lambda k: k == len(S) or S[k] < value * base_norm,
    }[method]
    return next(k for k in range(1, len(S) + 1) if ok(k))


@pytest.mark.parametrize("method", ["rank", "sv_ratio", "sv_cumulative", "spn_ckpt"])
def test_every_method_keeps_the_minimal_rank(server, tiny_base, method) -> None:
    adapter_id = f"src-{method.replace('_', '-')}"
    upload(server, adapter_id, tiny_base, seed=11)
    layers = {r["module"]: r for r in server.get(f"/adapters/{adapter_id}/analysis").json()["layers"]}
    spn = float(np.median([x for r in layers.values() for x in r["sval_ratios"]]))  # shrinks about half
    value = {"rank": 3, "sv_ratio": 2.0, "sv_cumulative": 0.6, "spn_ckpt": spn}[method]
    body = {"method": method, "value": value, "new_id": adapter_id + "-s"}
    resp = server.post(f"/adapters/{adapter_id}/shrink", json=body)
    assert resp.status_code == 201, resp.text
    for row in resp.json()["shrink"]["layers"]:
        info = layers[row["module"]]
        S = np.array(info["singular_values"])
        assert row["kept_rank"] == _expected_rank(method, value, S, info["base_spectral_norm"])
    kept = [row["kept_rank"] for row in resp.json()["shrink"]["layers"]]
    assert min(kept) < R and resp.json()["rank"] == max(kept)


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"method": "magic", "value": 1, "new_id": "n1"}, 422, "sv_fro"),
        ({"method": "sv_fro", "value": 1.5, "new_id": "n2"}, 422, "(0, 1]"),
        ({"method": "sv_ratio", "value": 0.5, "new_id": "n3"}, 422, ">= 1"),
        ({"method": "rank", "value": 2.5, "new_id": "n4"}, 422, "integer"),
        ({"method": "rank", "value": R, "new_id": "n5"}, 422, f"1 to {R - 1}"),
        ({"method": "rank", "value": 99, "new_id": "n6"}, 422, "does not shrink"),
        ({"method": "sv_ratio", "value": 1e12, "new_id": "n7"}, 422, "nothing to shrink"),
        ({"method": "rank", "value": 2, "new_id": "bad id/.."}, 400, "not allowed"),
        ({"method": "rank", "value": 2, "new_id": "shrink-src"}, 409, "already exists"),
        ({"method": "rank", "value": 2}, 422, "new_id"),
    ],
)
def test_shrink_refusals(server, tiny_base, body, status, words) -> None:
    if "shrink-src" not in {a["id"] for a in server.get("/adapters").json()}:
        upload(server, "shrink-src", tiny_base, seed=12)
    before = server.get("/adapters").json()
    resp = server.post("/adapters/shrink-src/shrink", json=body)
    assert resp.status_code == status, resp.text
    assert words in resp.json()["error"]
    assert server.get("/adapters").json() == before


def test_download_round_trips_through_upload(server, tiny_base) -> None:
    upload(server, "round", tiny_base, seed=13)
    original = server.get("/adapters/round").json()
    resp = server.get("/adapters/round/download")
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/zip"
    assert 'filename="round.zip"' in resp.headers["content-disposition"]
    again = server.post(
        "/adapters",
        files={"archive": ("round.zip", resp.content, "application/zip")},
        data={"adapter_id": "round-copy"},
    )
    assert again.status_code == 201, again.text
    copy = again.json()
    assert copy["sha256"] == original["sha256"] and copy["bytes"] == original["bytes"]
    a = server.get("/adapters/round/analysis").json()["layers"]
    b = server.get("/adapters/round-copy/analysis").json()["layers"]
    assert [x["singular_values"] for x in a] == [x["singular_values"] for x in b]


def test_upload_screening_compares_the_update_with_the_base_weights(server, tiny_base) -> None:
    """The upload's ``large_update`` check reads σ_max(W) through ``engine.base_weights()``."""

    def warnings(adapter_id: str, b: float, alpha: float) -> list[str]:
        tensors = adapter_tensors(tiny_base, seed=11, b=b)
        config = json.dumps(adapter_config(alpha=alpha)).encode()
        resp = server.post(
            "/adapters", files=files_parts(config, st_save(tensors)), data={"adapter_id": adapter_id}
        )
        assert resp.status_code == 201, resp.text
        return [w["type"] for w in resp.json()["warnings"]]

    assert "large_update" not in warnings("gentle", b=1e-3, alpha=16)
    assert "large_update" in warnings("loud", b=1e-3, alpha=64000)  # the same factors, 4000 times the scale
