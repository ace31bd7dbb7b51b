"""The ops on a real Intel GPU against the same ops with ``ReferenceKernels`` on the CPU. Skipped, with
the reason, where there is no XPU."""

import pytest
import torch
from torch import nn

from kt_xpu._env import int4_kernels_missing, xpu_unavailable_reason
from kt_xpu.experts import KExpertsXPU
from kt_xpu.linear import KLinearXPU
from kt_xpu.quant_matrix import ReferenceKernels
from ktcore.testing import quantized_sample as quantized

REASON = xpu_unavailable_reason("xpu") or int4_kernels_missing()
pytestmark = [pytest.mark.xpu, pytest.mark.skipif(REASON is not None, reason=f"no usable XPU: {REASON}")]


def linear(device, kernels, ggml_type, compute_dtype):
    with torch.device("meta"):
        module = nn.Linear(512, 128, bias=False)
    op = KLinearXPU(module, device, compute_dtype=compute_dtype)
    op.kernels = kernels
    op.load({"weight": quantized(ggml_type, (128, 512), seed=7)})
    return op


@pytest.mark.parametrize("ggml_type", ["Q4_0", "Q4_1", "Q4_K"])
@pytest.mark.parametrize("compute_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("tokens", [1, 37])
def test_linear_on_xpu_matches_the_reference(ggml_type, compute_dtype, tokens):
    x = torch.randn(tokens, 512) * 0.5
    xpu_op = linear("xpu", None, ggml_type, compute_dtype)
    assert xpu_op.matrix.quantized
    got = xpu_op(x.to("xpu")).float().cpu()
    expected = linear("cpu", ReferenceKernels, ggml_type, compute_dtype)(x).float()
    tol = (4e-3 if compute_dtype == "float16" else 3e-2) * float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=0, atol=tol)


def test_experts_on_xpu_match_the_reference():
    module = nn.Module()
    module.act_fn = nn.SiLU()
    weights = {p: quantized("Q4_K", (4, 256, 256), seed=i) for i, p in enumerate(("gate_proj", "up_proj", "down_proj"))}
    ops = []
    for device, kernels in (("xpu", None), ("cpu", ReferenceKernels)):
        op = KExpertsXPU(module, device)
        op.kernels = kernels
        op.load(weights)
        ops.append(op)
    x = torch.randn(6, 256) * 0.1
    index = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]])
    w = torch.rand(6, 2)
    got = ops[0](x.to("xpu"), index.to("xpu"), w.to("xpu")).cpu()
    expected = ops[1](x, index, w)
    torch.testing.assert_close(got, expected, rtol=0, atol=5e-3 * float(expected.abs().max()))
