"""Random but valid PEFT LoRA adapters, for tests and benchmarks (needs ``peft``, a test dependency)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch


def make_random_peft_adapter(
    base: torch.nn.Module,
    out_dir: Path,
    *,
    seed: int,
    b_scale: float = 0.5,
    magnitude_noise: float = 0.3,
    **lora_kwargs: Any,
) -> torch.nn.Module:
    """Save a PEFT LoRA adapter with random A and B to ``out_dir``; return the PEFT model.

    PEFT initialises B to zero (the adapter would change nothing); here both factors are random,
    B scaled by ``b_scale``, so the adapter visibly changes the outputs. A DoRA adapter
    (``use_dora=True``) also has its magnitudes m times ``1 + magnitude_noise · N(0, 1)`` (PEFT
    starts them at ‖W + s·B·A‖, where they would change only the LoRA term's scale).
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(init_lora_weights=False, **lora_kwargs)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(b_scale)
            if "lora_magnitude_vector" in name:
                param.mul_(1 + magnitude_noise * torch.randn_like(param))
    peft_model.eval()
    peft_model.save_pretrained(out_dir)
    return peft_model
