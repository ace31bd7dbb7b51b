"""GGUF tensors for tests: quantized with ``gguf.quants`` where it can, else random whole blocks with sane
scales (``gguf.quants`` only dequantizes the K-quants). The reference values are ``gguf.quants.dequantize``."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants

from ktcore.weights.tensor import QuantizedTensor

# K-quant layouts: bytes per 256-weight block and where its float16 d (and dmin) sit
_K_HALVES = {"Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,)), "Q2_K": (84, (80, 82)), "Q3_K": (110, (108,))}


def quantized(ggml_type: str, shape: tuple[int, ...], seed: int = 0, name: str = "w") -> QuantizedTensor:
    rng = np.random.default_rng(seed)
    qtype = GGMLQuantizationType[ggml_type]
    if ggml_type in _K_HALVES:
        nbytes, halves = _K_HALVES[ggml_type]
        blocks = rng.integers(0, 256, size=(int(np.prod(shape)) // 256, nbytes), dtype=np.uint8)
        for at in halves:
            blocks[:, at : at + 2] = (rng.uniform(1e-4, 1e-3, size=(blocks.shape[0], 1))).astype(np.float16).view(np.uint8)
        raw = blocks.reshape(-1)
    else:
        values = rng.standard_normal(shape).astype(np.float32) * 0.05
        if ggml_type in ("Q4_1", "Q5_1"):
            values += rng.uniform(-0.05, 0.05, size=shape[:-1] + (1,)).astype(np.float32)  # non-zero group means
        raw = quants.quantize(values, qtype).reshape(-1)
    return QuantizedTensor(name=name, ggml_type=ggml_type, shape=tuple(shape), data=torch.from_numpy(raw.copy()), source="test")


def reference(qt: QuantizedTensor) -> torch.Tensor:
    """``gguf.quants``' float32 dequantization of ``qt``."""
    raw = qt.data.numpy().reshape(*qt.shape[:-1], -1)
    return torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType[qt.ggml_type]).astype(np.float32)).reshape(qt.shape)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double().cpu(), ref.double().cpu()
    assert torch.isfinite(got).all(), "non-finite values in the output"
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
