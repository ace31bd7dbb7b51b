"""kt-rocm's code path (kt-cuda's Triton kernels launched with the HIP configurations, through KLinearROCm
and KExpertsROCm) against torch references. Runs on any GPU Triton drives, so an NVIDIA GPU checks the
same code an AMD GPU runs; what it cannot check is the AMD compilation itself (see test_on_rocm.py).

Tolerances (relative Frobenius error): float16 activations 2e-3, against float64 products of the same
weights; the experts op 1e-2 in bfloat16 (1e-2 float16 in the interpreter), against KExpertsTorch.
"""

import pytest
import torch
from rocm_samples import rel_err
from torch import nn

from kt_rocm.hip_configs import DENSE_FROM_ROWS, HIP_MAX_WARPS, HIP_NUM_STAGES, LDS_BYTES, hip_int4_config, lds_bytes
from kt_rocm.ops import KExpertsROCm, KLinearROCm
from ktcore.testing import gguf_reference as reference, quantized_sample as quantized

torch.set_num_threads(2)


@pytest.mark.parametrize("M", [1, 2, 16, 17, 255, 256, 4096])
@pytest.mark.parametrize("group", [32, 128])
def test_hip_configs_respect_the_amd_limits(M, group):
    pytest.importorskip("triton", reason="kt-cuda's Int4Config lives in its Triton module")
    cfg = hip_int4_config(M, group)
    assert cfg.kernel == ("gemv" if M == 1 else "gemm" if M < DENSE_FROM_ROWS else "dense")
    if cfg.kernel != "dense":
        assert cfg.num_warps <= HIP_MAX_WARPS and cfg.num_stages == HIP_NUM_STAGES and cfg.split_k == 1
        assert cfg.block_k % group == 0
    if cfg.kernel == "gemm":
        assert lds_bytes(cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_stages) <= LDS_BYTES // 2


@pytest.mark.parametrize("M,N,K,group", [(1, 37, 512, 32), (5, 72, 256, 64), (33, 40, 384, 128), (70, 136, 256, 32), (260, 24, 256, 32)])
def test_int4_matmul_with_hip_configs(device, M, N, K, group):
    from kt_cuda import int4
    from kt_cuda.triton_int4 import int4_matmul

    torch.manual_seed(M + N)
    w = int4.quantize(torch.randn(N, K), group).to(device)
    x = torch.randn(M, K).to(device, torch.float16)
    bias = torch.randn(N, device=device)
    out = int4_matmul(x, w, bias, hip_int4_config(M, group))
    ref = x.double() @ w.dequantize(torch.float64).T + bias.double()
    assert out.dtype == torch.float16 and rel_err(out, ref) < 2e-3


def _linear(in_f, out_f, bias):
    with torch.device("meta"):
        return nn.Linear(in_f, out_f, bias=bias, dtype=torch.float16)


@pytest.mark.parametrize("ggml_type", ["Q4_0", "Q4_1", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("tokens", [1, 70, 130])
def test_klinear_rocm_on_gguf_weights(device, ggml_type, tokens):
    qt = quantized(ggml_type, (48, 512), seed=11, name="blk.0.attn_q.weight")
    op = KLinearROCm(_linear(512, 48, False), device)  # built directly: available() is the rule's check
    op.load({"weight": qt})
    assert (op.weight_int4 is not None) == (ggml_type != "Q6_K")
    x = (torch.randn(2, tokens, 512) * 0.5).to(device, torch.float16)
    out = op(x)
    assert out.shape == (2, tokens, 48) and out.dtype == torch.float16
    assert rel_err(out, x.double().cpu() @ reference(qt).double().T) < 2e-3


@pytest.mark.parametrize("tokens,top_k", [(1, 2), (37, 3)])
def test_kexperts_rocm_matches_kexperts_torch(device, tokens, top_k):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    from ktcore.builtin.experts import KExpertsTorch

    E, H, I = 4, 256, 256
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16  # numpy (the interpreter) has no bf16
    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=top_k, hidden_act="silu")
    with torch.device("meta"):
        module = Qwen3MoeExperts(cfg).to(dtype)
    weights = {
        "gate_proj": quantized("Q4_K", (E, I, H), seed=1, name="gate_proj"),
        "up_proj": quantized("Q4_0", (E, I, H), seed=2, name="up_proj"),
        "down_proj": quantized("Q8_0", (E, H, I), seed=3, name="down_proj"),
    }
    ref_op = KExpertsTorch(module, "cpu", dtype=torch.float32)
    ref_op.load(weights)
    op = KExpertsROCm(module, device)
    op.load(weights)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, H, generator=g) * 0.1
    index = torch.stack([torch.randperm(E, generator=g)[:top_k] for _ in range(tokens)])
    index[0, -1] = E  # an expert held elsewhere contributes nothing
    routing = torch.rand(tokens, top_k, generator=g)
    out = op(x.to(device, dtype), index.to(device), routing.to(device))
    assert out.shape == (tokens, H) and out.dtype == dtype
    assert rel_err(out.float(), ref_op(x, index, routing)) < 1e-2
