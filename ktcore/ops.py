"""The base class every op derives from.

An op is one implementation of a role (``linear``, ``experts``, ``attention``, ``rope``) that a plugin
registers. It declares what it supports; the core asks (``available``, ``devices``, ``ggml_types``) and
never guesses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from .weights.tensor import QuantizedTensor

ROLES = ("linear", "experts", "attention", "rope")


class Op(nn.Module):
    """An implementation of one role.

    Subclasses set ``name`` (unique across all plugins, e.g. ``KLinearTorch``), ``role`` (one of
    ``ROLES``), ``devices`` (torch device types it runs on) and ``ggml_types`` (the GGML type names it
    consumes without dequantizing; ``None`` means it accepts any type by dequantizing it).
    The registry fills ``plugin`` with the name of the plugin that registered it.

    Lifecycle: ``Op(module, device, **kwargs)`` with the original Transformers module (on the meta
    device: read shapes and config from it, never data), then ``load(weights)`` once with the module's
    tensors, then ``forward`` as often as needed.
    """

    name: ClassVar[str] = ""
    role: ClassVar[str] = ""
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    ggml_types: ClassVar[frozenset[str] | None] = None
    plugin: ClassVar[str] = ""

    def __init__(self, module: nn.Module, device: torch.device | str = "cpu", **kwargs):
        super().__init__()
        self.device = torch.device(device)
        if kwargs:
            raise TypeError(f"{self.name}: unexpected options {sorted(kwargs)}")

    @classmethod
    def available(cls, device: torch.device | str | None = None) -> str | None:
        """``None`` when this op can run here (on ``device`` if given), else the reason it cannot."""
        return None

    def load(self, weights: Mapping[str, "QuantizedTensor"]) -> None:
        """Take this module's tensors (Transformers names, local to the module) and keep them as the
        kernel wants them: as they are, repacked, or dequantized."""

    def post_load(self) -> None:
        """Called once after every module of the model has been loaded."""
