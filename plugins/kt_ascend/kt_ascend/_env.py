"""Whether ``torch_npu`` and an Ascend NPU are here, as the text ``Op.available()`` returns."""

from __future__ import annotations

import importlib
import importlib.util
from functools import lru_cache
from types import ModuleType

import torch


@lru_cache(maxsize=1)
def _import_torch_npu() -> tuple[ModuleType | None, str | None]:
    if importlib.util.find_spec("torch_npu") is None:
        return None, "torch_npu is not installed (pip install torch-npu, on a machine with Huawei's CANN toolkit)"
    try:
        return importlib.import_module("torch_npu"), None
    except Exception as exc:  # a broken CANN install raises anything from OSError to RuntimeError
        return None, f"torch_npu failed to import: {type(exc).__name__}: {exc}"


def torch_npu() -> ModuleType:
    """The imported ``torch_npu`` module; raises ``RuntimeError`` with the reason when it cannot be had."""
    module, reason = _import_torch_npu()
    if module is None:
        raise RuntimeError(reason)
    return module


def device_type(device: torch.device | str) -> str:
    # torch.device("npu") only parses once torch_npu has registered the name, so read the type as text
    return device.type if isinstance(device, torch.device) else str(device).split(":", 1)[0]


def require_torch_npu_for(device: torch.device | str) -> None:
    """Import torch_npu when ``device`` is an NPU (it registers the device name); ``RuntimeError`` with the
    reason when it cannot be imported."""
    if device_type(device) == "npu":
        torch_npu()


def npu_unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """``None`` when an Ascend NPU can run kernels here (on ``device`` when given)."""
    if device is not None and device_type(device) != "npu":
        return f"runs on npu devices only, not {device_type(device)}"
    module, reason = _import_torch_npu()
    if module is None:
        return reason
    npu = getattr(torch, "npu", None)
    if npu is None or not npu.is_available():
        return "torch_npu is installed but no Ascend NPU is visible (torch.npu.is_available() is False)"
    return None
