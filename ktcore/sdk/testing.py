"""Test helpers for plugin authors: check a new op against ktcore's torch reference of its role, seeded
GGUF tensors, and a config for every model type a shipped rule file serves.

```python
from ktcore.sdk.testing import check_op, quantized_sample

with torch.device("meta"):
    module = torch.nn.Linear(512, 256, bias=False)
check_op(KLinearMine, module, {"weight": quantized_sample("Q4_K", (256, 512))}, torch.randn(3, 512))
```
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..builtin.attention import KAttentionMLA, KAttentionSDPA  # noqa: F401 (references of the roles)
from ..builtin.experts import KExpertsTorch
from ..builtin.linear import KLinearTorch
from ..ops import Op
from ..testing import MODEL_TYPES, gguf_reference, quantized_moe_weights, quantized_sample, tiny_config

__all__ = ["check_op", "chosen_backends", "config_for", "gguf_reference", "quantized_moe_weights", "quantized_sample"]

# the torch op that defines each weight-carrying role's result
REFERENCES: dict[str, type[Op]] = {"linear": KLinearTorch, "experts": KExpertsTorch}


def check_op(op_cls: type[Op], module: nn.Module, weights: Mapping, *inputs: torch.Tensor, device="cpu",
             rtol: float = 1e-2, **op_kwargs) -> float:
    """Build ``op_cls`` for ``module`` (a meta module of the role) on ``device``, load ``weights`` and run it
    on ``inputs``; compare with the role's torch reference (float32, CPU, same weights dequantized) and
    assert ``|got - expected| / |expected| <= rtol`` (Frobenius norms). Returns the relative error."""
    if op_cls.role not in REFERENCES:
        raise ValueError(f"no torch reference for role {op_cls.role!r}; roles with one: {', '.join(REFERENCES)}")
    reference = REFERENCES[op_cls.role](module, "cpu", dtype=torch.float32)
    reference.load(weights)
    expected = reference(*[x.detach().to("cpu", torch.float32) if x.is_floating_point() else x.cpu() for x in inputs])
    op = op_cls(module, device, **op_kwargs)
    op.load(weights)
    op.post_load()
    got = op(*[x.to(device) for x in inputs]).detach().to("cpu", torch.float32)
    if got.shape != expected.shape:
        raise AssertionError(f"{op_cls.name}: output shape {tuple(got.shape)}, the reference's {tuple(expected.shape)}")
    err = float((got - expected).norm() / expected.norm().clamp_min(1e-30))
    assert err <= rtol, f"{op_cls.name} ({op_cls.plugin or 'unregistered'}): relative error {err:.3g} > {rtol} against {reference.name}"
    return err


def config_for(model_type: str):
    """A small Transformers config of ``model_type``: ktcore's tiny test config where one exists, else
    Transformers' default config with two layers (build it on the meta device)."""
    from transformers import AutoConfig

    family = {t: f for f, t in MODEL_TYPES.items()}.get(model_type)
    if family is not None:
        return tiny_config(family)
    return AutoConfig.for_model(model_type, num_hidden_layers=2)


def chosen_backends(path, registry, **load_options) -> dict[str, str]:
    """``{op name: plugin}`` of the backends a rule file's rules choose for their generate ops, after checking
    that every rule matches a module of a meta model of the file's model type (``<model_type>[-<variant>]-<layout>.yaml``).
    ``load_options`` go to ``load_rules`` (``check_devices=False, gpu="xpu"``: as on another machine)."""
    from ..inject import build_meta_model, inject
    from ..rule_selection import parse_rule_file_name
    from ..rules import load_rules

    rules = load_rules(path, registry, **load_options)
    model_type = parse_rule_file_name(path.name)[0]
    inject(build_meta_model(config_for(model_type)), rules, registry, build_ops=False)  # raises on a rule matching nothing
    return {r.op_names[1]: r.options["generate_op"].plugin for r in rules if r.op_names}
