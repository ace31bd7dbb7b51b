"""Token embeddings kept as GGUF blocks: a lookup dequantizes only the rows it reads.

The input embedding is a model's largest matrix after the output head (Gemma 3 270M: 262k x 640, 178 MB
as Q8_0, 671 MB as float32). Dequantized at load it costs that memory and the time to write it; kept as
blocks, a prefill of T tokens dequantizes T rows, with the same arithmetic as the whole-matrix dequantizer
(the values are bit for bit those of ``dequantize``). ``keep_quantized`` re-classes the module under a
subclass of its own class, so a model's own embedding (Gemma's scaled one) still does what it adds; its
``weight`` is a placeholder with the matrix's shape, dtype and device but one stored value, NaN (code that
reads it as a matrix gets NaN, not plausible numbers).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .weights.dequant import dequantize_raw


class QuantizedEmbedding(nn.Embedding):
    """An ``nn.Embedding`` whose rows are GGUF blocks (``blocks``: uint8 ``[num_embeddings, row bytes]``)."""

    ggml_type: str

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        ids = input.reshape(-1)
        rows = self.blocks.index_select(0, ids.to(self.blocks.device))
        values = dequantize_raw(rows.reshape(-1), self.ggml_type, (ids.numel(), self.embedding_dim),
                                self.weight.dtype, what=f"embedding ({self.ggml_type})")
        return values.reshape(*input.shape, self.embedding_dim)

    def _apply(self, fn, recurse=True):
        # .to(), .half(), ...: move the blocks, remake the placeholder where fn sends a float tensor
        weight = self._buffers.pop("weight")
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0, dtype=weight.dtype, device=weight.device))
        self.register_buffer("weight", _placeholder(weight.shape, probe.dtype, probe.device), persistent=False)
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.ggml_type} blocks"


def can_keep_quantized(module: nn.Module, ggml_type: str, device: torch.device) -> bool:
    """An embedding on the CPU whose blocks ``QuantizedEmbedding`` can read (lookups on an accelerator stay
    dense: a CUDA graph cannot capture the small tables some dequantizers build per call)."""
    from .weights.quants import GGML_TYPES

    info = GGML_TYPES.get(ggml_type)
    return (isinstance(module, nn.Embedding) and getattr(module, "max_norm", None) is None
            and torch.device(device).type == "cpu" and info is not None and info.dequantize_blocks is not None
            and info.block_size > 1 and module.embedding_dim % info.block_size == 0)


def keep_quantized(module: nn.Embedding, qt, dtype: torch.dtype) -> None:
    """Make ``module`` look its rows up in ``qt``'s blocks (copied: the source's mapping is not kept)."""
    rows = module.num_embeddings
    module.__class__ = _quantized_class(type(module))
    module.ggml_type = qt.ggml_type
    module._parameters.pop("weight", None)
    module.register_buffer("blocks", qt.data.reshape(rows, -1).clone(), persistent=False)
    module.register_buffer("weight", _placeholder((rows, module.embedding_dim), dtype, "cpu"), persistent=False)


@functools.cache
def _quantized_class(cls: type) -> type:
    if issubclass(cls, QuantizedEmbedding):
        return cls
    if cls is nn.Embedding:
        return QuantizedEmbedding
    # the model's class first (its forward calls super().forward, which is now the block lookup)
    return type(f"Quantized{cls.__name__}", (cls, QuantizedEmbedding), {"__module__": __name__})


def _placeholder(shape, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.full((), float("nan"), dtype=dtype, device=device).expand(*shape)
