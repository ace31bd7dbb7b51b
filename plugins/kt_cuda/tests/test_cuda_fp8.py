"""FP8 e4m3 block-scaled GEMM (``KLinearFP8``) against a float64 product of the same quantized operands.

The reference dequantizes exactly the FP8 values and scales the kernel uses, so the only differences
are accumulation order and the tensor cores' FP8 accumulation: relative error < 1e-3 there; against the
unquantized float product, FP8 rounding itself gives < 6e-2.
"""

import pytest
import torch
from torch import nn

from cuda_test_helpers import rel_err
from kt_cuda import fp8
from ktcore.weights.tensor import QuantizedTensor


def test_weight_blocks_roundtrip_on_cpu():
    torch.manual_seed(0)
    w = torch.randn(200, 384)
    q, scale = fp8.quantize_weight(w)
    assert q.dtype == fp8.FP8 and q.shape == w.shape and scale.shape == (2, 3)
    assert rel_err(fp8.dequantize_weight(q, scale), w) < 0.05
    a, a_scale = fp8.quantize_activation(w[:5])
    assert a_scale.shape == (5, 3) and rel_err(fp8.dequantize_activation(a, a_scale), w[:5]) < 0.05


def _gpu(device):
    if device.type != "cuda":
        pytest.skip("FP8 tensor-core products need a CUDA GPU (the interpreter has no float8)")
    if torch.cuda.get_device_capability(device) < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9+")


@pytest.mark.parametrize("M,N,K", [(1, 128, 256), (5, 200, 384), (16, 64, 128), (70, 300, 512)])
def test_kernel_matches_reference(device, M, N, K):
    _gpu(device)
    from kt_cuda.triton_fp8 import fp8_block_matmul

    torch.manual_seed(M + N)
    w = torch.randn(N, K, device=device)
    x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
    bias = torch.randn(N, device=device)
    wq, ws = fp8.quantize_weight(w)
    out = fp8_block_matmul(x, wq, ws, bias)
    assert out.shape == (M, N) and out.dtype == torch.bfloat16
    xq, xs = fp8.quantize_activation(x)
    ref = fp8.dequantize_activation(xq, xs).double() @ fp8.dequantize_weight(wq, ws).double().T + bias.double()
    assert rel_err(out, ref) < 1e-2  # output rounded to bf16
    out32 = fp8_block_matmul(x.float(), wq, ws, bias)
    assert rel_err(out32, ref) < 1e-3
    assert rel_err(out32, x.double() @ w.double().T + bias.double()) < 6e-2


def test_op_loads_fp8_checkpoint_tensors_and_other_types(device):
    _gpu(device)
    from kt_cuda.ops import KLinearFP8

    torch.manual_seed(3)
    N, K = 192, 256
    w = torch.randn(N, K)
    wq, ws = fp8.quantize_weight(w)
    with torch.device("meta"):
        module = nn.Linear(K, N, bias=False, dtype=torch.bfloat16)
    fp8_weights = {
        "weight": QuantizedTensor("weight", "F8_E4M3", (N, K), wq.view(torch.uint8).reshape(-1), "test"),
        "weight_scale_inv": QuantizedTensor("weight_scale_inv", "F32", tuple(ws.shape), ws.reshape(-1).view(torch.uint8), "test"),
    }
    op = KLinearFP8(module, device)
    op.load(fp8_weights)
    x = torch.randn(2, 3, K, device=device, dtype=torch.bfloat16)
    out = op(x)
    assert out.shape == (2, 3, N)
    ref = x.double() @ fp8.dequantize_weight(wq, ws).double().to(device).T
    assert rel_err(out, ref) < 6e-2
    op16 = KLinearFP8(module, device)
    op16.load({"weight": QuantizedTensor("weight", "F16", (N, K), w.half().reshape(-1).view(torch.uint8), "test")})
    assert rel_err(op16(x), x.double() @ w.double().to(device).T) < 6e-2


def test_rejects_in_features_not_multiple_of_128():
    from kt_cuda.ops import KLinearFP8

    with torch.device("meta"):
        module = nn.Linear(200, 64)
    with pytest.raises(ValueError, match="multiple of 128"):
        KLinearFP8(module, "cuda")
