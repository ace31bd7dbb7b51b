"""On a real AMD GPU under ROCm: the ops report themselves available and the Triton kernels compile for the
AMD target and agree with the torch reference. Skipped, with the reason, anywhere else (test_triton_hip.py
runs the same code path on any GPU Triton drives)."""

import pytest
import torch
from rocm_samples import rel_err
from torch import nn

from kt_rocm._env import rocm_unavailable_reason
from kt_rocm.ops import KExpertsROCm, KLinearROCm
from ktcore.testing import gguf_reference as reference, quantized_sample as quantized

REASON = rocm_unavailable_reason("cuda")
pytestmark = [pytest.mark.rocm, pytest.mark.skipif(REASON is not None, reason=f"no AMD GPU under ROCm: {REASON}")]


def test_ops_are_available_and_resolved_by_the_registry():
    from ktcore.registry import Registry

    registry = Registry()
    for role, op in (("linear", KLinearROCm), ("experts", KExpertsROCm)):
        assert op.available("cuda") is None
        assert registry.resolve(role, op.name, "cuda") is op  # preferred over kt-cuda's and torch's backends
    assert registry.resolution("attention", "KAttentionSDPA", "cuda").chosen.plugin == "torch"  # ROCm's own SDPA


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 8, 300])
def test_int4_linear_compiles_for_this_gpu_and_matches(dtype, tokens):
    with torch.device("meta"):
        module = nn.Linear(4096, 1024, bias=False, dtype=dtype)
    qt = quantized("Q4_K", (1024, 4096), seed=5)
    op = KLinearROCm(module, "cuda")
    op.load({"weight": qt})
    x = (torch.randn(tokens, 4096) * 0.5).to("cuda", dtype)
    tol = 2e-3 if dtype == torch.float16 else 1e-2
    assert rel_err(op(x), x.double().cpu() @ reference(qt).double().T) < tol
