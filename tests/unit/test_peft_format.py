"""Parsing PEFT adapters: config semantics match PEFT's own, bad adapters are refused clearly."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save

from adapters.peft_format import (
    AdapterError,
    BaseLinearShape,
    check_safetensors_header,
    load_adapter_dir,
    load_safetensors_bytes,
    load_stored_safetensors,
    parse_adapter_config,
)
from server.engine.hf_runner import HFRunner
from tests.adapter_files import raw_safetensors


@pytest.fixture
def shapes(tiny_model) -> dict[str, BaseLinearShape]:
    return HFRunner(tiny_model).base_shapes


def _peft_layers(peft_model):
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {n.removeprefix(prefix): m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True),
        dict(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "k_proj", "down_proj"],
            rank_pattern={"k_proj": 2, "layers.1.self_attn.q_proj": 16},
            alpha_pattern={"down_proj": 3.0},
        ),
        dict(r=4, lora_alpha=4, target_modules=r".*\.layers\.1\..*\.(up|gate)_proj"),
        dict(r=4, lora_alpha=4, target_modules=["up_proj"], layers_to_transform=[1]),
        dict(r=4, lora_alpha=4, target_modules=["o_proj"], layers_to_transform=[0], layers_pattern="layers"),
    ],
)
def test_modules_ranks_and_scales_match_peft(tiny_base, shapes, peft_adapter_factory, kwargs) -> None:
    path, peft_model = peft_adapter_factory(tiny_base, "a", **kwargs)
    adapter = load_adapter_dir(path, "a", shapes)
    expected = _peft_layers(peft_model)
    assert set(adapter.layers) == set(expected)
    for name, layer in expected.items():
        ours = adapter.layers[name]
        assert ours.rank == layer.r["default"], name
        assert ours.scale == pytest.approx(layer.scaling["default"]), name
        torch.testing.assert_close(ours.A, layer.lora_A["default"].weight)
        torch.testing.assert_close(ours.B, layer.lora_B["default"].weight)


def _write(dir_, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    dir_.mkdir(exist_ok=True)
    (dir_ / "adapter_config.json").write_text(json.dumps(config))
    (dir_ / "adapter_model.safetensors").write_bytes(save(tensors))


def _valid(shapes, r: int = 2) -> tuple[dict, dict[str, torch.Tensor]]:
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 4, "target_modules": ["q_proj"]}
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("q_proj"):
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, shape.in_features)
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(shape.out_features, r)
    return config, tensors


def test_handwritten_valid_adapter_loads(tmp_path, shapes) -> None:
    config, tensors = _valid(shapes)
    _write(tmp_path / "ok", config, tensors)
    adapter = load_adapter_dir(tmp_path / "ok", "ok", shapes)
    assert len(adapter.layers) == 2 and adapter.max_rank == 2
    assert adapter.layers["model.layers.0.self_attn.q_proj"].scale == 2.0


@pytest.mark.parametrize(
    ("change", "error_type", "words"),
    [
        ({"peft_type": "IA3"}, "unsupported", "peft_type"),
        ({"use_dora": True}, "invalid_weights", "lora_magnitude_vector"),  # DoRA: config without magnitudes
        ({"modules_to_save": ["norm"]}, "unsupported", "modules_to_save names 'norm'"),
        ({"modules_to_save": ["lm_head"]}, "invalid_weights", "no 'lm_head.weight'"),
        ({"bias": "all"}, "unsupported", "bias"),
        ({"r": None}, "invalid_config", "missing r"),
        ({"target_modules": []}, "invalid_config", "target_modules"),
        ({"target_modules": ["nonexistent_proj"]}, "incompatible", "q_proj"),
        ({"r": 0}, "invalid_config", "positive integer"),
        ({"target_modules": "(unclosed"}, "invalid_config", "regular expression"),
        # issue 31, finding 4: numbers the serving dtype cannot hold are refused at upload
        ({"lora_alpha": 1e300}, "invalid_config", "lora_alpha"),
        ({"lora_alpha": 10**400}, "invalid_config", "lora_alpha"),
        ({"lora_alpha": float("inf")}, "invalid_config", "lora_alpha"),
        ({"alpha_pattern": {"q_proj": 1e300}}, "invalid_config", "alpha_pattern"),
        ({"rank_pattern": {"q_proj": 10**400}}, "invalid_config", "rank_pattern"),
        ({"lora_alpha": 60000, "r": 2}, "invalid_weights", "too large"),
    ],
)
def test_bad_configs_are_refused(tmp_path, shapes, change, error_type, words) -> None:
    config, tensors = _valid(shapes)
    config.update(change)
    _write(tmp_path / "bad", config, tensors)
    with pytest.raises(AdapterError) as err:
        load_adapter_dir(tmp_path / "bad", "bad", shapes)
    assert err.value.error_type == error_type
    assert words in err.value.message


def test_not_json_config(tmp_path, shapes) -> None:
    with pytest.raises(AdapterError, match="not valid JSON"):
        parse_adapter_config(b"{r: 8")


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path, shapes) -> None:
    config, tensors = _valid(shapes)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.randn(2, 99)
    _write(tmp_path / "bad", config, tensors)
    with pytest.raises(AdapterError) as err:
        load_adapter_dir(tmp_path / "bad", "bad", shapes)
    msg = err.value.message
    assert "model.layers.1.self_attn.q_proj.lora_A.weight" in msg and "[2, 99]" in msg and "[2, 64]" in msg


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda t: t.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"), "no lora_B"),
        (
            lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}),
            "not a LoRA",
        ),
        (
            lambda t: t.update({"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(2, 5)}),
            "embedding",
        ),
        (
            lambda t: t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].fill_(float("nan")),
            "NaN",
        ),
        (  # one NaN among finite entries (the check reads the max of |entries|: NaN must reach it)
            lambda t: t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"][3, 1].fill_(
                float("nan")
            ),
            "NaN",
        ),
        (
            lambda t: t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"][0, 5].fill_(
                -float("inf")
            ),
            "Inf",
        ),
        (
            lambda t: [t.pop(k) for k in list(t) if "layers.1." in k],
            "have no weights",
        ),
        (  # finite in float32, but scale·B@A would overflow float16
            lambda t: t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].fill_(1e6),
            "too large",
        ),
    ],
)
def test_bad_tensors_are_refused(tmp_path, shapes, mutate, words) -> None:
    config, tensors = _valid(shapes)
    mutate(tensors)
    _write(tmp_path / "bad", config, tensors)
    with pytest.raises(AdapterError, match=words):
        load_adapter_dir(tmp_path / "bad", "bad", shapes)


def test_weights_for_a_module_the_base_lacks(tmp_path, shapes) -> None:
    config, tensors = _valid(shapes)
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(2, 64)
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = torch.zeros(64, 2)
    _write(tmp_path / "bad", config, tensors)
    with pytest.raises(AdapterError, match="another base model") as err:
        load_adapter_dir(tmp_path / "bad", "bad", shapes)
    assert err.value.error_type == "incompatible"


def test_rank_limit(tmp_path, shapes) -> None:
    config, tensors = _valid(shapes, r=4)
    _write(tmp_path / "big", config, tensors)
    with pytest.raises(AdapterError, match="--max-rank"):
        load_adapter_dir(tmp_path / "big", "big", shapes, max_rank=2)


def test_pickle_weights_are_never_loaded(tmp_path, shapes) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(_valid(shapes)[0]))
    (tmp_path / "p" / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(AdapterError, match="safetensors") as err:
        load_adapter_dir(tmp_path / "p", "p", shapes)
    assert err.value.error_type == "pickle_refused"


@pytest.mark.parametrize(
    ("blob", "words"),
    [
        (b"\x01\x02", "truncated"),
        (struct.pack("<Q", 10**12) + b"{}", "header"),
        (struct.pack("<Q", 100) + b"{}", "truncated"),
        (struct.pack("<Q", 5) + b"nope!", "not JSON"),
    ],
)
def test_malformed_safetensors(blob: bytes, words: str) -> None:
    with pytest.raises(AdapterError, match=words):
        check_safetensors_header(blob)


def test_unknown_dtype_and_bad_offsets() -> None:
    good = save({"x": torch.zeros(2, 2)})
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8 : 8 + n])
    for patch, words in ((("dtype", "I64"), "dtype"), (("data_offsets", [0, 999]), "outside")):
        bad_header = dict(header)
        bad_header["x"] = dict(header["x"], **{patch[0]: patch[1]})
        raw = json.dumps(bad_header).encode()
        with pytest.raises(AdapterError, match=words):
            check_safetensors_header(struct.pack("<Q", len(raw)) + raw + good[8 + n :])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_stored_read_equals_the_uploads_parse(dtype) -> None:
    """``load_stored_safetensors`` (a stored version's short read: in place, cast in pieces) gives
    the tensors ``load_safetensors_bytes`` gives, for tensors of many pieces, empty ones and scalars."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "big": (torch.randn(300, 333, generator=g) * 100).to(dtype),  # 99,900 entries: 4 pieces
        "small": torch.randn(3, 5, generator=g).to(dtype),
        "empty": torch.zeros(0, 7, dtype=dtype),
        "scalar": torch.tensor(1.5, dtype=dtype),
    }
    blob = save(tensors)
    full, short = load_safetensors_bytes(blob), load_stored_safetensors(blob)
    assert full.keys() == short.keys() == tensors.keys()
    for name in tensors:
        assert short[name].dtype == torch.float32 and short[name].shape == full[name].shape
        assert torch.equal(short[name], full[name])


def test_the_stored_read_copes_with_an_unaligned_tensor_and_refuses_a_bad_header() -> None:
    """A tensor whose bytes start at an odd address offset is read from an aligned copy; offsets
    outside the blob are refused before anything is read."""
    values = torch.tensor([1.0, -2.5, 3.25], dtype=torch.float16)
    header = {"pad": {"dtype": "F16", "shape": [0], "data_offsets": [0, 0]},
              "x": {"dtype": "F16", "shape": [3], "data_offsets": [1, 7]}}  # fmt: skip
    text = json.dumps(header).encode()
    text += b" " * (len(text) % 2)  # an even header: the body starts even, the tensor at an odd offset
    blob = struct.pack("<Q", len(text)) + text + b"\x00" + values.numpy().tobytes()
    assert (8 + len(text) + 1) % 2 == 1
    assert torch.equal(load_stored_safetensors(blob)["x"], values.float())
    bad = raw_safetensors({"x": {"dtype": "F16", "shape": [3], "data_offsets": [1, 9]}}, b"\x00" * 7)
    with pytest.raises(AdapterError, match="outside the file"):
        load_stored_safetensors(bad)
