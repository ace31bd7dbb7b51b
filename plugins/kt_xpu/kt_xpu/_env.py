"""Whether an Intel GPU and torch's XPU kernels are here, as the text ``Op.available()`` returns."""

from __future__ import annotations

import torch

INT4_MM = "aten::_weight_int4pack_mm_with_scales_and_zeros"
INT4_PACK = "aten::_convert_weight_to_int4pack"


def xpu_unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """``None`` when an XPU can run kernels here (on ``device`` when given)."""
    if device is not None and torch.device(device).type != "xpu":
        return f"runs on xpu devices only, not {torch.device(device).type}"
    xpu = getattr(torch, "xpu", None)
    if xpu is None or not xpu.is_available():
        build = "" if getattr(torch.version, "xpu", None) else "; this torch is not an XPU build (torch.version.xpu is None)"
        return f"torch has no XPU support (torch.xpu.is_available() is False{build})"
    return None


def int4_kernels_missing() -> str | None:
    """``None`` when this torch has XPU kernels for the int4 weight-only GEMM and its weight packing."""
    missing = [op for op in (INT4_MM, INT4_PACK) if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "XPU")]
    return f"this torch has no XPU kernel for {', '.join(missing)} (torch >= 2.7 XPU builds have them)" if missing else None
