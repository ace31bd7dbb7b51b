"""From ``QuantizedTensor`` to the kernels' ``PackedMatrix``.

Exact (no information lost): Q4_0, Q4_1, Q4_K -> 4-bit groups of 32; Q5_0, Q5_1, Q8_0 -> 8-bit groups
of 32; Q5_K, Q6_K -> 8-bit groups of 16. Each group is ``w = scale * q + min`` with the GGUF's own scale
structure kept (fp16 scales, K-quants' two levels, no mins where min = -zero_point * scale: the table in
the plugin's README). The i-quants (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ4_XS: Unsloth's
dynamic quants' expert types), MXFP4 (GPT-OSS's experts), IQ4_NL and TQ2_0 are kept as their GGUF blocks, the
kernels decoding them (exactly, to int8 values and a float scale per 16 weights) as they compute. Float weights
(F32/F16/BF16) are quantized online to int8 (symmetric, groups of 16) or int4 (asymmetric, groups of 32);
any other GGML type is dequantized first and then quantized online the same way (lossy: say so).
"""

from __future__ import annotations

import torch

from .runtime import kernels

EXACT_4BIT = frozenset({"Q4_0", "Q4_1", "Q4_K"})
EXACT_8BIT = frozenset({"Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"})
IQ_TYPES = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS"})
DECODED_TYPES = IQ_TYPES | frozenset({"MXFP4", "IQ4_NL", "TQ2_0"})  # kept as blocks, decoded by the kernels
EXACT_TYPES = EXACT_4BIT | EXACT_8BIT
BLOCK_TYPES = EXACT_TYPES | DECODED_TYPES  # what from_gguf takes as raw blocks
FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})
STORED_TYPES = BLOCK_TYPES | FLOAT_TYPES  # the ops' ggml_types
ONLINE_BITS = {"int8": 8, "int4": 4}


def online_bits(spec: str) -> int:
    try:
        return ONLINE_BITS[str(spec).lower()]
    except KeyError:
        raise ValueError(f"kt_cpu_amx: online_quant must be one of {sorted(ONLINE_BITS)}, got {spec!r}") from None


def to_float32(qt) -> torch.Tensor:
    """The tensor as float32 on the CPU, in its logical shape."""
    if qt.ggml_type == "F32":
        return qt.data.view(torch.float32).reshape(qt.shape)
    if qt.ggml_type == "F16":
        return qt.data.view(torch.float16).reshape(qt.shape).float()
    if qt.ggml_type == "BF16":
        return qt.data.view(torch.bfloat16).reshape(qt.shape).float()
    return qt.dequantize(torch.float32, "cpu")


def _raw_bytes(qt) -> torch.Tensor:
    data = qt.data
    if data.dtype != torch.uint8 or data.device.type != "cpu":
        raise TypeError(f"kt_cpu_amx: tensor '{qt.name}' data must be CPU uint8 raw blocks, got {data.dtype} on {data.device}")
    return data.contiguous()


def pack_matrices(qt, bits_for_float: int = 8, runtime=None) -> list:
    """``PackedMatrix`` per 2-D matrix of ``qt`` (one for ``[n, k]``, one per expert for ``[E, n, k]``), each
    repacked on ``runtime``'s threads when given (``runtime.get_runtime``; the bytes are the same either way)."""
    k_mod = kernels()
    shape = tuple(qt.shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"kt_cpu_amx: tensor '{qt.name}' has shape {shape}; expected [n, k] or [experts, n, k]")
    n, k = shape[-2:]
    count = shape[0] if len(shape) == 3 else 1
    if qt.ggml_type in BLOCK_TYPES:
        raw = _raw_bytes(qt)
        per = raw.numel() // count
        if per * count != raw.numel():
            raise ValueError(f"kt_cpu_amx: tensor '{qt.name}' holds {raw.numel()} bytes, not {count} equal matrices")
        base = raw.data_ptr()
        out = [k_mod.PackedMatrix.from_gguf(qt.ggml_type, base + i * per, n, k, runtime) for i in range(count)]
        del raw  # the packed copies own their memory
        return out
    w = to_float32(qt).reshape(count, n, k).contiguous()
    return [k_mod.PackedMatrix.from_float(w[i].data_ptr(), n, k, bits_for_float, runtime) for i in range(count)]


def unpack(pm) -> torch.Tensor:
    """The packed matrix expanded to float32 ``[n, k]`` (what the kernels compute with)."""
    out = torch.empty(pm.n, pm.k, dtype=torch.float32)
    pm.unpack(out.data_ptr())
    return out
