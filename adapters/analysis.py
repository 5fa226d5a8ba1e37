"""Adapter-level spectral analysis: run the §5 diagnostics over every layer, compare, shrink.

No HTTP and no engine here: callers pass the base weights as a function ``module -> W [out, in]``
(the server passes ``engine.base_weights().weight``, the CLI the weights of a model it loaded).
The per-layer math lives in :mod:`adapters.spectral` and :mod:`adapters.shrink`; this module
orchestrates it and keeps two caches:

- :class:`BaseStatsCache`: σ_max(W), ‖W‖_F and the top left singular vectors of each base weight,
  computed once per base model and kept on disk (``<cache_dir>/analysis/``), keyed by the base
  model's name and a digest of its weights, so a different base (or a different checkpoint under
  the same name) never reuses stale numbers;
- :class:`AnalysisMemo`: finished analyses in memory, keyed by ``adapter.key`` (``id@version``),
  so a replaced or deleted adapter's analysis is never served again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from adapters.archive import AdapterFiles
from adapters.patterns import PatternError, compile_pattern
from adapters.peft_format import LoraAdapter, LoraConfigSpec
from adapters.shrink import ShrunkLayer, shrink_layer
from adapters.spectral import (
    RANK_METHODS,
    BaseLayerStats,
    LowRankFactors,
    base_layer_stats,
    delta_svd,
    layer_diagnostics,
    rank_for_method,
    subspace_similarity,
    summarize,
)

log = logging.getLogger(__name__)

WeightFn = Callable[[str], torch.Tensor]  # module name -> base weight W: [out, in], CPU
BASE_TOP_K = 64  # left singular vectors of W kept per layer (enough for base_alignment up to r = 64)
_CACHE_FORMAT = 1  # bump when BaseLayerStats or how it is computed changes


# --------------------------------------------------------------------------- module names


def natural_key(module: str) -> tuple:
    """Sort key putting ``layers.2`` before ``layers.10``."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", module))


def module_type(module: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``q_proj``."""
    return module.rsplit(".", 1)[-1]


def layer_index(module: str) -> int | None:
    """The first number in the dotted name (the transformer block), None when there is none."""
    for part in module.split("."):
        if part.isdigit():
            return int(part)
    return None


def compile_layer_filter(pattern: str | None) -> Any:
    """The ``layers=REGEX`` filter (searched in module names, on RE2: linear time, see
    ``adapters.patterns``); ValueError saying why it is bad."""
    if pattern is None or pattern == "":
        return None
    try:
        return compile_pattern(pattern)
    except PatternError as exc:
        raise ValueError(
            f"layers={pattern[:100]!r} is not a valid regular expression ({exc}); it is searched in module "
            r"names, e.g. layers=q_proj or layers=layers\.1[0-9]\."
        ) from exc


def _selected(modules: Iterable[str], pattern: Any) -> list[str]:
    return sorted((m for m in modules if pattern is None or pattern.search(m)), key=natural_key)


# --------------------------------------------------------------------------- base-weight cache


def weights_digest(named_weights: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over (name, bytes) of each weight in name order, as ``MergeManager.digest`` computes it.

    Pass the stored weights (Conv1D layers untransposed) of every LoRA-targetable layer: the CLI
    then finds the cache file a server on the same model built, and vice versa.
    """
    h = hashlib.sha256()
    for name, weight in sorted(named_weights, key=lambda nw: nw[0]):
        h.update(name.encode())
        h.update(weight.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class BaseStatsCache:
    """:class:`BaseLayerStats` per base layer, computed on first use and persisted with torch.save.

    One file per base model: ``<dir>/base-<name>-<digest[:16]>.pt`` holding
    ``{"format", "base", "digest", "layers": {module: BaseLayerStats.to_dict()}}`` (tensors, floats
    and strings only, so it loads with ``weights_only=True``). Layers are added as adapters need
    them; :meth:`flush` rewrites the file atomically when something was added. Thread-safe.
    """

    def __init__(self, directory: Path | None, base_name: str, digest: str, top_k: int = BASE_TOP_K) -> None:
        safe_name = re.sub(r"[^A-Za-z0-9._-]+", "-", base_name).strip("-.") or "base"
        self.path = directory / f"base-{safe_name}-{digest[:16]}.pt" if directory is not None else None
        self.base_name, self.digest, self.top_k = base_name, digest, top_k
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._layers: dict[str, BaseLayerStats] = self._read()
        self._dirty = False
        self.computed = 0  # layers computed by this process (not read from disk)

    def _read(self) -> dict[str, BaseLayerStats]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = torch.load(self.path, weights_only=True)
            if data.get("format") != _CACHE_FORMAT or data.get("digest") != self.digest:
                return {}
            return {m: BaseLayerStats.from_dict(d) for m, d in data["layers"].items()}
        except Exception:  # a corrupt or foreign file is only a cache: rebuild it
            return {}

    def __len__(self) -> int:
        return len(self._layers)

    def get(self, module: str, W: torch.Tensor, min_vectors: int = 1) -> BaseLayerStats:
        """Stats of base layer ``module`` (weight ``W``: [d, k]) with at least ``min_vectors`` top vectors."""
        want = min(max(self.top_k, min_vectors), *W.shape)
        with self._lock:
            stats = self._layers.get(module)
            if (
                stats is not None
                and stats.top_left.shape[0] == W.shape[0]
                and stats.top_left.shape[1] >= want
            ):
                return stats
        stats = base_layer_stats(W, top_k=want)  # outside the lock: other layers may proceed
        with self._lock:
            self._layers[module] = stats
            self._dirty = True
            self.computed += 1
        return stats

    def flush(self) -> None:
        """Write the cache file if layers were added since the last write (atomic rename).

        A cache dir that cannot be written only costs the recomputation next time: logged, not raised.
        """
        with self._flush_lock:  # one writer at a time, so an older snapshot never replaces a newer one
            with self._lock:
                if not self._dirty or self.path is None:
                    return
                payload = {
                    "format": _CACHE_FORMAT,
                    "base": self.base_name,
                    "digest": self.digest,
                    "layers": {m: s.to_dict() for m, s in self._layers.items()},
                }
                self._dirty = False
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=".base-", suffix=".tmp", dir=self.path.parent)
                try:
                    with os.fdopen(fd, "wb") as handle:
                        torch.save(payload, handle)
                    os.replace(tmp, self.path)
                finally:
                    Path(tmp).unlink(missing_ok=True)
            except OSError as exc:
                log.warning(
                    "could not write the base-weight cache %s (%s); it will be recomputed", self.path, exc
                )


# --------------------------------------------------------------------------- analysis


def _factors(adapter: LoraAdapter, module: str) -> LowRankFactors:
    w = adapter.layers[module]
    return LowRankFactors(A=w.A, B=w.B, scale=w.scale)  # A: [r, k], B: [d, r]


def analyze(
    adapter: LoraAdapter,
    base_weight: WeightFn,
    base_cache: BaseStatsCache,
    layers: Any = None,
) -> dict[str, Any]:
    """The ``GET /adapters/{id}/analysis`` document: adapter_id, rank, lora_alpha, summary, layers.

    ``layers`` (a regex searched in module names, on RE2) restricts both the per-layer list and
    the summary. Layers come in model order (layer index, then module name).
    """
    pattern = compile_layer_filter(layers) if isinstance(layers, str) or layers is None else layers
    rows = []
    for module in _selected(adapter.layers, pattern):
        f = _factors(adapter, module)
        W = base_weight(module)  # [d, k]
        svd = delta_svd(f)
        base = base_cache.get(module, W, min_vectors=svd.rank)
        rows.append(layer_diagnostics(module, f, W, base, svd=svd))
    base_cache.flush()
    return analysis_document(adapter, rows)


def analysis_document(adapter: LoraAdapter, rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "adapter_id": adapter.adapter_id,
        "rank": adapter.max_rank,
        "lora_alpha": adapter.config.lora_alpha,
        "summary": summarize(rows),
        "layers": rows,
    }


def filter_analysis(result: dict[str, Any], layers: str | None) -> dict[str, Any]:
    """A cached full analysis restricted to ``layers`` (regex), with the summary recomputed."""
    pattern = compile_layer_filter(layers)
    if pattern is None:
        return result
    rows = [row for row in result["layers"] if pattern.search(row["module"])]
    return {**result, "summary": summarize(rows), "layers": rows}


class AnalysisMemo:
    """Finished analyses by adapter key (``id@version``), LRU-bounded; one computation per key at a time.

    Keys change when an adapter is replaced, so a stale analysis is never *served*; :meth:`retain`
    also frees the entries of versions that are no longer current (replaced or deleted).
    """

    def __init__(self, max_entries: int = 32) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self.hits = 0
        self.misses = 0

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def cached_keys(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def get_or_compute(self, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The memoized result for ``key``, computing it (blocking: call from a worker thread) if absent."""
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # a second request for the same key waits for the first one's result
            with self._lock:
                if key in self._entries:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return self._entries[key]
            try:
                result = compute()
                with self._lock:
                    self.misses += 1
                    self._entries[key] = result
                    while len(self._entries) > self.max_entries:
                        self._entries.popitem(last=False)
            finally:
                with self._lock:
                    self._key_locks.pop(key, None)
            return result

    def retain(self, current_key: Callable[[str], str | None]) -> None:
        """Drop entries whose adapter is gone or has another current version (``current_key(id)``)."""
        with self._lock:
            for key in list(self._entries):
                if current_key(key.partition("@")[0]) != key:
                    del self._entries[key]


# --------------------------------------------------------------------------- comparison


def compare(a: LoraAdapter, b: LoraAdapter, layers: str | None = None) -> dict[str, Any]:
    """Subspace similarity (LoRA paper Eq. 4) of two adapters, per module they both adapt.

    Per shared module: ``phi_left[i-1][j-1]`` = φ(i, j) between the top-i left singular vectors of
    ΔW_a and the top-j of ΔW_b (i, j ≤ n = the smaller rank), ``phi_right`` the same for the right
    (input-side) vectors, and the value random subspaces would give for φ(n, n) (n / dim).
    """
    pattern = compile_layer_filter(layers)
    shared = _selected(set(a.layers) & set(b.layers), pattern)
    rows = []
    for module in shared:
        fa, fb = _factors(a, module), _factors(b, module)
        if fa.shape != fb.shape:
            raise ValueError(f"{module}: adapter shapes differ ({fa.shape} vs {fb.shape}); same base model?")
        sa, sb = delta_svd(fa), delta_svd(fb)
        left = subspace_similarity(sa, sb, "left")  # [n][n]
        right = subspace_similarity(sa, sb, "right")
        n = len(left)
        d, k = fa.shape
        rows.append(
            {
                "module": module,
                "rank_a": fa.rank,
                "rank_b": fb.rank,
                "phi_left": left,
                "phi_right": right,
                "phi_left_top": left[0][0],
                "phi_right_top": right[0][0],
                "phi_left_full": left[n - 1][n - 1],
                "phi_right_full": right[n - 1][n - 1],
                "random_phi_left": n / d,
                "random_phi_right": n / k,
            }
        )

    def mean(field: str) -> float | None:
        return sum(r[field] for r in rows) / len(rows) if rows else None

    fields = ("phi_left_top", "phi_right_top", "phi_left_full", "phi_right_full", "random_phi_left",
              "random_phi_right")  # fmt: skip
    summary = {
        "shared_modules": len(rows),
        "only_in_a": len(_selected(set(a.layers) - set(b.layers), pattern)),
        "only_in_b": len(_selected(set(b.layers) - set(a.layers), pattern)),
        **{f"mean_{f}": mean(f) for f in fields},
    }
    return {"a": a.adapter_id, "b": b.adapter_id, "summary": summary, "layers": rows}


# --------------------------------------------------------------------------- shrinking


class ShrinkError(ValueError):
    """A shrink request that cannot be honoured; the message says what to change."""

    def __init__(self, message: str, error_type: str = "invalid_shrink") -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type


@dataclass(frozen=True)
class ShrinkResult:
    files: AdapterFiles  # a PEFT adapter: adapter_config.json + adapter_model.safetensors
    layers: list[dict[str, Any]]  # per module: module, original_rank, kept_rank, fro_retained
    fro_retained: float  # of the whole update: √(Σ_layers kept energy / Σ_layers energy)


def check_shrink_request(adapter: LoraAdapter, method: str, value: float) -> None:
    """Refuse an unknown method, a value outside its range, or ``rank`` ≥ the adapter's rank."""
    if method not in RANK_METHODS:
        raise ShrinkError(f"method {method!r} is unknown; use one of {', '.join(RANK_METHODS)}.")
    if adapter.vocab:
        raise ShrinkError(
            f"adapter {adapter.adapter_id!r} changes the token embedding or the LM head (modules_to_save, or "
            "LoRA on them), which shrinking would drop. Only adapters of linear layers can be shrunk.",
            "unsupported",
        )
    if adapter.is_dora:
        raise ShrinkError(
            f"adapter {adapter.adapter_id!r} is DoRA (use_dora=true): shrinking its B·A would change the "
            "norm its magnitude is divided by, so the shrunk adapter would not approximate it. Only plain "
            "LoRA adapters can be shrunk.",
            "unsupported",
        )
    try:  # rank_for_method owns the allowed ranges: ask it, on a dummy spectrum
        rank_for_method(torch.ones(1, dtype=torch.float64), method, value, base_spectral_norm=1.0)
    except ValueError as exc:
        raise ShrinkError(f"{exc}.") from exc
    if method == "rank" and int(value) >= adapter.max_rank:
        raise ShrinkError(
            f"rank {int(value)} does not shrink adapter {adapter.adapter_id!r}, whose rank is "
            f"{adapter.max_rank}; give a rank from 1 to {adapter.max_rank - 1}.",
            "rank_not_reduced",
        )


def shrink_adapter(
    adapter: LoraAdapter, method: str, value: float, base_spectral_norm: Callable[[str], float] | None = None
) -> ShrinkResult:
    """Truncate every layer's exact SVD to the minimal rank meeting ``method``/``value``.

    The scale is folded into the new factors (B' = U_k Σ_k^½, A' = Σ_k^½ V_k^T), and the written
    config gives each module ``lora_alpha`` = its rank, so PEFT and loraplex both apply scale 1.
    ``base_spectral_norm(module)`` (σ_max of the base weight) is needed for ``spn_ckpt`` only.
    Raises :class:`ShrinkError` when the request is invalid or no layer would lose a rank.
    """
    check_shrink_request(adapter, method, value)
    if method == "spn_ckpt" and base_spectral_norm is None:
        raise ShrinkError("spn_ckpt needs the base model's spectral norms; none were given.")
    shrunk: dict[str, ShrunkLayer] = {}
    kept_energy = total_energy = 0.0
    for module in sorted(adapter.layers, key=natural_key):
        f = _factors(adapter, module)
        svd = delta_svd(f)
        norm = base_spectral_norm(module) if method == "spn_ckpt" else None  # type: ignore[misc]
        layer = shrink_layer(f, method, float(value), norm, dtype=torch.float32, svd=svd)
        shrunk[module] = layer
        energy = svd.S * svd.S  # [n]
        total_energy += float(energy.sum())
        kept_energy += float(energy[: layer.kept_rank].sum())
    if all(s.kept_rank >= s.original_rank for s in shrunk.values()):
        raise ShrinkError(
            f"{method}={value} keeps every component of every layer of {adapter.adapter_id!r} (rank "
            f"{adapter.max_rank}): nothing to shrink. Use a looser threshold, or method 'rank' below "
            f"{adapter.max_rank}.",
            "rank_not_reduced",
        )
    report = [
        {
            "module": m,
            "original_rank": s.original_rank,
            "kept_rank": s.kept_rank,
            "fro_retained": s.fro_retained,
        }
        for m, s in shrunk.items()
    ]
    retained = math.sqrt(kept_energy / total_energy) if total_energy > 0 else 1.0
    return ShrinkResult(
        files=peft_files(adapter.config, shrunk), layers=report, fro_retained=min(1.0, retained)
    )


def shrunk_config(source: LoraConfigSpec, ranks: dict[str, int]) -> dict[str, Any]:
    """adapter_config.json for factors with the scale folded in: every module gets alpha = its rank.

    ``r`` / ``lora_alpha`` are the most common kept rank; ``rank_pattern`` / ``alpha_pattern`` list
    the other modules by full name (PEFT matches a pattern key at the end of the module name), so
    scale = alpha / r = 1 exactly for every module, in PEFT and in loraplex. rsLoRA is switched off
    (its scale alpha / √r would not be 1).
    """
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k))
    others = {m: k for m, k in ranks.items() if k != r}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": r,
        "rank_pattern": others,
        "alpha_pattern": dict(others),
        "use_rslora": False,
        "target_modules": source.target_modules,
        "layers_to_transform": source.layers_to_transform,
        "layers_pattern": source.layers_pattern,
        "fan_in_fan_out": source.fan_in_fan_out,
        "base_model_name_or_path": source.base_model_name_or_path,
        "lora_dropout": 0.0,
        "bias": "none",
        "inference_mode": True,
    }


def peft_files(source: LoraConfigSpec, shrunk: dict[str, ShrunkLayer]) -> AdapterFiles:
    """The two files of a PEFT adapter holding ``shrunk``'s factors (float32 safetensors)."""
    config = shrunk_config(source, {m: s.kept_rank for m, s in shrunk.items()})
    return factor_files(config, {m: (s.factors.A, s.factors.B) for m, s in shrunk.items()})


def factor_files(
    config: dict[str, Any], factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> AdapterFiles:
    """``adapter_config.json`` (``config``) and the safetensors of ``{module: (A [r, k], B [d, r])}``."""
    tensors: dict[str, torch.Tensor] = {}
    for module, (A, B) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = A.detach().cpu().contiguous()  # [r, k]
        tensors[f"base_model.model.{module}.lora_B.weight"] = B.detach().cpu().contiguous()  # [d, r]
    return AdapterFiles(
        config=(json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
        weights=st_save(tensors, metadata={"format": "pt"}),
        name=None,
    )
