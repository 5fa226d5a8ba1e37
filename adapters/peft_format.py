"""Parse and validate PEFT LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``).

Everything here treats the adapter as untrusted data: it never unpickles, never trusts a
shape or a count from the file without checking it against the base model, and every
refusal is an :class:`AdapterError` whose message says what is wrong and how to fix it.

The result, :class:`LoraAdapter`, holds per adapted module the factors of

    ΔW = scale · B @ A        A: [r, k]   B: [d, r]   scale = alpha / r  (alpha / √r with rsLoRA)

keyed by the module's name inside the base model (``model.layers.0.self_attn.q_proj``),
with ``r`` and ``alpha`` resolved per module from ``rank_pattern`` / ``alpha_pattern``.
A DoRA adapter (``use_dora``) also holds each module's magnitude m: [d]; its weight is then
W' = m ⊙ (W + ΔW) / ‖W + ΔW‖_row, which needs the base weight (``server/engine/dora.py``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import re
import struct
import sys
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from adapters.errors import AdapterError
from adapters.patterns import PatternError, compile_pattern

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHT_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")

# A safetensors header larger than this is refused before it is read (real adapter headers
# are a few hundred kB at most, even for thousands of tensors).
MAX_SAFETENSORS_HEADER_BYTES = 32 * 1024 * 1024
# Largest magnitude an adapter may bring (scale, factor entries, ΔW entries): float16's largest
# finite value, so every serving dtype (float16, bfloat16, float32) holds what the engine computes
# from it, and no engine step overflows on an adapter's numbers.
MAX_MAGNITUDE = 65504.0
# The rules on tensor values (every entry finite; factors, magnitudes and replacements within
# MAX_MAGNITUDE; the update scale·B@A bounded) as a number, recorded with each stored version
# (``AdapterRecord.checks``): a read of a version whose files match their recorded sha256 and that
# passed these rules when stored skips the scans (``build_adapter(check_values=False)``). Raise it
# when a value rule changes, so versions stored under the old rules are checked again on read.
VALUE_CHECKS = 1
SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
}
_KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>A|B)(?:\.[A-Za-z0-9_-]+)?\.weight$"
)
# DoRA's magnitude: PEFT saves ``<module>.lora_magnitude_vector`` (older versions with ``.weight``)
_MAGNITUDE_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_magnitude_vector(?:\.weight)?$")


@dataclass(frozen=True)
class BaseLinearShape:
    """A linear layer of the base model that LoRA may target: ``y = W x``, W: [out, in]; or
    (``kind``) the token embedding (out = hidden size, in = vocabulary) or the LM head (out =
    vocabulary, in = hidden size), which adapters change with LoRA or ``modules_to_save``."""

    out_features: int
    in_features: int
    fan_in_fan_out: bool = False  # GPT-2 style Conv1D stores W transposed: [in, out]
    kind: Literal["linear", "embedding", "head"] = "linear"


def linear_shapes(base_shapes: Mapping[str, BaseLinearShape]) -> dict[str, BaseLinearShape]:
    """The base's linear layers (what ``target_modules`` and ``all-linear`` select)."""
    return {m: s for m, s in base_shapes.items() if s.kind == "linear"}


@dataclass(frozen=True)
class LoraConfigSpec:
    """The parts of a PEFT ``LoraConfig`` that decide what the adapter computes."""

    r: int
    lora_alpha: float
    target_modules: list[str] | str
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | None = None
    layers_pattern: list[str] | None = None
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None
    use_dora: bool = False
    modules_to_save: list[str] | None = None

    def rank_for(self, module: str) -> int:
        return int(_pattern_value(self.rank_pattern, module, self.r))

    def alpha_for(self, module: str) -> float:
        return float(_pattern_value(self.alpha_pattern, module, self.lora_alpha))

    def scale_for(self, module: str) -> float:
        r, alpha = self.rank_for(module), self.alpha_for(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def saves(self, module: str) -> bool:
        """Whether ``modules_to_save`` names the module (PEFT: the name or its last parts)."""
        return any(module == m or module.endswith(f".{m}") for m in self.modules_to_save or [])

    def targets_vocab(self, module: str) -> bool:
        """LoRA on the embedding or the head: named in ``target_modules`` (``all-linear`` leaves them out)."""
        return self.target_modules != "all-linear" and self.targets(module)

    def targets(self, module: str) -> bool:
        """PEFT's ``check_target_module_exists`` semantics for one module name."""
        if isinstance(self.target_modules, str):
            if self.target_modules == "all-linear":
                return True
            return compile_pattern(self.target_modules).fullmatch(module) is not None
        if not (module in self.target_modules or any(module.endswith(f".{t}") for t in self.target_modules)):
            return False
        if not self.layers_to_transform:
            return True
        layer = _layer_index(module, self.layers_pattern)
        return layer is not None and layer in self.layers_to_transform

    def to_dict(self) -> dict[str, Any]:
        return {
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "target_modules": self.target_modules,
            "use_rslora": self.use_rslora,
            "rank_pattern": self.rank_pattern,
            "alpha_pattern": self.alpha_pattern,
            "layers_to_transform": self.layers_to_transform,
            "layers_pattern": self.layers_pattern,
            "fan_in_fan_out": self.fan_in_fan_out,
            "base_model_name_or_path": self.base_model_name_or_path,
            "use_dora": self.use_dora,
            "modules_to_save": self.modules_to_save,
        }


@dataclass(frozen=True)
class LoraLayerWeights:
    """One adapted module: ΔW = scale · B @ A; with DoRA (``magnitude`` set) the module's weight
    becomes W + weight · (W' − W), W' = m ⊙ (W + ΔW) / ‖W + ΔW‖_row."""

    A: torch.Tensor  # [r, k]
    B: torch.Tensor  # [d, r]
    scale: float
    magnitude: torch.Tensor | None = None  # [d] DoRA's m (lora_magnitude_vector); None: plain LoRA
    weight: float = 1.0  # DoRA only: the factor on the whole update W' − W (adapter_scale)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    def scaled(self, factor: float) -> LoraLayerWeights:
        """The update times ``factor``: plain LoRA scales ΔW (its ``scale``); DoRA scales W' − W
        (``weight``), since scaling ΔW inside the norm would change the direction, not the size."""
        if self.magnitude is None:
            return LoraLayerWeights(A=self.A, B=self.B, scale=self.scale * factor)
        return LoraLayerWeights(self.A, self.B, self.scale, self.magnitude, self.weight * factor)


@dataclass(frozen=True)
class VocabLayer:
    """An adapter's change to the token embedding or the LM head (``kind``), as PEFT trains it:
    a whole new matrix (``modules_to_save``) or LoRA on it. Served per row, never folded into the
    shared base (whose embedding may be tied to the head): ``server/engine/lora/vocab.py``.

        replacement    embedding: x = R[token]                head: logits = R h       R: [V, H]
        LoRA           embedding: x += s · B A[:, token]      head: logits += s · B (A h)
                       (A: [r, V], B: [H, r]: PEFT's lora_embedding_A/B;  head: A [r, H], B [V, r])
    """

    kind: Literal["embedding", "head"]
    replacement: torch.Tensor | None = None  # [V, H]
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    scale: float = 1.0
    weight: float = 1.0  # adapter_scale t: the row gets base + t · (adapted − base)

    @property
    def rank(self) -> int:
        return 0 if self.A is None else int(self.A.shape[0])

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.replacement, self.A, self.B) if t is not None]


@dataclass(frozen=True)
class LoraAdapter:
    adapter_id: str
    config: LoraConfigSpec
    layers: dict[str, LoraLayerWeights]  # module name in the base model -> factors
    version: str = "1"  # changes when the adapter is replaced (e.g. its sha256)
    vocab: dict[str, VocabLayer] = field(default_factory=dict)  # embedding / head module -> its change

    @property
    def key(self) -> str:
        """Identifies this version of the adapter in memory slots."""
        return f"{self.adapter_id}@{self.version}"

    @property
    def max_rank(self) -> int:
        return max([w.rank for w in self.layers.values()] + [v.rank for v in self.vocab.values()])

    @property
    def num_parameters(self) -> int:
        return sum(
            w.A.numel() + w.B.numel() + (0 if w.magnitude is None else w.magnitude.numel())
            for w in self.layers.values()
        ) + sum(t.numel() for v in self.vocab.values() for t in v.tensors())

    @property
    def is_dora(self) -> bool:
        return any(w.is_dora for w in self.layers.values())

    def scaled(self, factor: float) -> LoraAdapter:
        """The same factors with every scale times ``factor`` (ΔW → factor·ΔW), as its own version
        (``<version>*<factor>``), so it never shares a memory slot or a merge with the original."""
        if factor == 1.0:
            return self
        layers = {m: w.scaled(factor) for m, w in self.layers.items()}
        vocab = {m: dataclasses.replace(v, weight=v.weight * factor) for m, v in self.vocab.items()}
        return LoraAdapter(self.adapter_id, self.config, layers, f"{self.version}*{factor!r}", vocab)


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern that matches the end of the module name."""
    for key, value in patterns.items():
        if compile_pattern(rf"(.*\.)?({key})").fullmatch(module):
            return value
    return default


def _layers_regex(pattern: str) -> str:
    return rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."


def _layer_index(module: str, layers_pattern: list[str] | None) -> int | None:
    patterns = layers_pattern or [r"[^.]*"]
    for pattern in patterns:
        match = compile_pattern(_layers_regex(pattern)).match(module)
        if match:
            return int(match.group("idx"))
    return None


# --------------------------------------------------------------------------- config


def parse_adapter_config(raw: bytes | str | Mapping[str, Any]) -> LoraConfigSpec:
    """Validate ``adapter_config.json`` and keep what decides the computation."""
    if isinstance(raw, (bytes, str)):
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # deep nesting too
            raise AdapterError(
                f"{CONFIG_FILE} is not valid JSON ({_json_reason(exc)}); upload the file PEFT's save_pretrained wrote.",
                "invalid_config",
            ) from exc
    else:
        data = dict(raw)
    if not isinstance(data, dict):
        raise AdapterError(f"{CONFIG_FILE} must hold a JSON object.", "invalid_config")

    peft_type = str(data.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(
            f"peft_type is {data.get('peft_type')!r}; loraplex serves LoRA adapters only (peft_type 'LORA').",
            "unsupported",
        )
    missing = [k for k in ("r", "lora_alpha", "target_modules") if data.get(k) is None]
    if missing:
        raise AdapterError(
            f"{CONFIG_FILE} is missing {', '.join(missing)}; a PEFT LoraConfig always sets r, lora_alpha "
            "and target_modules.",
            "invalid_config",
        )
    _refuse_unsupported(data)

    r = data["r"]
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterError(f"r must be a positive integer, got {r!r}.", "invalid_config")
    alpha = data["lora_alpha"]
    if not _bounded_number(alpha):
        raise AdapterError(
            f"lora_alpha must be a number of magnitude at most {MAX_MAGNITUDE:g}, got {alpha!r}.",
            "invalid_config",
        )

    target = data["target_modules"]
    if isinstance(target, str):
        if target != "all-linear":
            _check_pattern("target_modules", target, target)
    elif isinstance(target, list) and target and all(isinstance(t, str) and t for t in target):
        target = sorted(set(target))
    else:
        raise AdapterError(
            "target_modules must be a non-empty list of module names, a regex string, or 'all-linear'.",
            "invalid_config",
        )

    rank_pattern = _number_map(data, "rank_pattern", integer=True)
    alpha_pattern = _number_map(data, "alpha_pattern", integer=False)
    layers = data.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and not (isinstance(layers, list) and all(isinstance(i, int) for i in layers)):
        raise AdapterError("layers_to_transform must be an integer or a list of integers.", "invalid_config")
    layers_pattern = data.get("layers_pattern")
    if isinstance(layers_pattern, str):
        layers_pattern = [layers_pattern]
    if layers_pattern is not None and not (
        isinstance(layers_pattern, list) and all(isinstance(p, str) for p in layers_pattern)
    ):
        raise AdapterError("layers_pattern must be a string or a list of strings.", "invalid_config")
    for key in (*rank_pattern, *alpha_pattern):
        _check_pattern("rank_pattern/alpha_pattern key", key, rf"(.*\.)?({key})")
    for pattern in layers_pattern or []:
        _check_pattern("layers_pattern", pattern, _layers_regex(pattern))

    return LoraConfigSpec(
        r=r,
        lora_alpha=float(alpha),
        target_modules=target,
        use_rslora=bool(data.get("use_rslora", False)),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        layers_to_transform=layers or None,
        layers_pattern=layers_pattern or None,
        fan_in_fan_out=bool(data.get("fan_in_fan_out", False)),
        base_model_name_or_path=data.get("base_model_name_or_path"),
        use_dora=bool(data.get("use_dora", False)),
        modules_to_save=_modules_to_save(data),
    )


def _modules_to_save(data: Mapping[str, Any]) -> list[str] | None:
    value = data.get("modules_to_save")
    if value is None or value == []:
        return None
    if not (isinstance(value, list) and all(isinstance(m, str) and m for m in value)):
        raise AdapterError("modules_to_save must be a list of module names.", "invalid_config")
    return sorted(set(value))


def _check_pattern(what: str, pattern: str, regex: str) -> None:
    """Refuse a config pattern RE2 cannot run (400-class error, never a 500 while matching)."""
    try:
        compile_pattern(regex)
    except PatternError as exc:
        raise AdapterError(
            f"{what} {pattern[:100]!r} is not a valid regular expression: {exc}.", "invalid_config"
        ) from None


def _json_reason(exc: Exception) -> str:
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc)


def _refuse_unsupported(data: Mapping[str, Any]) -> None:
    bias = data.get("bias", "none")
    if bias not in (None, "none"):
        raise AdapterError(
            f"bias={bias!r} is not supported (trained biases change the shared base); use bias='none'.",
            "unsupported",
        )
    for key in ("trainable_token_indices", "target_parameters"):
        if data.get(key):
            raise AdapterError(f"{key} is not supported; train a plain LoRA on linear layers.", "unsupported")


def _bounded_number(value: object) -> bool:
    """A JSON number (not a bool) that is finite as a float and within ``MAX_MAGNITUDE``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value)) and abs(float(value)) <= MAX_MAGNITUDE
    except OverflowError:  # an integer too large for a float
        return False


def _number_map(data: Mapping[str, Any], key: str, *, integer: bool) -> dict[str, Any]:
    value = data.get(key) or {}
    ok = isinstance(value, dict) and all(isinstance(k, str) and _bounded_number(v) for k, v in value.items())
    if ok and integer:
        ok = all(isinstance(v, int) and v >= 1 for v in value.values())
    if not ok:
        kind = "positive integers" if integer else f"numbers of magnitude at most {MAX_MAGNITUDE:g}"
        raise AdapterError(f"{key} must map module-name patterns to {kind}.", "invalid_config")
    return dict(value)


# --------------------------------------------------------------------------- safetensors


def check_safetensors_header(data: bytes | memoryview, size: int | None = None) -> dict[str, dict[str, Any]]:
    """Validate a safetensors blob's header without trusting it; return ``{name: info}``.

    Catches truncation, oversized or non-JSON headers, unknown dtypes and out-of-range offsets
    before the safetensors library sees the bytes. ``size``: the blob's size when ``data`` is
    only its start (at least the 8-byte length and the header; ``read_stored_safetensors``).
    """
    size = len(data) if size is None else size
    if size < 8:
        raise AdapterError(
            f"{WEIGHTS_FILE} is truncated ({size} bytes); re-upload the file.", "invalid_weights"
        )
    (header_len,) = struct.unpack("<Q", bytes(data[:8]))
    if header_len > MAX_SAFETENSORS_HEADER_BYTES:
        raise AdapterError(
            f"{WEIGHTS_FILE} declares a {header_len}-byte header (limit {MAX_SAFETENSORS_HEADER_BYTES}); "
            "the file is corrupt or not safetensors.",
            "invalid_weights",
        )
    if 8 + header_len > size:
        raise AdapterError(
            f"{WEIGHTS_FILE} is truncated: its header needs {header_len} bytes but the file has {size - 8}.",
            "invalid_weights",
        )
    try:
        header = json.loads(bytes(data[8 : 8 + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # deep nesting too
        raise AdapterError(
            f"{WEIGHTS_FILE} has a header that is not JSON: {_json_reason(exc)}.", "invalid_weights"
        ) from exc
    if not isinstance(header, dict):
        raise AdapterError(f"{WEIGHTS_FILE} header must be a JSON object.", "invalid_weights")
    body = size - 8 - header_len
    tensors: dict[str, dict[str, Any]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise AdapterError(
                f"{WEIGHTS_FILE}: tensor {name!r} has a malformed header entry.", "invalid_weights"
            )
        dtype = info["dtype"]
        if dtype not in SAFETENSORS_DTYPES:
            raise AdapterError(
                f"{WEIGHTS_FILE}: tensor {name!r} has dtype {dtype!r}; LoRA weights must be one of "
                f"{', '.join(SAFETENSORS_DTYPES)}.",
                "invalid_weights",
            )
        shape, offsets = info["shape"], info["data_offsets"]
        valid = (
            isinstance(shape, list)
            and all(isinstance(s, int) and s >= 0 for s in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
        )
        if not valid:
            raise AdapterError(
                f"{WEIGHTS_FILE}: tensor {name!r} has a malformed header entry.", "invalid_weights"
            )
        start, end = offsets
        expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype][1]
        if not (0 <= start <= end <= body) or end - start != expected:
            raise AdapterError(
                f"{WEIGHTS_FILE}: tensor {name!r} points outside the file or has the wrong byte size; "
                "the file is truncated or corrupt.",
                "invalid_weights",
            )
        tensors[name] = info
    return tensors


def load_safetensors_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """Parse a checked safetensors blob into float32 tensors (copies; no file handle kept)."""
    from safetensors.torch import load as st_load

    check_safetensors_header(data)
    try:
        raw = st_load(data)
    except Exception as exc:  # the library's own parse errors, after our checks
        raise AdapterError(f"{WEIGHTS_FILE} could not be read: {exc}.", "invalid_weights") from exc
    return {name: t.to(torch.float32) for name, t in raw.items()}


def load_stored_safetensors(data: bytes) -> dict[str, torch.Tensor]:
    """:func:`load_safetensors_bytes` for a blob that passed it before (a stored version, whose
    sha256 the caller checks before using the result): each tensor is read in place from ``data``
    and cast to float32 in one pass (one copy per tensor; the library's parse copies every tensor,
    then the cast copies it again). The header is still checked here (offsets inside the blob), so a
    corrupt blob is refused, not read out of bounds. Returns tensors that own their memory."""
    if sys.byteorder != "little":  # pragma: no cover (safetensors is little-endian, as torch reads it here)
        return load_safetensors_bytes(data)
    entries = check_safetensors_header(data)
    (header_len,) = struct.unpack("<Q", bytes(data[:8]))
    body = 8 + header_len
    view = memoryview(data)
    tensors: dict[str, torch.Tensor] = {}
    for name, info in entries.items():
        dtype, size = SAFETENSORS_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        chunk = view[body + start : body + end]
        if (body + start) % size:  # not aligned to its element size: read from an aligned copy
            chunk = memoryview(bytearray(chunk))
        shape = info["shape"]
        if end == start:
            tensors[name] = torch.zeros(shape, dtype=torch.float32)
            continue
        with warnings.catch_warnings():  # read-only bytes: the view is only read, then copied
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(chunk, dtype=dtype)  # a view of data: [n]
        tensors[name] = _cast_on_this_thread(flat).view(shape)  # owns its memory
    return tensors


# PyTorch's parallel grain (at::internal::GRAIN_SIZE): an elementwise op on fewer elements runs on
# the calling thread alone, without an OpenMP region
_SERIAL_ELEMENTS = 32768


def _cast_on_this_thread(flat: torch.Tensor) -> torch.Tensor:
    """``flat`` ([n]) as a new float32 tensor, copied in pieces below PyTorch's parallel grain.

    A cold read casts while the file's sha256 runs on another thread, often beside other processes
    on few cores: one copy per tensor opens an OpenMP region whose threads wait on each other there
    (a rank-64 q/k/v/o adapter's cast took 4-200 ms beside the hash on 2 loaded cores, in pieces
    5-29 ms). The values are the same: the same conversion, element by element."""
    out = torch.empty(flat.numel(), dtype=torch.float32)
    for start in range(0, flat.numel(), _SERIAL_ELEMENTS):
        out[start : start + _SERIAL_ELEMENTS].copy_(flat[start : start + _SERIAL_ELEMENTS])
    return out


def _cast_into(out: torch.Tensor, flat: torch.Tensor) -> None:
    """Copy ``flat`` ([n], any float dtype) into ``out`` ([n] float32) in pieces below the parallel grain."""
    for start in range(0, flat.numel(), _SERIAL_ELEMENTS):
        out[start : start + _SERIAL_ELEMENTS].copy_(flat[start : start + _SERIAL_ELEMENTS])


_READ_CHUNK = 1 << 20  # bytes read at a time by read_stored_safetensors (a multiple of every element size)
_chunks = threading.local()


def _chunk() -> memoryview:
    """This thread's read buffer (kept: a fresh one per read would page-fault it in every time)."""
    buffer = getattr(_chunks, "buffer", None)
    if buffer is None:
        buffer = _chunks.buffer = memoryview(bytearray(_READ_CHUNK))
    return buffer


def _pread_exactly(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        read = os.preadv(fd, [view[done:]], offset + done)
        if read <= 0:
            raise AdapterError(f"{WEIGHTS_FILE} is truncated (it ended while being read).", "invalid_weights")
        done += read


def read_stored_safetensors(
    fd: int, size: int, *, helper: concurrent.futures.Executor | None = None
) -> dict[str, torch.Tensor]:
    """:func:`load_stored_safetensors` straight from an open file of ``size`` bytes: the header is
    checked the same way, then each tensor is read with ``pread`` through a small per-thread buffer
    and cast into its float32 tensor, so the file is never copied whole into memory (on a cold read
    that copy page-faulted in a fresh buffer as large as the file: 3,600 faults for a rank-64 q/k/v/o
    adapter, about as long as the cast). With ``helper``, the tensors holding about half the bytes are
    read and cast on its thread beside the caller's. For files whose bytes were checked before (a
    stored version; ``AdapterStore`` makes sure they did not change since): values are not scanned."""
    if sys.byteorder != "little":  # pragma: no cover (safetensors is little-endian, as torch reads it here)
        data = bytearray(size)
        _pread_exactly(fd, memoryview(data), 0)
        return load_safetensors_bytes(bytes(data))
    head = bytearray(min(8, size))
    _pread_exactly(fd, memoryview(head), 0)
    header_len = struct.unpack("<Q", bytes(head))[0] if len(head) == 8 else 0
    if size >= 8 and header_len <= MAX_SAFETENSORS_HEADER_BYTES and 8 + header_len <= size:
        head += bytearray(header_len)
        _pread_exactly(fd, memoryview(head)[8:], 8)
    entries = check_safetensors_header(head, size)  # raises on what the reads above refused to read
    body = 8 + header_len
    tensors = {name: torch.empty(info["shape"], dtype=torch.float32) for name, info in entries.items()}
    order = sorted(entries, key=lambda name: entries[name]["data_offsets"][0])
    total = sum(entries[n]["data_offsets"][1] - entries[n]["data_offsets"][0] for n in order)
    mine, theirs, seen = [], [], 0
    for name in order:
        start, end = entries[name]["data_offsets"]
        (mine if helper is None or seen < total / 2 else theirs).append(name)
        seen += end - start

    def fill(names: list[str]) -> None:
        chunk = _chunk()
        for name in names:
            dtype = SAFETENSORS_DTYPES[entries[name]["dtype"]][0]
            start, end = entries[name]["data_offsets"]
            out = tensors[name].view(-1)
            if end == start:
                out.zero_()
                continue
            at = 0
            for offset in range(start, end, _READ_CHUNK):
                piece = chunk[: min(_READ_CHUNK, end - offset)]
                _pread_exactly(fd, piece, body + offset)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    flat = torch.frombuffer(piece, dtype=dtype)
                _cast_into(out[at : at + flat.numel()], flat)
                at += flat.numel()

    other = helper.submit(fill, theirs) if helper is not None and theirs else None
    try:
        fill(mine)
    finally:
        if other is not None:
            other.result()  # raises what its half raised
    return tensors


# --------------------------------------------------------------------------- building


def build_adapter(
    adapter_id: str,
    config: LoraConfigSpec,
    tensors: Mapping[str, torch.Tensor],
    base_shapes: Mapping[str, BaseLinearShape],
    *,
    max_rank: int = 256,
    version: str = "1",
    check_values: bool = True,
) -> LoraAdapter:
    """Match the tensors to the base model's linear layers (and its token embedding and LM head)
    and check every shape.

    ``base_shapes`` lists the linear layers of the base model LoRA may target, by module name,
    and (``kind``) the embedding and the head when the runner serves adapters of those.
    ``check_values=False`` skips the scans of the values (:data:`VALUE_CHECKS`), for tensors known
    to have passed them: a stored version whose files match the sha256 recorded when it was
    checked (``AdapterStore``). Every structural check (names, shapes, ranks, targets) still runs.
    """
    tensors, vocab = _vocab_layers(tensors, config, base_shapes, max_rank, check_values)
    pairs, magnitudes = _pair_tensors(tensors)
    stray = sorted(set(magnitudes) - set(pairs))
    if stray:
        raise AdapterError(
            f"tensor '{stray[0]}.lora_magnitude_vector' has no lora_A/lora_B beside it; "
            "a DoRA magnitude belongs to a LoRA-adapted module.",
            "invalid_weights",
        )
    linear = linear_shapes(base_shapes)
    targeted = [m for m in linear if config.targets(m)]
    if not targeted and not vocab:
        raise AdapterError(no_match_message(config, linear, list(pairs)), "incompatible")
    layers: dict[str, LoraLayerWeights] = {}
    for module in sorted(pairs):
        A, B = pairs[module]
        shape = base_shapes.get(module)
        if shape is None or shape.kind == "embedding":
            raise AdapterError(
                f"the adapter has weights for module {module!r}, which the base model does not have as a "
                f"linear layer (it has e.g. {_examples(linear)}); was it trained for another base model?",
                "incompatible",
            )
        if not (config.targets_vocab(module) if shape.kind == "head" else config.targets(module)):
            raise AdapterError(
                f"tensors for module {module!r} match no entry of target_modules={config.target_modules!r}; "
                "the config and the weights disagree.",
                "incompatible",
            )
        layer = _check_layer(module, A, B, config, shape, max_rank, check_values)
        if shape.kind == "head":
            _no_vocab_dora(module, config, module in magnitudes)
            _one_change(module, vocab)
            vocab[module] = VocabLayer("head", A=layer.A, B=layer.B, scale=layer.scale)
            continue
        magnitude = _check_magnitude(module, magnitudes.get(module), config, shape, check_values)
        layers[module] = dataclasses.replace(layer, magnitude=magnitude)

    if not layers and not vocab:
        raise AdapterError(
            f"{WEIGHTS_FILE} holds no LoRA weights (keys like '<module>.lora_A.weight'); "
            "save the adapter with PEFT's save_pretrained.",
            "invalid_weights",
        )
    missing = [m for m in targeted if m not in layers]
    missing += [
        m for m, s in base_shapes.items() if s.kind != "linear" and config.targets_vocab(m) and m not in vocab
    ]
    if missing:
        raise AdapterError(
            f"target_modules selects {len(targeted)} modules but {len(missing)} have no weights, "
            f"first {missing[0]!r} (expected '{missing[0]}.lora_A.weight' and '.lora_B.weight').",
            "incompatible",
        )
    return LoraAdapter(adapter_id=adapter_id, config=config, layers=layers, version=version, vocab=vocab)


_EMBED_LORA_RE = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_embedding_(?P<which>A|B)(?:\.[A-Za-z0-9_-]+)?$"
)
# a whole weight: modules_to_save (PEFT strips ``modules_to_save.<name>``), or ``base_layer`` (a copy
# of the base's own embedding or head, saved beside embedding LoRA: ``save_embedding_layers``)
_WHOLE_RE = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)(?P<base>\.base_layer)?(?:\.modules_to_save\.[A-Za-z0-9_-]+)?\.weight$"
)


def _vocab_layers(
    tensors: Mapping[str, torch.Tensor],
    config: LoraConfigSpec,
    base_shapes: Mapping[str, BaseLinearShape],
    max_rank: int,
    check_values: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, VocabLayer]]:
    """Take out the embedding's and the head's tensors: modules_to_save replacements and embedding
    LoRA (head LoRA is paired with the linear layers). Returns the other tensors and the changes."""
    vocab_shapes = {m: s for m, s in base_shapes.items() if s.kind != "linear"}
    for entry in config.modules_to_save or []:
        if not any(m == entry or m.endswith(f".{entry}") for m in vocab_shapes):
            names = ", ".join(sorted(vocab_shapes)) or "none with this runner"
            raise AdapterError(
                f"modules_to_save names {entry!r}, which is not the base's token embedding or LM head "
                f"({names}): loraplex gives a request its adapter's own embedding and head, but any other "
                f"whole module would change the base every request shares. Train without {entry!r} in "
                "modules_to_save (LoRA on it is served).",
                "unsupported",
            )
    rest: dict[str, torch.Tensor] = {}
    embedding_lora: dict[str, dict[str, torch.Tensor]] = {}
    vocab: dict[str, VocabLayer] = {}
    for key, tensor in tensors.items():
        lora = _EMBED_LORA_RE.match(key)
        whole = None if "lora_" in key else _WHOLE_RE.match(key)
        if lora is not None and lora["module"] in vocab_shapes:
            embedding_lora.setdefault(lora["module"], {})[lora["which"]] = tensor
        elif whole is not None and whole["module"] in vocab_shapes:
            if whole["base"] is None:  # base_layer: the base's own weights, which the base serves
                vocab[whole["module"]] = _replacement(
                    whole["module"], tensor, config, vocab_shapes[whole["module"]], check_values
                )
        else:
            rest[key] = tensor
    for module in vocab_shapes:
        if config.saves(module) and module not in vocab:
            raise AdapterError(
                f"modules_to_save names {module!r} but {WEIGHTS_FILE} has no '{module}.weight' tensor; "
                "save the adapter with PEFT's save_pretrained.",
                "invalid_weights",
            )
    for module, parts in embedding_lora.items():
        shape = vocab_shapes[module]
        if shape.kind != "embedding" or not config.targets_vocab(module):
            raise AdapterError(
                f"tensor '{module}.lora_embedding_A' is an embedding LoRA, but {module!r} is not the base's "
                "token embedding or target_modules does not name it; the config and the weights disagree.",
                "incompatible",
            )
        if set(parts) != {"A", "B"}:
            lacking = "lora_embedding_B" if "A" in parts else "lora_embedding_A"
            raise AdapterError(f"module {module!r} has no {lacking} tensor.", "invalid_weights")
        _no_vocab_dora(module, config, False)
        _one_change(module, vocab)
        layer = _check_layer(module, parts["A"], parts["B"], config, shape, max_rank, check_values)
        vocab[module] = VocabLayer("embedding", A=layer.A, B=layer.B, scale=layer.scale)
    return rest, vocab


def _replacement(
    module: str,
    tensor: torch.Tensor,
    config: LoraConfigSpec,
    shape: BaseLinearShape,
    check_values: bool = True,
) -> VocabLayer:
    """A modules_to_save matrix for the embedding or the head: [V, H], as the base's."""
    if not config.saves(module):
        raise AdapterError(
            f"tensor '{module}.weight' replaces the whole {module!r} but modules_to_save does not name it; "
            "the config and the weights disagree.",
            "incompatible",
        )
    kind: Literal["embedding", "head"] = "embedding" if shape.kind == "embedding" else "head"
    want = (
        (shape.in_features, shape.out_features)
        if kind == "embedding"
        else (shape.out_features, shape.in_features)
    )
    if tuple(tensor.shape) != want:
        raise AdapterError(
            f"tensor '{module}.weight' (modules_to_save) has shape {list(tensor.shape)} but the base's needs "
            f"{list(want)} (vocabulary, hidden size); an adapter trained after adding tokens needs a base "
            "and tokenizer with the same vocabulary.",
            "incompatible",
        )
    if check_values and not _bounded(tensor):
        raise AdapterError(
            f"tensor '{module}.weight' contains NaN, Inf or values above {MAX_MAGNITUDE:g}.",
            "invalid_weights",
        )
    return VocabLayer(kind, replacement=tensor.contiguous())


def _no_vocab_dora(module: str, config: LoraConfigSpec, has_magnitude: bool) -> None:
    if config.use_dora or has_magnitude:
        raise AdapterError(
            f"DoRA on {module!r} (the token embedding or the LM head) is not supported; DoRA is served on "
            "linear layers. Train with the embedding and head outside target_modules, or without use_dora.",
            "unsupported",
        )


def _one_change(module: str, vocab: Mapping[str, VocabLayer]) -> None:
    if module in vocab:
        raise AdapterError(
            f"module {module!r} is both in modules_to_save and adapted by LoRA; keep one of the two.",
            "incompatible",
        )


def no_match_message(
    config: LoraConfigSpec, base_shapes: Mapping[str, BaseLinearShape], weight_modules: list[str]
) -> str:
    """Why an adapter whose target modules match no module of the base is refused, naming them.

    PEFT refuses the same adapter ("Target modules ... not found in the base model"); serving it
    would silently give the base model's outputs.
    """
    types = sorted({m.rsplit(".", 1)[-1] for m in base_shapes})
    targets = config.target_modules
    if isinstance(targets, str):
        wanted = targets[:200]
    else:  # every entry matched nothing: name them (the first 20 of a long list)
        wanted = ", ".join(targets[:20]) + (f" and {len(targets) - 20} more" if len(targets) > 20 else "")
    message = (
        f"target_modules ({wanted}) match no module of the base model, so the adapter would change nothing. "
        f"The base's adaptable modules are {', '.join(types)} (named like {_examples(base_shapes)})"
    )
    if weight_modules:
        shown = ", ".join(repr(m) for m in sorted(weight_modules)[:3])
        message += f"; the adapter's weights are for {shown}{', ...' if len(weight_modules) > 3 else ''}"
    return message + ". Was it trained for another base model (or with other module names)?"


def _pair_tensors(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """The LoRA factors (A, B) by module, and DoRA's magnitude vectors by module."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    magnitudes: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if "lora_embedding_" in key:
            raise AdapterError(
                f"tensor {key!r} is an embedding LoRA; LoRA on embedding layers is not supported yet.",
                "unsupported",
            )
        magnitude = _MAGNITUDE_RE.match(key)
        if magnitude is not None:
            magnitudes[magnitude["module"]] = tensor
            continue
        match = _KEY_RE.match(key)
        if match is None:
            raise AdapterError(
                f"tensor {key!r} is not a LoRA weight (expected '<module>.lora_A.weight' or "
                "'<module>.lora_B.weight'); biases and other extra tensors are not supported.",
                "invalid_weights",
            )
        found.setdefault(match["module"], {})[match["which"]] = tensor
    pairs = {}
    for module, parts in found.items():
        if set(parts) != {"A", "B"}:
            lacking = "lora_B" if "A" in parts else "lora_A"
            raise AdapterError(f"module {module!r} has no {lacking}.weight tensor.", "invalid_weights")
        pairs[module] = (parts["A"], parts["B"])
    return pairs, magnitudes


def _check_magnitude(
    module: str,
    magnitude: torch.Tensor | None,
    config: LoraConfigSpec,
    base: BaseLinearShape,
    check_values: bool = True,
) -> torch.Tensor | None:
    """DoRA's m for one module: [out_features], finite and bounded; required iff ``use_dora``."""
    if not config.use_dora:
        if magnitude is not None:
            raise AdapterError(
                f"tensor '{module}.lora_magnitude_vector' is a DoRA magnitude but {CONFIG_FILE} has no "
                "use_dora=true; the config and the weights disagree.",
                "incompatible",
            )
        return None
    if magnitude is None:
        raise AdapterError(
            f"the adapter is DoRA (use_dora=true) but module {module!r} has no "
            f"'{module}.lora_magnitude_vector' tensor; save it with PEFT's save_pretrained.",
            "invalid_weights",
        )
    if tuple(magnitude.shape) != (base.out_features,):
        raise AdapterError(
            f"tensor '{module}.lora_magnitude_vector' has shape {list(magnitude.shape)} but the base layer "
            f"(out={base.out_features}) needs [{base.out_features}]; was it trained for another base model?",
            "incompatible",
        )
    if check_values and not _bounded(magnitude):
        raise AdapterError(
            f"tensor '{module}.lora_magnitude_vector' contains NaN, Inf or values above {MAX_MAGNITUDE:g}.",
            "invalid_weights",
        )
    return magnitude.contiguous()


def _check_layer(
    module: str,
    A: torch.Tensor,
    B: torch.Tensor,
    config: LoraConfigSpec,
    base: BaseLinearShape,
    max_rank: int,
    check_values: bool = True,
) -> LoraLayerWeights:
    r = config.rank_for(module)
    if r > max_rank:
        raise AdapterError(
            f"module {module!r} has rank {r}, above the server's limit of {max_rank} "
            "(raise --max-rank, or shrink the adapter).",
            "rank_too_large",
        )
    want_a, want_b = (r, base.in_features), (base.out_features, r)
    peaks: list[float] = []  # max |entry| of A and of B
    for name, tensor, want in (("lora_A", A, want_a), ("lora_B", B, want_b)):
        if tuple(tensor.shape) != want:
            raise AdapterError(
                f"tensor '{module}.{name}.weight' has shape {list(tensor.shape)} but the base layer "
                f"(in={base.in_features}, out={base.out_features}, r={r}) needs {list(want)}; "
                "the adapter was trained for another base model or with another rank.",
                "incompatible",
            )
        if not check_values:
            continue
        # one pass and no temporary (the inf-norm is the max of |entries|, NaN or Inf when one
        # is): cold loads parse on the request's path; this was isfinite, all and max, then abs, max
        peak = float(torch.linalg.vector_norm(tensor, float("inf"))) if tensor.numel() else 0.0
        if not math.isfinite(peak):
            raise AdapterError(
                f"tensor '{module}.{name}.weight' contains NaN or Inf values.", "invalid_weights"
            )
        peaks.append(peak)
    scale = config.scale_for(module)
    if not check_values:  # checked when stored (VALUE_CHECKS), with this config (its sha256 matched)
        return LoraLayerWeights(A=A.contiguous(), B=B.contiguous(), scale=scale)
    # bound on |ΔW| entries: |scale| · r · max|B| · max|A| (each entry sums r products)
    largest = peaks[0] * peaks[1] * r
    if not (math.isfinite(scale) and abs(scale) <= MAX_MAGNITUDE and abs(scale) * largest <= MAX_MAGNITUDE):
        raise AdapterError(
            f"module {module!r}: its scale ({scale:g}, lora_alpha/r) or its weights are too large: the update "
            f"scale·B@A could exceed {MAX_MAGNITUDE:g}, which the serving dtype cannot hold; check lora_alpha, "
            "alpha_pattern and the factors.",
            "invalid_weights",
        )
    return LoraLayerWeights(A=A.contiguous(), B=B.contiguous(), scale=scale)


def _bounded(tensor: torch.Tensor) -> bool:
    """Every entry finite and of magnitude at most ``MAX_MAGNITUDE`` (one pass: the inf-norm is NaN
    or Inf when an entry is)."""
    if not tensor.numel():
        return True
    peak = float(torch.linalg.vector_norm(tensor, float("inf")))
    return math.isfinite(peak) and peak <= MAX_MAGNITUDE


def _examples(base_shapes: Mapping[str, BaseLinearShape]) -> str:
    names = list(base_shapes)[:3]
    return ", ".join(repr(n) for n in names) + (", ..." if len(base_shapes) > 3 else "")


def load_adapter_dir(
    path: str | Path,
    adapter_id: str,
    base_shapes: Mapping[str, BaseLinearShape],
    *,
    max_rank: int = 256,
) -> LoraAdapter:
    """Load a PEFT adapter directory from disk (``--adapter ID=PATH``)."""
    directory = Path(path)
    if not directory.is_dir():
        raise AdapterError(f"adapter path {str(directory)!r} is not a directory.", "not_found")
    config_path = directory / CONFIG_FILE
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        pickled = [n for n in PICKLE_WEIGHT_FILES if (directory / n).exists()]
        if pickled:
            raise AdapterError(
                f"{pickled[0]} is a pickle file, which loraplex never loads (it can run code); convert it with "
                "`safetensors.torch.save_file(torch.load(path), 'adapter_model.safetensors')` on a trusted "
                "machine.",
                "pickle_refused",
            )
        raise AdapterError(f"{directory} has no {WEIGHTS_FILE}.", "missing_file")
    if not config_path.is_file():
        raise AdapterError(f"{directory} has no {CONFIG_FILE}.", "missing_file")
    config = parse_adapter_config(config_path.read_bytes())
    tensors = load_safetensors_bytes(weights_path.read_bytes())
    return build_adapter(adapter_id, config, tensors, base_shapes, max_rank=max_rank)
