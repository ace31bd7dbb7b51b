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
ANY_DEVICE: tuple[str, ...] = ()  # ``Op.devices`` of an op that runs on any device torch has


class Op(nn.Module):
    """An implementation of one role.

    A subclass is one plugin's *backend* of the op ``name`` (several plugins may implement one op, e.g.
    ``KLinearGPU``) and sets ``role`` (one of ``ROLES``), ``devices`` (torch device types it runs on;
    ``ANY_DEVICE``: any), ``preference`` (the highest available backend of an op wins on a device),
    ``aliases`` (other spellings of its op), ``ggml_types`` (GGML types it consumes as stored) and
    ``dequantizes_others`` (whether other types are dequantized for it, or refused). The registry fills
    ``plugin`` with the name of the plugin that registered it. docs/ARCHITECTURE.md has the full contract.

    Lifecycle: ``Op(module, device, **kwargs)`` with the original Transformers module (on the meta
    device: read shapes and config from it, never data), then ``load(weights)`` once with the module's
    tensors, then ``forward`` as often as needed.
    """

    name: ClassVar[str] = ""
    role: ClassVar[str] = ""
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    ggml_types: ClassVar[frozenset[str] | None] = None
    # False: tensors of a type outside ``ggml_types`` are refused (``kt rules check`` says so before loading)
    dequantizes_others: ClassVar[bool] = True
    aliases: ClassVar[tuple[str, ...]] = ()
    preference: ClassVar[int] = 0
    plugin: ClassVar[str] = ""
    # True when ``forward`` on a CUDA device can be captured into a CUDA graph: no host synchronization
    # (``.item()``, ``.cpu()``, ``int(tensor)``), no shape that depends on tensor values, every kernel on
    # the current stream. Ops that run elsewhere (the CPU) count only with ``stream_submit``/``stream_sync``.
    graph_capturable: ClassVar[bool] = False

    def __init__(self, module: nn.Module, device: torch.device | str = "cpu", **kwargs):
        super().__init__()
        self.device = torch.device(device)
        if kwargs:
            raise TypeError(f"{self.name}: unexpected options {sorted(kwargs)}")

    @classmethod
    def available(cls, device: torch.device | str | None = None) -> str | None:
        """``None`` when this op can run here (on ``device`` if given), else the reason it cannot."""
        return None

    @classmethod
    def ggml_type_problem(cls, ggml_type: str) -> str | None:
        """Why this op cannot take a tensor of ``ggml_type`` (``None``: it can): a type outside ``ggml_types``
        must be one ktcore dequantizes, and the op must accept dequantized weights (``dequantizes_others``)."""
        from .weights.quants import DEQUANTIZABLE, GGML_TYPES

        if cls.ggml_types is not None and ggml_type in cls.ggml_types:
            return None
        taken = f"takes {', '.join(sorted(cls.ggml_types))} as stored" if cls.ggml_types else "dequantizes its weights"
        if not cls.dequantizes_others:
            return f"op '{cls.name}' ({cls.plugin}) {taken} and refuses other types, not {ggml_type}"
        if ggml_type not in DEQUANTIZABLE:
            nearest = getattr(GGML_TYPES.get(ggml_type), "nearest_supported", None)
            hint = f"; nearest supported type: {nearest}" if nearest else ""
            return (f"op '{cls.name}' ({cls.plugin}) {taken}, but ktcore has no dequantizer for {ggml_type}{hint} "
                    f"(it dequantizes {', '.join(sorted(DEQUANTIZABLE))})")
        return None

    def load(self, weights: Mapping[str, "QuantizedTensor"]) -> None:
        """Take this module's tensors (Transformers names, local to the module) and keep them as the
        kernel wants them: as they are, repacked, or dequantized."""

    def post_load(self) -> None:
        """Called once after every module of the model has been loaded."""

    def declare_siblings(self, siblings: list["Op"]) -> None:
        """Linear ops: ``siblings`` (this op among them, in the order model code calls them) are the linears
        under one parent that the model calls one after the other on the same input: q/k/v projections,
        gate/up of an MLP (see ``ktcore.modules.SIBLING_LINEARS``). Called once at inject time, after every
        op was built; an op may plan one fused call over the group (its outputs must equal the ones each op
        computes alone). The default ignores it."""

    def declare_output_head(self) -> None:
        """Linear ops: this op computes the model's output head (the logits each token is picked from). Called
        once at inject time; an op that trades precision for speed may compute this one more exactly
        (kt-cpu-amx: int8 activations plus their rounding residual). The default ignores it."""

    def prepare_capture(self, max_positions: int) -> None:
        """Called before a CUDA graph is captured over at most ``max_positions`` positions: do now what
        ``forward`` would otherwise do lazily after a host read (growing tables, tuning kernels)."""


def stream_capturing(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s device stream is being captured into a CUDA graph (then no host read is allowed)."""
    return tensor.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
