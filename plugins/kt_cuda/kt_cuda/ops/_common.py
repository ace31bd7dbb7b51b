"""Option parsing shared by the ops."""

from __future__ import annotations

import torch

from ktcore.sdk import check_shape, module_dtype, parse_dtype  # noqa: F401  (re-exported)


def parse_scales_dtype(value, op_name: str):
    """``"auto"`` (lossless: float16 where exact, else float32) or a float dtype name."""
    if value in (None, "auto"):
        return "auto"
    dtype = parse_dtype(value, op_name)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{op_name}: scales_dtype must be 'auto', float16, bfloat16 or float32, got {value!r}")
    return dtype


def tensor_label(qt) -> str:
    where = f" in {qt.source}" if getattr(qt, "source", "") else ""
    return f"'{qt.name}'{where}"


# how KLinearMarlin stores packed int4 bytes unless told (measured on an H200: see bench/bench_marlin.py)
DEFAULT_LAYOUT = "n_major"
LAYOUTS = ("n_major", "k_major")


def parse_layout(value, op_name: str) -> bool:
    """``True`` for K-major packed bytes."""
    if value not in LAYOUTS:
        raise ValueError(f"{op_name}: layout must be one of {', '.join(LAYOUTS)}, got {value!r}")
    return value == "k_major"
