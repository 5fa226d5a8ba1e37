"""Merged hot-swap: fold one adapter into the base weights, and restore the base bit for bit.

    merge(M):    W ← round(W_base + s·B·A)          (the product and the sum in float32)
                 DoRA: W ← round(g ⊙ (W_base + s·B·A)), g = m / ‖W_base + s·B·A‖_row (``dora.py``)
    swap(M→N):   W ← W_base (restored, not subtracted) ; W ← round(W_base + s'·B'·A')

Subtracting the old delta (``W − s·B·A``) drifts: each round-trip through bfloat16/float16
rounding loses bits, and the error compounds over swaps. loraplex never subtracts: it restores
the affected layers from an exact source of the original weights, so the base is the same bits
after any number of swaps. Sources, in order of preference:

* the model's own safetensors checkpoint, read with ``pread`` layer by layer (no extra resident
  memory: a few MB of temporary buffer per layer, the file stays in the OS page cache), used for
  every layer whose checkpoint copy, cast to the serving dtype, reproduces the loaded weight
  exactly (checked once at start-up);
* otherwise an in-memory copy of that layer's original weight, on the CPU (100% of those
  layers' weights; only models without a usable checkpoint pay it).

A digest of all target weights is taken at load; :meth:`MergeManager.digest` proves the base is
intact (``POST /admin/verify-base``).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapters.peft_format import SAFETENSORS_DTYPES, LoraAdapter, LoraLayerWeights
from server.engine.dora import dora_merged
from server.engine.lora.vocab import VocabAdapters
from server.engine.runner import WeightTarget


@dataclass
class _TensorLocation:
    path: Path
    offset: int  # absolute byte offset in the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class CheckpointIndex:
    """Where each tensor of a (possibly sharded) safetensors checkpoint lies on disk."""

    def __init__(self, model_dir: Path) -> None:
        self.locations: dict[str, _TensorLocation] = {}
        files = sorted(model_dir.glob("*.safetensors")) if model_dir.is_dir() else []
        for path in files:
            with path.open("rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
            for name, info in header.items():
                if name == "__metadata__" or info.get("dtype") not in SAFETENSORS_DTYPES:
                    continue
                start, end = info["data_offsets"]
                self.locations[name] = _TensorLocation(
                    path,
                    8 + header_len + start,
                    end - start,
                    SAFETENSORS_DTYPES[info["dtype"]][0],
                    tuple(info["shape"]),
                )

    def read(self, name: str) -> torch.Tensor | None:
        """The tensor as stored, read with pread into a fresh CPU buffer; None when absent."""
        loc = self.locations.get(name)
        if loc is None:
            return None
        tensor = torch.empty(loc.shape, dtype=loc.dtype)
        self._pread_into(loc, tensor)
        return tensor

    def read_into(self, name: str, out: torch.Tensor) -> bool:
        """Read straight into ``out`` when it is a contiguous CPU tensor of the stored dtype and shape.

        Saves a buffer and a copy per layer; returns False when ``out`` does not qualify.
        """
        loc = self.locations.get(name)
        if loc is None or out.device.type != "cpu" or not out.is_contiguous():
            return False
        if out.dtype != loc.dtype or tuple(out.shape) != loc.shape:
            return False
        self._pread_into(loc, out)
        return True

    @staticmethod
    def _pread_into(loc: _TensorLocation, out: torch.Tensor) -> None:
        view = memoryview(out.detach().view(torch.uint8).reshape(-1).numpy())  # [nbytes], shares out's memory
        fd = os.open(loc.path, os.O_RDONLY)
        try:
            done = 0
            while done < loc.nbytes:
                read = os.preadv(fd, [view[done:]], loc.offset + done)
                if read <= 0:
                    raise OSError(f"{loc.path} ended early while restoring a weight")
                done += read
        finally:
            os.close(fd)


def _delta(target: WeightTarget, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """scale · B @ A in float32 on the weight's device, laid out like the weight."""
    device = target.device
    delta = scale * (B.to(device, torch.float32) @ A.to(device, torch.float32))  # [d, k]
    return delta.t() if target.fan_in_fan_out else delta


@dataclass
class SwapStats:
    swaps: int = 0  # changes of the merged adapter (merge, unmerge or both)
    swap_seconds: float = 0.0
    history: list[float] = field(default_factory=list, repr=False)  # recent swap durations

    def typical_swap_seconds(self, recent: int = 5) -> float:
        """What a swap costs, for auto mode's merge decision: the lower median of the last
        ``recent`` swaps (0 before the first). One slow swap (the first merge touching fresh pages,
        a busy neighbour process, a garbage-collection pause) must not postpone every later merge
        by hundreds of steps, as the last swap's duration alone would."""
        return statistics.median_low(self.history[-recent:]) if self.history else 0.0


@dataclass(frozen=True)
class BaseWeights:
    """The base model's weights as loaded, whatever adapter is merged: ``Engine.base_weights()``.

    Safe from any thread, with no lock and no wait for the engine thread, because it never reads
    what the engine thread writes: a merged or auto engine rewrites the live weights on a swap,
    so :meth:`weight` reads the restore source the :class:`MergeManager` chose per layer at start-up
    (the checkpoint, read with ``pread`` into a fresh buffer, or its in-memory copy, which nothing
    writes after start-up, cloned); an unmerged engine never writes the live weights, so they are
    read as they are (copied). Those choices never change after start-up. Each call returns a
    fresh CPU tensor the caller may keep or change.
    """

    digest: str  # sha256 over every adaptable weight at load (the analysis caches key on it)
    modules: frozenset[str]  # the PEFT module names :meth:`weight` knows
    _original: Callable[[str], torch.Tensor] = field(repr=False)

    def weight(self, module: str) -> torch.Tensor:
        """The base weight of ``module`` [out, in] on the CPU (Conv1D layers transposed to it);
        KeyError for a module the base does not adapt."""
        return self._original(module)


class MergeManager:
    """Owns the merged state of the base weights. Engine thread only, apart from
    :attr:`base_weights` (any thread, see :class:`BaseWeights`)."""

    def __init__(
        self,
        targets: Mapping[str, WeightTarget],
        checkpoint_dir: Path | None,
        *,
        can_merge: bool,
        vocab: VocabAdapters | None = None,
    ) -> None:
        """``can_merge=False`` (unmerged mode) prepares no restore source and costs no memory.
        ``vocab``: the runner's per-row embedding and head changes; a merged adapter's are served
        there to every (base) row, so the base embedding and head are never written.

        The runner owns the weights (merging runners copy mmap'd checkpoint pages at start-up).
        """
        self.targets = targets
        self.vocab = vocab
        self.merged: LoraAdapter | None = None
        self.can_merge = can_merge
        self.stats = SwapStats()
        self._checkpoint = (
            CheckpointIndex(checkpoint_dir) if can_merge and checkpoint_dir is not None else None
        )
        self._copies: dict[str, torch.Tensor] = {}  # layers the checkpoint cannot restore exactly
        self._from_checkpoint: set[str] = set()
        if can_merge:
            for name, target in targets.items():
                if self._checkpoint_restores(target):
                    self._from_checkpoint.add(name)
                else:
                    self._copies[name] = target.read().to("cpu", copy=True)
        self.digest_at_load = self.digest()
        self.base_weights = BaseWeights(self.digest_at_load, frozenset(targets), self.original_weight)

    # ------------------------------------------------------------------ sources of the original

    def _checkpoint_restores(self, target: WeightTarget) -> bool:
        original = self._checkpoint.read(target.checkpoint_key) if self._checkpoint is not None else None
        if original is None or original.shape != target.shape:
            return False
        return torch.equal(original.to(target.dtype), target.read().cpu())

    @property
    def extra_bytes(self) -> int:
        """Resident memory this manager keeps beyond the model (the in-memory copies)."""
        return sum(t.numel() * t.element_size() for t in self._copies.values())

    @property
    def restored_from_checkpoint(self) -> int:
        return len(self._from_checkpoint)

    def original_weight(self, name: str) -> torch.Tensor:
        """The base weight of layer ``name`` as loaded, whatever is merged now; safe from any thread
        (:class:`BaseWeights` says why).

        Unmerged mode never changes the weights, so they are read as they are; merged and auto
        modes read the restore source (checkpoint or in-memory copy). Returns a CPU tensor [out, in]
        (Conv1D layers are transposed to that layout).
        """
        target = self.targets[name]
        if not self.can_merge:
            original = target.read().to("cpu", copy=True)
        elif name in self._from_checkpoint:
            original = self._checkpoint.read(target.checkpoint_key).to(target.dtype)  # type: ignore[union-attr]
        else:
            original = self._copies[name].clone()
        return original.t() if target.fan_in_fan_out else original

    def _restore(self, name: str) -> None:
        target = self.targets[name]
        if name in self._from_checkpoint:
            assert self._checkpoint is not None
            live = target.live
            if live is not None and self._checkpoint.read_into(target.checkpoint_key, live.data):
                return
            original = self._checkpoint.read(target.checkpoint_key)
            assert original is not None
        else:
            original = self._copies[name]
        target.write(original.to(target.dtype))

    # ------------------------------------------------------------------ merging

    def merge(self, adapter: LoraAdapter | None) -> float:
        """Make ``adapter`` (None: the bare base) the one folded into the weights; return seconds."""
        if adapter is self.merged or (
            adapter is not None and self.merged is not None and adapter.key == self.merged.key
        ):
            return 0.0
        if not self.can_merge:
            raise RuntimeError("merging needs --mode merged or auto")
        start = time.perf_counter()
        old = self.merged.layers if self.merged is not None else {}
        new = adapter.layers if adapter is not None else {}
        # Name order keeps a layer's modules together, so a runner that stages writes to a fused or
        # packed weight (the native runner on the CPU) converts each weight once per swap.
        touched = sorted({*old, *new})
        with torch.no_grad():
            for name in touched:
                if name in old:
                    self._restore(name)
                if name in new:
                    self._add(name, new[name])
            for name in touched:
                self.targets[name].flush()
            if self.vocab is not None:  # the embedding and head: per row, never written
                self.vocab.set_merged(adapter.vocab if adapter is not None else None)
        self.merged = adapter
        if _on_cuda(self.targets):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        self.stats.swaps += 1
        self.stats.swap_seconds += seconds
        self.stats.history = [*self.stats.history[-31:], seconds]
        return seconds

    def _add(self, name: str, w: LoraLayerWeights) -> None:
        """W ← round(W + s·B·A), the sum in float32; DoRA: W ← round(g ⊙ (W + s·B·A)) (``dora.py``),
        from the weight as it is now: the base, restored just before."""
        target = self.targets[name]
        if w.is_dora:
            target.write(dora_merged(target.read(), w, target.fan_in_fan_out).to(target.device, target.dtype))
            return
        delta = _delta(target, w.A, w.B, w.scale)
        live = target.live
        if live is not None and live.dtype == torch.float32:
            live.data.add_(delta)  # the same float32 sum, without a temporary
        else:
            target.write((target.read().float() + delta).to(target.dtype))

    def digest(self) -> str:
        """sha256 over every target weight's bytes, in a fixed order."""
        h = hashlib.sha256()
        for name in sorted(self.targets):
            weight = self.targets[name].read()
            h.update(name.encode())
            h.update(weight.cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()


def _on_cuda(targets: Mapping[str, WeightTarget]) -> bool:
    first = next(iter(targets.values()), None)
    return first is not None and first.device.type == "cuda"
