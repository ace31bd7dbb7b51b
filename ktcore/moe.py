"""Hybrid CPU/GPU execution: the MoE block wrapper ``KMoE`` and the model-level ``transfer_map``.

``KMoE`` replaces a sparse MoE block (``DeepseekV2Moe``, ``DeepseekV3MoE``, ``Qwen2MoeSparseMoeBlock``,
``Qwen3MoeSparseMoeBlock``, ``MixtralSparseMoeBlock``, ...: a module with a ``gate`` router and an
``experts`` child). Its forward runs the router where the block lives, submits the routed experts (a
``KExperts`` wrapper, typically on the CPU) asynchronously, runs the shared experts meanwhile (on the GPU),
then syncs and adds: the same arithmetic as the block's own forward, in an order that overlaps the two.

``transfer_map`` (``{layer_index: device}``; a rule file entry ``- transfer_map: {30: "cuda:1"}`` or
``load_model(..., transfer_map=...)``) puts decoder layers ``i`` onward on the given device: inside those
layers every non-CPU device the rules name becomes that device (what the rules put on the CPU, such as
routed experts, stays there), and forward pre-hooks move the hidden states (and every other tensor
argument) to a layer's device as it is entered, and back to the final norm's device after the last layer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .modules import KExperts, KModule, module_role


class KMoE(KModule):
    """A sparse MoE block whose routed experts overlap its shared experts.

    ``forward(hidden_states[..., H]) -> [..., H]``: router on the block's device -> ``experts.submit`` ->
    shared experts (``shared_experts``, or ``shared_expert`` gated by ``sigmoid(shared_expert_gate(x))``)
    -> ``experts.sync()`` -> routed + shared. Rule option ``overlap`` (default true): false runs the routed
    experts to completion before the shared ones (for measuring what the overlap brings).
    """

    role = "moe"
    uses_ops = False
    rule_options = ("overlap",)

    def __init__(self, original: nn.Module, *, overlap: bool = True, name: str = "", build: bool = True):
        nn.Module.__init__(self)
        self._adopt(original, name)
        if not self.accepts(original):
            raise ValueError(f"KMoE {name}: {type(original).__name__} has no 'gate' and 'experts' children; "
                             "KMoE replaces sparse MoE blocks")
        problem = self.check_option("overlap", overlap)
        if problem:
            raise ValueError(f"KMoE {name}: {problem}")
        self.overlap = overlap
        self.prefill_op = self.generate_op = None

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return module_role(module) == "moe"

    @classmethod
    def check_option(cls, key: str, value: Any) -> str | None:
        if key == "overlap" and not isinstance(value, bool):
            return f"overlap must be true or false, got {value!r}"
        return None

    def build_ops(self) -> None:
        """No ops of its own: its children (router, experts wrapper, shared experts) run themselves."""

    def ops(self) -> list:
        return []

    def extra_repr(self) -> str:
        return f"overlap={self.overlap}"

    def shared_output(self, hidden_states: torch.Tensor, flat: torch.Tensor) -> torch.Tensor | None:
        """The shared experts' contribution (``None`` for blocks without shared experts), computed on the
        same tensors, in the same order, as the block's own forward."""
        modules = self._modules
        if modules.get("shared_experts") is not None:  # DeepSeek: applied to the unflattened input
            return modules["shared_experts"](hidden_states)
        if modules.get("shared_expert") is not None:  # Qwen2-MoE: a sigmoid-gated shared expert
            out = modules["shared_expert"](flat)
            gate = modules.get("shared_expert_gate")
            return out if gate is None else F.sigmoid(gate(flat)) * out
        return None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.training:  # router jitter and auxiliary losses: the block's own training path
            return type(self.original).forward(self.original, hidden_states)
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        routing = self.gate(flat)
        if not (isinstance(routing, tuple) and len(routing) == 3):
            raise TypeError(f"KMoE {self.qualname}: the router {type(self.gate).__name__} returned "
                            f"{type(routing).__name__}, expected (logits, top_k_weights, top_k_index)")
        _, top_k_weights, top_k_index = routing
        experts = self.experts
        if not (self.overlap and isinstance(experts, KExperts)):
            routed = experts(flat, top_k_index, top_k_weights)
            shared = self.shared_output(hidden_states, flat)
        else:
            experts.submit(flat, top_k_index, top_k_weights)
            try:
                shared = self.shared_output(hidden_states, flat)
            finally:
                routed = experts.sync()  # also drains the experts when the shared ones raised
        routed = routed.to(hidden_states.device).reshape(shape)
        return routed if shared is None else routed + shared.reshape(shape)


# -- transfer_map -----------------------------------------------------------------------------------------


def parse_transfer_map(value: Any) -> tuple[dict[int, torch.device], list[str]]:
    """``{layer_index: device}`` from a rule file or a caller, and the problems found (one string each)."""
    if not isinstance(value, Mapping):
        return {}, [f"must be a mapping of layer index to device (e.g. {{30: 'cuda:1'}}), got {value!r}"]
    result, problems = {}, []
    for key, device in value.items():
        index = key if isinstance(key, int) and not isinstance(key, bool) else None
        if index is None and isinstance(key, str) and key.isdigit():
            index = int(key)
        if index is None or index < 0:
            problems.append(f"layer index {key!r} is not an integer >= 0")
            continue
        try:
            result[index] = torch.device(device)
        except (RuntimeError, TypeError):
            problems.append(f"layer {index}: {device!r} is not a torch device such as cuda:1")
    return result, problems


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The qualified name and the ``ModuleList`` of a Transformers model's decoder layers."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers":
            return name, module
    raise ValueError(f"{type(model).__name__} has no ModuleList named 'layers' (its decoder layers), "
                     "which a transfer_map needs")


class LayerDevices:
    """A transfer map resolved against one model: which device each decoder layer's modules move to."""

    def __init__(self, model: nn.Module, transfer_map: Mapping[int, torch.device | str]):
        self.prefix, layers = decoder_layers(model)
        self.num_layers = len(layers)
        bad = sorted(i for i in transfer_map if not 0 <= int(i) < self.num_layers)
        if bad:
            raise ValueError(f"transfer_map names layer(s) {bad}, but {type(model).__name__} has layers "
                             f"0..{self.num_layers - 1}")
        self.boundaries = sorted((int(i), torch.device(d)) for i, d in transfer_map.items())
        self._layer_re = re.compile(rf"^{re.escape(self.prefix)}\.(\d+)(?:\.|$)")

    def layer_device(self, index: int) -> torch.device | None:
        """The device of layer ``index`` (from the last boundary at or before it), ``None`` if before all."""
        device = None
        for start, target in self.boundaries:
            if start <= index:
                device = target
        return device

    def target(self, qualname: str) -> torch.device | None:
        """The device that the non-CPU modules under ``qualname`` move to (``None``: not inside a moved layer)."""
        match = self._layer_re.match(qualname)
        return self.layer_device(int(match.group(1))) if match else None

    @staticmethod
    def remap(device: torch.device | None, target: torch.device | None) -> torch.device | None:
        """``device`` as it is inside a layer moved to ``target``: every non-CPU device becomes the target."""
        if device is None or target is None or device.type == "cpu":
            return device
        return target

    def moved_layers(self) -> list[tuple[str, torch.device]]:
        """``(qualified name, device)`` of every layer from the first boundary on."""
        return [(f"{self.prefix}.{i}", self.layer_device(i)) for i in range(self.num_layers)
                if self.layer_device(i) is not None]


def _move_tensors(value: Any, device: torch.device) -> Any:
    """Every tensor inside ``value`` (nested tuples, lists, dicts) on ``device``; the pre-hooks call this
    once per call."""
    return _moved(value, device)


def _moved(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device)
    if isinstance(value, tuple):
        moved = [_moved(v, device) for v in value]
        return type(value)(*moved) if hasattr(value, "_fields") else tuple(moved)  # namedtuples too
    if isinstance(value, list):
        return [_moved(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _moved(v, device) for k, v in value.items()}
    return value


def _module_device(module: nn.Module) -> torch.device | None:
    for tensor in (*module.parameters(), *module.buffers()):
        if not tensor.is_meta:
            return tensor.device
    return None


class MoveInputs:
    """Forward pre-hook: every tensor argument of the call moves to ``device`` (``None``: to the device of
    the module's own first parameter, looked up per call, since hooks are placed before weights load).
    ``calls`` counts the calls it handled."""

    def __init__(self, device: torch.device | None = None):
        self.device = device
        self.calls = 0

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        self.calls += 1
        device = self.device or _module_device(module)
        if device is None:
            return None
        return _move_tensors((args, kwargs), device)


def install_transfer_hooks(model: nn.Module, layer_devices: LayerDevices) -> list[tuple[str, MoveInputs]]:
    """Pre-hooks on every moved decoder layer (each call's tensors go to its device; the decoder loop
    hands every layer the same position embeddings and mask, so each moved layer needs its own) and on
    the final norm after the layers (hidden states back to where it lives). Returns ``(name, hook)``."""
    modules = dict(model.named_modules())
    hooks = []
    for name, device in layer_devices.moved_layers():
        hooks.append((name, MoveInputs(device)))
    parent_name = layer_devices.prefix.rpartition(".")[0]
    parent = modules.get(parent_name)
    norm = getattr(parent, "norm", None) if parent is not None else None
    if isinstance(norm, nn.Module) and hooks:
        hooks.append((f"{parent_name}.norm" if parent_name else "norm", MoveInputs(None)))
    for name, hook in hooks:
        modules[name].register_forward_pre_hook(hook, with_kwargs=True)
    return hooks
