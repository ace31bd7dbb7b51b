"""GGUF test tensors: blocks made by ``gguf.quants`` (or random valid K-quant blocks, which gguf's Python
code cannot quantize), wrapped as ``QuantizedTensor`` with their reference dequantization."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants
from gguf.constants import GGML_QUANT_SIZES

from ktcore.weights.tensor import QuantizedTensor

# offsets of the float16 super-block scales that random bytes must not turn into inf/nan
_HALF_FIELDS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q2_K": (80, 82), "Q3_K": (108,)}
# i-quants gguf-py cannot quantize: random valid blocks (ktcore's helper sets their scale fields)
_RANDOM_LOWBIT = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S")


def ggml_tensor(shape, ggml_type: str, seed: int = 0, name: str = "w") -> tuple[QuantizedTensor, torch.Tensor]:
    """A ``QuantizedTensor`` of ``shape`` and its float32 dequantization by ``gguf.quants``."""
    rng = np.random.default_rng(seed)
    qtype = GGMLQuantizationType[ggml_type]
    if ggml_type in ("F32", "F16", "BF16"):
        values = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[ggml_type]
        values = values.to(dtype)
        raw = values.reshape(-1).view(torch.uint8).clone()
        return QuantizedTensor(name, ggml_type, tuple(shape), raw, "test"), values.float()
    if ggml_type in _HALF_FIELDS:
        block, size = GGML_QUANT_SIZES[qtype]
        n_blocks = int(np.prod(shape)) // block
        raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
        for off in _HALF_FIELDS[ggml_type]:
            raw[:, off:off + 2] = rng.uniform(1e-4, 2e-3, size=n_blocks).astype(np.float16).view(np.uint8).reshape(-1, 2)
        raw = raw.reshape(-1)
    elif ggml_type in _RANDOM_LOWBIT:
        from ktcore.weights.dequant_lowbit import random_lowbit_blocks

        block, size = GGML_QUANT_SIZES[qtype]
        raw = random_lowbit_blocks(rng, ggml_type, int(np.prod(shape)) // block, scale=1e-3, signed=True).reshape(-1)
    else:
        raw = quants.quantize(rng.standard_normal(shape).astype(np.float32), qtype).reshape(-1)
    ref = torch.from_numpy(quants.dequantize(raw, qtype).reshape(shape).copy())
    return QuantizedTensor(name, ggml_type, tuple(shape), torch.from_numpy(raw.copy()), "test"), ref
