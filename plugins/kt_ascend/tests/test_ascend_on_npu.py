"""The ops on a real Ascend NPU against the same ops run with ``ReferenceKernels`` on the CPU (the
documented formula in torch). Skipped, with the reason, where torch_npu or an NPU is absent."""

import pytest
import torch
from torch import nn

from kt_ascend._env import npu_unavailable_reason
from kt_ascend.experts import KExpertsAscend
from kt_ascend.linear import KLinearAscend
from kt_ascend.quant_matrix import ReferenceKernels
from ktcore.testing import quantized_sample as quantized

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


@pytest.mark.parametrize("q_len", [7, 1])
@pytest.mark.parametrize("causal_mask", [False, True])
def test_attention_kernels_match_the_reference(q_len, causal_mask):
    from kt_ascend.attention import AscendAttentionKernels, ReferenceAttentionKernels, masked_positions

    g = torch.Generator().manual_seed(q_len)
    q = torch.randn(2, 8, q_len, 128, generator=g).half()
    k = torch.randn(2, 2, 19, 128, generator=g).half()
    v = torch.randn(2, 2, 19, 128, generator=g).half()
    allowed = torch.ones(q_len, 19, dtype=torch.bool).tril(19 - q_len)[None, None].expand(2, 1, -1, -1)
    masked = masked_positions(allowed) if causal_mask else None
    results = []
    for kernels, device in ((AscendAttentionKernels, "npu"), (ReferenceAttentionKernels, "cpu")):
        args = [t.to(device) for t in (q, k, v)]
        mask = None if masked is None else masked.to(device)
        if q_len == 1:
            out = kernels.incre_flash_attention(*args, num_heads=8, num_kv_heads=2, atten_mask=mask, scale=128**-0.5)
        else:
            out = kernels.fusion_attention(*args, head_num=8, atten_mask=mask, scale=128**-0.5, sparse_mode=0)
        results.append(out.float().cpu())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=2e-3)


def test_rotary_mul_matches_the_reference():
    from kt_ascend.attention import AscendAttentionKernels, ReferenceAttentionKernels

    x = torch.randn(1, 4, 9, 128).half()
    angles = torch.randn(1, 1, 9, 128)
    cos, sin = angles.cos().half(), angles.sin().half()
    got = AscendAttentionKernels.rotary_mul(x.npu(), cos.npu(), sin.npu()).float().cpu()
    torch.testing.assert_close(got, ReferenceAttentionKernels.rotary_mul(x.float(), cos.float(), sin.float()), rtol=0, atol=2e-3)
