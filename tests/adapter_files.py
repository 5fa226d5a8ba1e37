"""Adapter uploads built in memory for store and API tests: valid ones, broken ones, and archives.

Writing safetensors directly (instead of going through PEFT) is fast and lets a test break
exactly one thing (a shape, a dtype, a key) of an otherwise valid adapter.
"""

from __future__ import annotations

import gzip
import io
import json
import struct
import tarfile
import zipfile
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import nn

from adapters.peft_format import BaseLinearShape

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_MTIME = 1_700_000_000
_ZIP_TIME = (2024, 1, 1, 0, 0, 0)


def linear_shapes(model: nn.Module) -> dict[str, BaseLinearShape]:
    """The base model's LoRA-targetable linear layers (what the engine computes), without wrapping it."""
    head = model.get_output_embeddings()
    return {
        name: BaseLinearShape(out_features=m.out_features, in_features=m.in_features)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m is not head
    }


def adapter_tensors(
    model: nn.Module,
    *,
    seed: int = 0,
    r: int = 8,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    b: float = 0.5,
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in linear_shapes(model).items():
        if name.rsplit(".", 1)[-1] in targets:
            k, d = shape.in_features, shape.out_features
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, k, generator=g) / k**0.5
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(d, r, generator=g) * b
    return tensors


def adapter_config(
    *, r: int = 8, alpha: float = 16, targets: tuple[str, ...] = ("q_proj", "v_proj"), **extra: Any
):
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": list(targets),
        "bias": "none",
    }
    config.update(extra)
    return config


def make_adapter(
    model: nn.Module,
    *,
    seed: int = 0,
    r: int = 8,
    alpha: float = 16,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    **config_extra: Any,
) -> tuple[bytes, bytes]:
    """``(adapter_config.json bytes, adapter_model.safetensors bytes)`` of a valid random adapter."""
    config = adapter_config(r=r, alpha=alpha, targets=targets, **config_extra)
    return json.dumps(config).encode(), st_save(adapter_tensors(model, seed=seed, r=r, targets=targets))


def raw_safetensors(header: dict, body: bytes = b"") -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + body


# --------------------------------------------------------------------------- archives


def zip_bytes(members: dict[str, bytes], *, symlinks: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=_ZIP_TIME), data, zipfile.ZIP_DEFLATED)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = (0o120777 << 16) & 0xFFFF0000
            zf.writestr(info, target)
    return buf.getvalue()


def tar_bytes(
    members: dict[str, bytes],
    *,
    gz: bool = False,
    symlinks: dict[str, str] | None = None,
    hardlinks: dict[str, str] | None = None,
) -> bytes:
    buf = io.BytesIO()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), _MTIME
            tf.addfile(info, io.BytesIO(data))
        for kind, links in ((tarfile.SYMTYPE, symlinks or {}), (tarfile.LNKTYPE, hardlinks or {})):
            for name, target in links.items():
                info = tarfile.TarInfo(name)
                info.type, info.linkname = kind, target
                tf.addfile(info)
    if not gz:
        return raw.getvalue()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=_MTIME) as gzf:  # deterministic bytes
        gzf.write(raw.getvalue())
    return buf.getvalue()


def files_parts(
    config: bytes, weights: bytes, *, prefix: str = ""
) -> list[tuple[str, tuple[str, bytes, str]]]:
    """httpx ``files=`` for a two-part upload in field 'files'."""
    return [
        ("files", (prefix + CONFIG, config, "application/json")),
        ("files", (prefix + WEIGHTS, weights, "application/octet-stream")),
    ]
