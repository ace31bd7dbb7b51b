"""Helpers of the kt_cpu_amx tests: random GGUF blocks, float tensors, gguf-py references."""

from __future__ import annotations

import numpy as np
import torch

from ktcore.weights.quants import ggml_type
from ktcore.weights.tensor import QuantizedTensor

from ktcore.sdk import GGML_TYPES  # noqa: E402

HALF_FIELDS = {name: t.scale_fields for name, t in GGML_TYPES.items() if t.scale_fields}

# the GGML types the kernels take without loss, and some they requantize to int8 after dequantizing
EXACT_TYPES = ("Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")
REQUANTIZED_TYPES = ("Q2_K", "Q3_K", "TQ1_0")  # TQ2_0 is kept as blocks (test_cpu_amx_mxfp4.py)


def _set_half(blocks: np.ndarray, off: int, values: np.ndarray) -> None:
    blocks[:, off:off + 2] = values.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _center(type_name: str, blocks: np.ndarray) -> None:
    """Make the weights zero-mean like trained ones: the min (or dmin with min == scale per sub-block)
    cancels the mean of the unsigned quant values."""
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32).reshape(-1)
    if type_name in ("Q4_1", "Q5_1"):
        _set_half(blocks, 2, -(7.5 if type_name == "Q4_1" else 15.5) * d)
    elif type_name in ("Q4_K", "Q5_K"):
        _set_half(blocks, 2, (7.5 if type_name == "Q4_K" else 15.5) * d)
        s = blocks[:, 4:16]
        s[:, 4:8] = s[:, 0:4]  # sub-blocks 0-3: min == scale; 4-7: equal nibbles and equal top bits
        low = s[:, 8:12] & 0x0F
        s[:, 8:12] = low | (low << 4)


def random_blocks(type_name: str, shape: tuple[int, ...], seed: int = 0, scale: float = 0.02,
                  centered: bool = True) -> QuantizedTensor:
    """Raw blocks with random bits (every quant value and sub-scale pattern) and sane fp16 scales;
    ``centered`` adjusts the mins so the weights are zero-mean, as trained weights are."""
    t = ggml_type(type_name)
    n_el = int(np.prod(shape))
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n_el // t.block_size, t.type_size), dtype=np.uint8)
    for off in HALF_FIELDS[type_name]:
        _set_half(blocks, off, rng.uniform(0.2, 1.0, size=blocks.shape[0]) * scale)
    if centered:
        _center(type_name, blocks)
    data = torch.from_numpy(blocks.reshape(-1).copy())
    return QuantizedTensor(f"random.{type_name}", type_name, tuple(shape), data, "random blocks")


def float_tensor(w: torch.Tensor, type_name: str = "F32", name: str = "w") -> QuantizedTensor:
    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[type_name]
    data = w.to(dtype).contiguous().reshape(-1).view(torch.uint8).clone()
    return QuantizedTensor(name, type_name, tuple(w.shape), data, "test")


def gguf_dequantize(qt: QuantizedTensor) -> torch.Tensor:
    """Reference: gguf-py's own dequantizer."""
    import gguf

    raw = qt.data.numpy()
    out = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qt.ggml_type])
    return torch.from_numpy(np.ascontiguousarray(out)).reshape(qt.shape).float()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm())




def started_four(model, lengths=(13, 4, 30, 9), max_context: int = 64):
    """An engine holding four greedy sequences of different lengths (``lengths`` random tokens) that have each
    taken their first token: ``(engine, seqs)``."""
    from ktcore.engine.core import EngineCore
    from ktcore.generate import SamplingParams

    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]
    engine = EngineCore(model, None, max_context=max_context, max_concurrency=len(prompts))
    seqs = [engine.new_sequence(p, SamplingParams(max_new_tokens=32, ignore_eos=True), text=False) for p in prompts]
    for s in seqs:
        engine.add(s)
    while any(not s.generated for s in seqs):
        engine.step()
    return engine, seqs
