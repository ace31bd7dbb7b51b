"""Weight sources (GGUF, safetensors, in-memory), quantized tensors and their dequantizers.

``open_source(path, model_path=None)`` opens whatever ``path`` holds: a GGUF file, a split GGUF set, a
directory with one GGUF model, or a Hugging Face safetensors directory. Source classes are the ones
plugins register through the ``register_weight_sources`` hook, plus the built-in ones below (so this
works before, or without, the registry).
"""

from __future__ import annotations

import os

from .source import MissingTensorError, WeightError, WeightSource
from .tensor import QuantizedTensor

__all__ = [
    "BUILTIN_SOURCES",
    "MissingTensorError",
    "QuantizedTensor",
    "WeightError",
    "WeightSource",
    "builtin_source_classes",
    "open_source",
]


def builtin_source_classes() -> list[type]:
    """The source classes ktcore ships (the built-in plugin registers these)."""
    from .gguf_source import GGUFSource
    from .safetensors_source import SafetensorsSource

    return [GGUFSource, SafetensorsSource]


BUILTIN_SOURCES = ("ktcore.weights.gguf_source:GGUFSource", "ktcore.weights.safetensors_source:SafetensorsSource")


def _registered_source_classes() -> list[type]:
    """Source classes plugins registered (``register_weight_sources``); plugin dequantizers
    (``register_dequantizers``) are installed on the way. Both come from the registry, which collects
    everything plugins register."""
    try:
        from ..registry import get_registry

        registry = get_registry()
    except Exception:  # noqa: BLE001 - no registry yet: plain loading still works
        return []
    from .dequant import register_dequantizer

    for ggml_type, device_type, fn in registry.dequantizers():
        register_dequantizer(ggml_type, device_type, fn)
    return registry.weight_sources()


def open_source(path: str | os.PathLike, model_path: str | os.PathLike | None = None) -> WeightSource:
    """The weight source for ``path``; ``model_path`` (a local Hugging Face config/tokenizer directory)
    overrides the config and tokenizer the weights carry."""
    if not os.path.exists(path):
        raise WeightError(f"{path}: no such file or directory")
    seen: list[type] = []
    for cls in [*_registered_source_classes(), *builtin_source_classes()]:
        if cls in seen:
            continue
        seen.append(cls)
        if cls.can_open(path):
            return cls(path, model_path=model_path)
    names = ", ".join(c.__name__ for c in seen)
    raise WeightError(f"{path}: no weight source can open this (tried {names}); expected a .gguf file, a split "
                      "GGUF set, or a directory with GGUF or safetensors files")
