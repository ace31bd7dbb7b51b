"""What ``kt serve`` says about the model it serves, and ``load_for_serving`` (the CLI's loading, for tests)."""

from __future__ import annotations

import logging
import re
from datetime import datetime, timezone
from pathlib import Path

from ktcore.cli.model_options import TINY_PREFIX

from .common import ModelInfo

log = logging.getLogger("ktcore.server")

_QUANT_IN_NAME = re.compile(r"(?:^|[.\-_])((?:I?Q\d(?:_[A-Z0-9]+)*)|F16|BF16|F32)(?:$|[.\-_])", re.IGNORECASE)


def _parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.device.type != "meta")


def _gguf_parameter_count(path: Path) -> int | None:
    """Elements of every tensor in a GGUF file (quantized weights are no ``nn.Parameter`` to count)."""
    if path.suffix != ".gguf":
        return None
    try:
        from math import prod

        from ktcore.weights.gguf_header import GGUFHeader  # lazy header: gguf.GGUFReader parses the vocabulary

        return sum(prod(t.shape) for t in GGUFHeader(path).tensors.values())
    except Exception as exc:  # the count is informational only
        log.warning("cannot count the parameters of %s: %s", path, exc)
        return None


def model_info(loaded, name: str | None = None) -> ModelInfo:
    """What the listing endpoints say about ``loaded`` (a ``ktcore.cli.model_options.LoadedModel``)."""
    model, spec = loaded.model, loaded.spec
    if spec.startswith(TINY_PREFIX):
        family = spec[len(TINY_PREFIX):].partition("?")[0] or "llama"
        return ModelInfo(name=name or f"tiny-{family}", family=model.config.model_type, quantization="F32",
                         parameter_count=_parameter_count(model), context_length=loaded.max_context)
    path = Path(spec)
    size = sum(f.stat().st_size for f in path.parent.glob(path.name)) if path.is_file() else 0
    quant = _QUANT_IN_NAME.search(path.stem)
    stem = path.stem if path.is_file() else path.name
    return ModelInfo(
        name=name or stem, path=str(path.resolve()), family=model.config.model_type,
        parameter_count=_gguf_parameter_count(path) or _parameter_count(model),
        quantization=quant.group(1).upper() if quant else "unknown", size_bytes=size,
        context_length=loaded.max_context, modified_at=datetime.fromtimestamp(path.stat().st_mtime, timezone.utc),
    )


def load_for_serving(spec: str, loader: str = "ktcore", name: str | None = None, **options):
    """``(model, tokenizer, ModelInfo)`` for ``spec`` (a GGUF path, or ``tiny:<family>[?step_ms=N]``), loaded
    as ``kt serve`` loads it (``ktcore.cli.model_options.open_model``; ``options``: further model options,
    such as ``threads`` or ``rules``), without the engine's warm-up."""
    from ktcore.cli.model_options import model_args, open_model

    loaded = open_model(model_args(spec, loader=loader, quiet=True, **options))
    return loaded.model, loaded.tokenizer, model_info(loaded, name)
