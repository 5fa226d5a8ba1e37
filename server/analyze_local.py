"""``loraplex analyze PATH``: analyse a PEFT adapter directory against a base model loaded here.

No server needed. It lives on the server side because it loads the base model; the analysis
itself is ``adapters.analysis`` (which knows nothing of the server).
"""

from __future__ import annotations

from pathlib import Path

from adapters.analysis import BaseStatsCache, analyze, weights_digest


def analyze_local(path: str | Path, base: str | None = None, *, cache_dir: Path | None = None) -> dict:
    """Analyse the PEFT adapter in directory ``path`` against ``base`` (a local HF model directory,
    or None for the embedded SmolLM2), loaded here on the CPU in float32.

    The base-weight statistics are cached in ``<cache_dir>/analysis`` (default: the server's
    ``LORAPLEX_CACHE_DIR``), keyed like the server's, so either one reuses the other's work.
    """
    from torch import nn

    from adapters.peft_format import BaseLinearShape, load_adapter_dir
    from server.config import Settings
    from server.engine.base_model import load_base
    from server.engine.lora_linear import linear_shape

    cache_dir = Path(cache_dir) if cache_dir is not None else Settings().cache_dir
    loaded = load_base(base, "float32", "cpu", cache_dir)
    model: nn.Module = loaded.model
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    modules = {
        name: (module, shape)
        for name, module in model.named_modules()
        if (shape := linear_shape(module)) is not None and module is not head
    }
    shapes = {name: BaseLinearShape(out_features=o, in_features=i, fan_in_fan_out=t)
              for name, (_, (i, o, t)) in modules.items()}  # fmt: skip
    adapter_dir = Path(path).expanduser()
    adapter = load_adapter_dir(adapter_dir, adapter_dir.resolve().name or "adapter", shapes)

    def weight(name: str):  # [out, in]
        module, (_, _, fan_in_fan_out) = modules[name]
        W = module.weight.detach()
        return W.t() if fan_in_fan_out else W

    digest = weights_digest((name, module.weight) for name, (module, _) in modules.items())
    cache = BaseStatsCache(cache_dir / "analysis", loaded.name, digest)
    return analyze(adapter, weight, cache)
