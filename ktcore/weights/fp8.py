"""Native FP8 checkpoints in DeepSeek-V3/R1's layout: e4m3 weights with 128x128 block scales.

A quantized linear weight ``W [N, K]`` is stored as ``<name>.weight`` (``F8_E4M3``) plus
``<name>.weight_scale_inv`` (float32 ``[ceil(N/128), ceil(K/128)]``), and its value is
``W[n, k] = float(q[n, k]) * scale_inv[n // 128, k // 128]`` (the "inv" is the checkpoint's name for the
factor that undoes the quantization: it multiplies). Stacked experts carry ``[E, ...]`` on both.
``config.json`` says so with ``quantization_config = {quant_method: fp8, fmt: e4m3,
weight_block_size: [128, 128], activation_scheme: dynamic}``; other values are refused by
``check_quantization_config``, naming the field.

``QuantizedTensor(ggml_type="F8_E4M3", data=<the fp8 bytes>, scale=<float32 block scales>)`` carries such a
weight; ``dequantize`` (the reference: float32 product, then the asked dtype) and ``block_scaled_to`` (the same
values, fewer temporaries: the per-call conversion of the CPU experts op) expand it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .source import WeightError
from .tensor import QuantizedTensor

FP8_TYPE = "F8_E4M3"
BLOCK = 128
SCALE_SUFFIX = "_scale_inv"  # "<...>.weight" -> "<...>.weight_scale_inv"
# the values ktcore reads; any other value of these fields is refused
SUPPORTED = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [BLOCK, BLOCK], "activation_scheme": "dynamic"}


def quantization_config(model_dir: str | Path) -> dict | None:
    """``config.json``'s ``quantization_config`` in ``model_dir`` (``None`` when absent), checked."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        qc = json.loads(path.read_text()).get("quantization_config")
    except ValueError as e:
        raise WeightError(f"{path}: not valid JSON: {e}") from e
    if qc is not None:
        check_quantization_config(qc, str(path))
    return qc


def check_quantization_config(qc: dict, where: str = "config.json") -> None:
    """Refuse a ``quantization_config`` ktcore cannot read, naming the field and its value."""
    if not isinstance(qc, dict):
        raise WeightError(f"{where}: quantization_config is {qc!r}, expected an object")
    method = qc.get("quant_method")
    if method != SUPPORTED["quant_method"]:
        raise WeightError(f"{where}: quantization_config.quant_method = {method!r} is not supported "
                          f"(ktcore reads native FP8 checkpoints: 'fp8'; GGUF files for other quantizations)")
    for field in ("fmt", "weight_block_size", "activation_scheme"):
        value = qc.get(field, SUPPORTED[field])
        if value != SUPPORTED[field] and not (field == "weight_block_size" and list(value or ()) == SUPPORTED[field]):
            raise WeightError(f"{where}: quantization_config.{field} = {value!r} is not supported "
                              f"(supported: {SUPPORTED[field]!r})")


def scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The block-scale shape of a weight of ``shape`` (``[..., N, K]`` -> ``[..., ceil(N/128), ceil(K/128)]``)."""
    *lead, n, k = shape
    return (*lead, -(-n // BLOCK), -(-k // BLOCK))


def block_scaled(name: str, data: torch.Tensor, shape: tuple[int, ...], scale: torch.Tensor, source: str = "") -> QuantizedTensor:
    """An FP8 weight (raw bytes ``data``) with its block scales, after checking their shapes agree."""
    expected = scale_shape(tuple(shape))
    if tuple(scale.shape) != expected:
        raise WeightError(f"{source or 'weights'}: tensor '{name}{SCALE_SUFFIX}' has shape {tuple(scale.shape)}; "
                          f"an FP8 weight {tuple(shape)} in 128x128 blocks needs {expected}")
    return QuantizedTensor(name, FP8_TYPE, tuple(shape), data, source, scale.to(torch.float32))


def expand_scale(scale: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Block scales ``[..., nb, kb]`` repeated to one per element of ``shape`` ``[..., N, K]``."""
    n, k = shape[-2], shape[-1]
    return scale.repeat_interleave(BLOCK, dim=-2)[..., :n, :].repeat_interleave(BLOCK, dim=-1)[..., :k]


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The reference: ``float32(q) * scale`` per element (one float32 rounding), then ``dtype``."""
    what = f"tensor {qt.name!r}" + (f" in {qt.source}" if qt.source else "")
    if qt.scale is None:
        raise WeightError(f"{what}: {FP8_TYPE} weight without its block scales ('{qt.name}{SCALE_SUFFIX}')")
    n = 1
    for s in qt.shape:
        n *= int(s)
    if qt.data.numel() != n:
        raise WeightError(f"{what}: {FP8_TYPE} {tuple(qt.shape)} needs {n} bytes, got {qt.data.numel()}")
    data = qt.data if device is None else qt.data.to(device)
    scale = qt.scale.to(data.device)
    q = data.view(torch.float8_e4m3fn).reshape(qt.shape).to(torch.float32)
    return (q * expand_scale(scale.to(torch.float32), qt.shape)).to(dtype)


def row_scales(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """Block scales ``[..., nb, kb]`` repeated per row: ``[..., rows, kb]``."""
    return scale.repeat_interleave(BLOCK, dim=-2)[..., :rows, :]


def row_scaled_to(q: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q`` (float8_e4m3fn ``[N, K]``) times its per-row block scales ``rows [N, kb]``, as ``dtype``: the
    values of ``dequantize`` (the same float32 product), broadcast over whole column blocks when K allows."""
    n, k = q.shape
    if k % BLOCK:
        return (q.to(torch.float32) * rows.repeat_interleave(BLOCK, dim=-1)[:, :k]).to(dtype)
    w = q.view(n, k // BLOCK, BLOCK).to(torch.float32).mul_(rows.unsqueeze(-1))
    return w.view(n, k).to(dtype)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., N, K]`` -> ``(q float8_e4m3fn, scale float32 [..., nb, kb])``: each 128x128 block's amax maps
    to 448, the largest e4m3 value (how DeepSeek-V3's checkpoints were made; the writer of test folders)."""
    *lead, n, k = w.shape
    nb, kb = -(-n // BLOCK), -(-k // BLOCK)
    padded = torch.zeros(*lead, nb * BLOCK, kb * BLOCK, dtype=torch.float32)
    padded[..., :n, :k] = w.float()
    tiles = padded.view(*lead, nb, BLOCK, kb, BLOCK)
    scale = (tiles.abs().amax(dim=(-3, -1)) / 448.0).clamp_min(1e-12)
    q = (tiles / scale[..., :, None, :, None]).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q.view(*lead, nb * BLOCK, kb * BLOCK)[..., :n, :k].contiguous(), scale
