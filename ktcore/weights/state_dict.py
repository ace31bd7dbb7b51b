"""``StateDictSource``: the WeightSource contract over an in-memory Transformers model or state dict."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn

from .names import INTERLEAVED_EXPERTS_MODEL_TYPES, TRANSPOSED_EXPERTS_MODEL_TYPES
from .source import MissingTensorError
from .tensor import QuantizedTensor

_GGML_TYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_SPLIT_SUFFIX = ".gate_up_proj"


def as_quantized(name: str, tensor: torch.Tensor, source: str = "") -> QuantizedTensor:
    """A float tensor as a ``QuantizedTensor`` of type F32/F16/BF16 (raw bytes of a contiguous copy)."""
    tensor = tensor.detach()
    if tensor.dtype not in _GGML_TYPES:
        tensor = tensor.float()
    data = tensor.contiguous().reshape(-1).view(torch.uint8)
    return QuantizedTensor(name=name, ggml_type=_GGML_TYPES[tensor.dtype], shape=tuple(tensor.shape), data=data, source=source)


class StateDictSource:
    """Tensors of a Transformers model (or a plain state dict plus its config), under Transformers names.

    Fused experts ``<p>.gate_up_proj`` (``[E, 2*I, H]``) are also offered split as ``<p>.gate_proj`` (first
    half along dim 1) and ``<p>.up_proj`` (second half), which is what experts ops load.
    """

    def __init__(self, model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], config=None, path: str = ""):
        if isinstance(model_or_state_dict, nn.Module):
            self._tensors = dict(model_or_state_dict.state_dict())
            config = config if config is not None else getattr(model_or_state_dict, "config", None)
            self.path = path or f"<in-memory {type(model_or_state_dict).__name__}>"
        else:
            self._tensors = dict(model_or_state_dict)
            self.path = path or "<in-memory state dict>"
        if config is None:
            raise ValueError("StateDictSource needs the model's config (pass config=...)")
        self._config = config
        self._split = {}  # derived name -> (fused name, half)
        if getattr(config, "model_type", "") in INTERLEAVED_EXPERTS_MODEL_TYPES:
            self._split_interleaved()
            return
        for name, tensor in self._tensors.items():
            if name.endswith(_SPLIT_SUFFIX) and tensor.dim() == 3:
                prefix = name[: -len(_SPLIT_SUFFIX)]
                for half, part in enumerate(("gate_proj", "up_proj")):
                    derived = f"{prefix}.{part}"
                    if derived not in self._tensors:
                        self._split[derived] = (name, half)

    def _split_interleaved(self) -> None:
        """GPT-OSS: ``gate_up_proj [E, H, 2I]`` (gate, up interleaved on the last dim) and its bias ``[E, 2I]``
        offered as ``gate_proj``/``up_proj`` ``[E, I, H]`` and ``gate_proj_bias``/``up_proj_bias`` ``[E, I]``;
        ``down_proj [E, I, H]`` also as ``down_proj_stored [E, H, I]`` (llama.cpp's layout)."""
        for name in list(self._tensors):
            for fused, bias in ((".gate_up_proj", ""), (".gate_up_proj_bias", "_bias")):
                if name.endswith(fused):
                    prefix = name[: -len(fused)]
                    for half, part in enumerate(("gate_proj", "up_proj")):
                        self._split[f"{prefix}.{part}{bias}"] = (name, half)
            if name.endswith(".experts.down_proj") and self._tensors[name].dim() == 3:  # [E, I, H] -> as llama.cpp stores it
                self._split[name + "_stored"] = (name, None)

    def _part(self, fused: torch.Tensor, half: int | None) -> torch.Tensor:
        if half is None:  # down_proj_stored
            return fused.transpose(1, 2)
        model_type = getattr(self._config, "model_type", "")
        if model_type in INTERLEAVED_EXPERTS_MODEL_TYPES:
            part = fused[..., half::2]
            return part.transpose(1, 2) if part.dim() == 3 else part
        if model_type in TRANSPOSED_EXPERTS_MODEL_TYPES:  # [E, H, 2I] -> [E, I, H]
            cols = fused.shape[-1] // 2
            return fused[..., half * cols : (half + 1) * cols].transpose(1, 2)
        rows = fused.shape[1] // 2
        return fused[:, half * rows : (half + 1) * rows, :]

    def names(self) -> Iterator[str]:
        yield from self._tensors
        yield from self._split

    def get(self, name: str) -> QuantizedTensor:
        if name in self._tensors:
            return as_quantized(name, self._tensors[name], self.path)
        if name in self._split:
            fused_name, half = self._split[name]
            return as_quantized(name, self._part(self._tensors[fused_name], half), self.path)
        raise MissingTensorError(f"tensor '{name}' is not in {self.path}")

    def config(self):
        return self._config

    def tokenizer(self):
        return None
