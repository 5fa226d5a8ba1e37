"""Speculative decoding with real prompt lookup on the embedded model (native runner, CPU): a
copying prompt gives the same tokens with ``--speculate 4`` as with 0, in fewer steps, under the
base and an adapter in one batch."""

from __future__ import annotations

from pathlib import Path

from adapters.peft_format import load_adapter_dir
from server.engine.base_model import load_native
from server.engine.engine import Engine, EngineConfig
from tests.conftest import CACHE_DIR
from tests.engine_helpers import run_many

EXAMPLES = Path(__file__).resolve().parents[2] / "examples/adapters"
PASSAGE = (
    "Delivery note 4471. Sender: Harbour Freight Ltd, 12 Quay Street, Portsmouth. Recipient: Elena "
    "Martins, 88 Orchard Lane, Leeds. Contents: three pallets of ceramic tiles, one crate of adhesive."
)


def test_copying_prompt_equals_no_speculation_with_fewer_steps() -> None:
    base = load_native(None, "float32", "cpu", CACHE_DIR, kv_cache_tokens=4096, max_seq_len=1024)
    engine = Engine(base.runner, base.tokenizer, EngineConfig(mode="unmerged"), base.eos_ids)
    caps = load_adapter_dir(EXAMPLES / "caps", "caps", engine.base_shapes)
    messages = [{"role": "user", "content": f"{PASSAGE}\n\nRepeat the text above exactly, word for word."}]
    text = base.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = base.tokenizer(text, add_special_tokens=False)["input_ids"]
    jobs = [(ids, None), (ids, caps)]
    plain = run_many(engine, jobs, max_new_tokens=40)
    plain_steps = engine.stats.steps
    engine.speculate = 4  # the same engine and weights, speculation on (EngineConfig(speculate=4))
    for adapter in (None, caps):  # solo
        assert (
            run_many(engine, [(ids, adapter)], max_new_tokens=40)[0].tokens
            == plain[adapter is not None].tokens
        )
    before = engine.stats.steps
    mixed = run_many(engine, jobs, max_new_tokens=40)
    assert [o.tokens for o in mixed] == [o.tokens for o in plain]
    assert engine.stats.steps - before < plain_steps  # several tokens per step
    stats = engine.stats.speculation
    assert stats.accepted >= 20, stats  # the model copies its prompt: most drafts are right
    assert set(stats.by_adapter) == {"__base__", "caps"}
    assert engine.runner.kv.used_blocks == 0 and not engine.runner.kv.sequences
