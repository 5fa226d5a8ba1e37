"""The native runner's model families (server/engine/native/families/): one generic runner, a
family is a config reading, its checkpoint's names and a model class."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from server.engine.lora import BASE_SLOT
from server.engine.native import NativeLlamaRunner, supports
from server.engine.native.config import NativeConfig
from server.engine.native.families import FAMILIES, ModelFamily, family_for, register
from server.engine.native.model import WeightNames
from server.engine.runner import PrefillInput

SMALL = dict(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256,
)  # fmt: skip
# a family whose checkpoint names every tensor differently from Llama's
RENAMED = WeightNames(
    embed="tok.weight", lm_head="out.weight", final_norm="norm_f.weight", layer="blocks.{i}",
    input_norm="ln1.weight", post_norm="ln2.weight", attention="attn", mlp="ffn",
    q="wq", k="wk", v="wv", o="wo", gate="w1", up="w3", down="w2",
)  # fmt: skip


def test_the_served_families_and_a_clear_refusal() -> None:
    assert {"llama", "mistral", "qwen2"} <= set(FAMILIES)
    with pytest.raises(ValueError, match=r"model_type 'gpt2' is not one of .*llama"):
        family_for({"model_type": "gpt2"})
    base = dict(SMALL, num_hidden_layers=1)
    assert family_for({"model_type": "qwen2", **base}).read_config({"model_type": "qwen2", **base}).qkv_bias
    mistral = {"model_type": "mistral", "sliding_window": 64, **base}
    assert family_for(mistral).read_config(mistral).sliding_window == 64
    assert (
        family_for({"model_type": "llama"})
        .read_config({"model_type": "llama", "sliding_window": 64, **base})
        .sliding_window
        is None
    )
    with pytest.raises(ValueError, match="registered twice"):
        register(ModelFamily("llama", NativeConfig.from_dict))


def _renamed_checkpoint(src, dst) -> None:
    """The Llama checkpoint in ``src`` with every tensor under ``RENAMED``'s names, in ``dst``."""
    default = WeightNames()
    pairs = [
        (default.embed, RENAMED.embed),
        (default.lm_head, RENAMED.lm_head),
        (default.final_norm, RENAMED.final_norm),
    ]
    for i in range(SMALL["num_hidden_layers"]):
        old, new = default.layer.format(i=i), RENAMED.layer.format(i=i)
        pairs += [(f"{old}.{default.input_norm}", f"{new}.{RENAMED.input_norm}"),
                  (f"{old}.{default.post_norm}", f"{new}.{RENAMED.post_norm}")]  # fmt: skip
        for part in ("q", "k", "v", "o"):
            pairs.append(
                (
                    f"{old}.self_attn.{getattr(default, part)}.weight",
                    f"{new}.attn.{getattr(RENAMED, part)}.weight",
                )
            )
        for part in ("gate", "up", "down"):
            pairs.append(
                (f"{old}.mlp.{getattr(default, part)}.weight", f"{new}.ffn.{getattr(RENAMED, part)}.weight")
            )
    tensors = load_file(str(src / "model.safetensors"))
    renamed = {new: tensors[old] for old, new in pairs if old in tensors}
    assert len(renamed) == len(tensors), "every tensor of the checkpoint is renamed"
    save_file(renamed, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text()) | {"model_type": "renamed-llama"}
    (dst / "config.json").write_text(json.dumps(config))


def test_a_family_registered_in_one_place_runs_on_the_generic_runner(tmp_path) -> None:
    torch.manual_seed(3)
    src, dst = tmp_path / "llama", tmp_path / "renamed"
    dst.mkdir()
    AutoModelForCausalLM.from_config(LlamaConfig(**SMALL)).eval().save_pretrained(src)
    _renamed_checkpoint(src, dst)
    config = json.loads((dst / "config.json").read_text())
    assert not supports(config)  # not served before it is registered
    register(ModelFamily("renamed-llama", NativeConfig.from_dict, RENAMED))
    try:
        assert supports(config)
        renamed = NativeLlamaRunner(dst, kv_cache_tokens=256)
        reference = NativeLlamaRunner(src, kv_cache_tokens=256)
    finally:
        del FAMILIES["renamed-llama"]
    assert renamed.family.names is RENAMED
    # its adapters' PEFT module names are the family's own
    assert "blocks.0.attn.wq" in renamed.lora_targets and "blocks.1.ffn.w2" in renamed.lora_targets
    assert len(renamed.lora_targets) == len(reference.lora_targets)
    prompt = [1, 17, 33, 64, 5]
    got = renamed.prefill([PrefillInput(0, prompt, 0, BASE_SLOT)]).logits
    expected = reference.prefill([PrefillInput(0, prompt, 0, BASE_SLOT)]).logits
    assert torch.equal(got, expected)
