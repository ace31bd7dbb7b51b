"""``QuantizedTensor``: raw GGML blocks with their type and logical shape, never expanded until asked."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantizedTensor:
    """A tensor as its source stores it.

    ``shape`` is the logical shape in torch order (the last dimension is the contiguous one, the one GGML
    blocks run along). ``data`` is a 1-D ``uint8`` tensor of the raw bytes (a view on the mapped file
    where the source allows); for F32/F16/BF16 it holds the plain little-endian values.
    ``ggml_type`` is the GGML type name (``"Q4_K"``, ``"F16"``, ...), the key of the type table.
    ``scale``: the float32 block scales of a type whose scales are not inside its bytes (``F8_E4M3``:
    ``[..., ceil(N/128), ceil(K/128)]``, see ``ktcore.weights.fp8``); ``None`` for every GGML type.
    """

    name: str
    ggml_type: str
    shape: tuple[int, ...]
    data: torch.Tensor
    source: str = ""
    scale: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        from .dequant import dequantize

        return dequantize(self, dtype=dtype, device=device)
