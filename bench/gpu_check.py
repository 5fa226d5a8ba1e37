"""CUDA correctness of the native runner: logits against Hugging Face and PEFT on the same GPU.

Run on a machine with a GPU: ``python bench/gpu_check.py``. Float32 with TF32 off must match to
1e-4 relative scale; bfloat16 is compared by relative error of the logits (expected ~1e-2) and by
greedy tokens through the engine in float32.
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.peft_format import load_adapter_dir
from bench.common import write_random_adapter
from server.engine.engine import Engine, EngineConfig
from server.engine.lora_linear import BASE_SLOT
from server.engine.lora_model import AdapterSlots
from server.engine.native import NativeLlamaRunner
from server.engine.runner import DecodeInput, PrefillInput

SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=1024, vocab_size=1000)  # fmt: skip
PROMPTS = [[1, 15, 27, 300, 41, 9, 77], [1, 7], list(range(3, 60))]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> int:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda")
    failures = 0
    for name, config in (("llama", LlamaConfig(**SMALL)), ("qwen2", Qwen2Config(**SMALL))):
        for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
            torch.manual_seed(0)
            with tempfile.TemporaryDirectory() as tmp:
                model = AutoModelForCausalLM.from_config(config).eval()
                model.save_pretrained(tmp)
                hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
                runner = NativeLlamaRunner(Path(tmp), dtype=dtype, device=device, kv_cache_tokens=4096)
                adapter_dir = write_random_adapter(
                    runner.base_shapes, Path(tmp) / "a", seed=1, r=8, lora_alpha=16, b_scale=0.2
                )
                adapter = load_adapter_dir(adapter_dir, "a", runner.base_shapes)
                slot = AdapterSlots(runner.lora_targets, 4, runner.slots_changed).acquire(adapter)
                from peft import PeftModel

                peft = PeftModel.from_pretrained(copy.deepcopy(hf), adapter_dir).eval()
                rows = [
                    (i, p, s) for i, (p, s) in enumerate([(p, s) for p in PROMPTS for s in (BASE_SLOT, slot)])
                ]
                logits = runner.prefill([PrefillInput(i, p, 0, s) for i, p, s in rows]).logits
                decoded = runner.decode([DecodeInput(i, 5, s) for i, _, s in rows])
                worst = 0.0
                with torch.no_grad():
                    for i, p, s in rows:
                        ref_model = hf if s == BASE_SLOT else peft
                        ids = torch.tensor([[*p, 5]], device=device)
                        ref = ref_model(input_ids=ids).logits[0]
                        worst = max(worst, rel(logits[i], ref[-2]), rel(decoded[i], ref[-1]))
                ok = worst <= tolerance
                failures += not ok
                print(f"{name:6s} {str(dtype)[6:]:9s} base+LoRA rows, prefill+decode: worst relative error {worst:.2e} "
                      f"(limit {tolerance:g}) {'OK' if ok else 'FAIL'}")  # fmt: skip
                if dtype == torch.float32:  # greedy tokens through the engine, native vs HF runner
                    from tokenizers import Tokenizer, models
                    from transformers import PreTrainedTokenizerFast

                    tok = PreTrainedTokenizerFast(
                        tokenizer_object=Tokenizer(
                            models.WordLevel({f"t{i}": i for i in range(1000)}, unk_token="t0")
                        ),
                        eos_token="t2",
                    )
                    from tests.engine_helpers import run_many

                    jobs = [(p, None if k % 2 else adapter) for k, p in enumerate(PROMPTS * 2)]
                    native = Engine(
                        NativeLlamaRunner(Path(tmp), dtype=dtype, device=device, kv_cache_tokens=4096),
                        tok,
                        EngineConfig(mode="unmerged"),
                    )
                    ref_engine = Engine.for_hf_model(copy.deepcopy(hf), tok, EngineConfig(mode="unmerged"))
                    jobs_native = [
                        (p, None if a is None else load_adapter_dir(adapter_dir, "a", native.base_shapes))
                        for p, a in jobs
                    ]
                    same = [o.tokens for o in run_many(native, jobs_native, max_new_tokens=16)] == [
                        o.tokens for o in run_many(ref_engine, jobs_native, max_new_tokens=16)
                    ]
                    failures += not same
                    print(
                        f"{name:6s} float32   engine greedy tokens native == HF runner (mixed batch): {same}"
                    )
    print("ALL OK" if failures == 0 else f"{failures} FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
