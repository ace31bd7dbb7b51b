"""Load what ``kt serve`` serves: a GGUF through ktcore's loader (or plain Transformers), or a tiny test model."""

from __future__ import annotations

import logging
import re
import time
from datetime import datetime, timezone
from pathlib import Path

from .common import ModelInfo

log = logging.getLogger("ktcore.server")

TINY_PREFIX = "tiny:"
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


def _load_with_ktcore(path: str):
    from ktcore.inject import load_model
    from ktcore.weights import open_source

    source = open_source(path)
    model, report = load_model(source)
    log.info("%s", report)
    return model, source.tokenizer()


def _load_with_transformers(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name)
    tokenizer = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    return model.eval(), tokenizer


def load_for_serving(spec: str, loader: str = "auto", name: str | None = None):
    """``(model, tokenizer, ModelInfo)`` for ``spec``: a GGUF path, or ``tiny:<family>[?step_ms=N]`` (random
    weights, for tests; ``step_ms`` adds that much time to every forward). ``loader``: ``ktcore``, ``transformers`` or ``auto`` (ktcore, else Transformers)."""
    if spec.startswith(TINY_PREFIX):
        from .tiny import tiny_chat_model

        family, _, query = spec[len(TINY_PREFIX):].partition("?")
        model, tokenizer = tiny_chat_model(family or "llama")
        step_ms = float(dict(p.split("=", 1) for p in query.split("&") if p).get("step_ms", 0))
        if step_ms:  # a slow tiny model, for tests that must interrupt a reply midway
            model.register_forward_pre_hook(lambda module, args: time.sleep(step_ms / 1000))
        info = ModelInfo(name=name or f"tiny-{family}", family=model.config.model_type, quantization="F32",
                         parameter_count=_parameter_count(model),
                         context_length=model.config.max_position_embeddings)
        return model, tokenizer, info

    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {spec}")
    if loader == "ktcore":
        model, tokenizer = _load_with_ktcore(str(path))
    elif loader == "transformers":
        model, tokenizer = _load_with_transformers(str(path))
    else:
        try:
            model, tokenizer = _load_with_ktcore(str(path))
        except ImportError as exc:  # ktcore's loader pieces not installed in this build
            log.warning("ktcore loader unavailable (%s); loading %s with plain Transformers", exc, path)
            model, tokenizer = _load_with_transformers(str(path))
    if tokenizer is None:
        raise ValueError(f"{path} carries no tokenizer; cannot serve it")
    size = sum(f.stat().st_size for f in path.parent.glob(path.name)) if path.is_file() else 0
    quant = _QUANT_IN_NAME.search(path.stem)
    stem = path.stem if path.is_file() else path.name
    info = ModelInfo(
        name=name or stem, path=str(path.resolve()), family=model.config.model_type,
        parameter_count=_gguf_parameter_count(path) or _parameter_count(model), quantization=quant.group(1).upper() if quant else "unknown",
        size_bytes=size, context_length=getattr(model.config, "max_position_embeddings", 0) or 0,
        modified_at=datetime.fromtimestamp(path.stat().st_mtime, timezone.utc),
    )
    return model, tokenizer, info
