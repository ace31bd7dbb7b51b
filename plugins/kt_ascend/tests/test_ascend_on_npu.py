"""The ops on a real Ascend NPU against the same ops run with ``ReferenceKernels`` on the CPU (the
documented formula in torch). Skipped, with the reason, where torch_npu or an NPU is absent."""

import pytest
import torch
from ascend_samples import quantized
from torch import nn

from kt_ascend._env import npu_unavailable_reason
from kt_ascend.experts import KExpertsAscend
from kt_ascend.linear import KLinearAscend
from kt_ascend.quant_matrix import ReferenceKernels

REASON = npu_unavailable_reason("npu")
pytestmark = [pytest.mark.npu, pytest.mark.skipif(REASON is not None, reason=f"no Ascend NPU: {REASON}")]


def linear(device, kernels, ggml_type, compute_dtype):
    with torch.device("meta"):
        module = nn.Linear(512, 128, bias=False)
    op = KLinearAscend(module, device, compute_dtype=compute_dtype)
    op.kernels = kernels
    op.load({"weight": quantized(ggml_type, (128, 512), seed=7)})
    return op


@pytest.mark.parametrize("ggml_type", ["Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q8_0"])
@pytest.mark.parametrize("compute_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("tokens", [1, 37])
def test_linear_on_npu_matches_the_reference(ggml_type, compute_dtype, tokens):
    x = torch.randn(tokens, 512) * 0.5
    npu_op = linear("npu", None, ggml_type, compute_dtype)
    cpu_op = linear("cpu", ReferenceKernels, ggml_type, compute_dtype)
    assert npu_op.matrix.quantized
    got = npu_op(x.to("npu")).float().cpu()
    expected = cpu_op(x).float()
    tol = (4e-3 if compute_dtype == "float16" else 3e-2) * float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=0, atol=tol)


def test_experts_on_npu_match_the_reference():
    module = nn.Module()
    module.act_fn = nn.SiLU()
    weights = {
        "gate_proj": quantized("Q4_K", (4, 256, 256), seed=1),
        "up_proj": quantized("Q4_K", (4, 256, 256), seed=2),
        "down_proj": quantized("Q8_0", (4, 256, 256), seed=3),
    }
    ops = []
    for device, kernels in (("npu", None), ("cpu", ReferenceKernels)):
        op = KExpertsAscend(module, device)
        op.kernels = kernels
        op.load(weights)
        ops.append(op)
    x = torch.randn(6, 256) * 0.1
    index = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]])
    w = torch.rand(6, 2)
    got = ops[0](x.to("npu"), index.to("npu"), w.to("npu")).cpu()
    expected = ops[1](x, index, w)
    torch.testing.assert_close(got, expected, rtol=0, atol=5e-3 * float(expected.abs().max()))
