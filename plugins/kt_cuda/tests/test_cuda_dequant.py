"""Triton GGUF dequantizers: bit-exact with gguf.quants in float32, and with ktcore's torch dequantizers."""

import importlib.util
from pathlib import Path

import pytest
import torch

from cuda_test_helpers import half_dtypes, run_interpreted
from cuda_ggml_samples import ggml_tensor

LOWBIT = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "TQ1_0", "TQ2_0", "MXFP4"]
TYPES = ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", *LOWBIT]

INTERPRETED = r"""
import sys
sys.path.insert(0, %r)
import torch
from cuda_ggml_samples import ggml_tensor
from kt_cuda.triton_dequant import dequantize

for ggml_type in %r:
    for shape in [(3, 512), (9, 256)]:  # 9 rows: a partial last program
        qt, ref = ggml_tensor(shape, ggml_type, seed=shape[0])
        out = dequantize(qt.data, ggml_type, shape, torch.float32)
        assert torch.equal(out, ref), (ggml_type, shape, (out != ref).sum().item())
    print(ggml_type)
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_lowbit_kernels_bit_exact_interpreted():
    """The low-bit kernels (lattice lookups, packed signs, split scales) in Triton's interpreter on the CPU."""
    run_interpreted(INTERPRETED % (str(Path(__file__).parent), LOWBIT))


@pytest.mark.parametrize("ggml_type", TYPES)
@pytest.mark.parametrize("shape", [(3, 512), (1, 256), (67, 768)])  # 67 rows: a partial last program
def test_bit_exact_with_gguf(device, ggml_type, shape):
    from kt_cuda.triton_dequant import dequantize

    qt, ref = ggml_tensor(shape, ggml_type, seed=shape[0])
    out = dequantize(qt.data.to(device), ggml_type, shape, torch.float32)
    assert out.shape == shape and out.device.type == device.type
    assert torch.equal(out.cpu(), ref)


@pytest.mark.parametrize("ggml_type", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("dtype", half_dtypes())
def test_output_dtype_is_rounded_once(device, ggml_type, dtype):
    from kt_cuda.triton_dequant import dequantize

    qt, ref = ggml_tensor((4, 512), ggml_type, seed=5)
    out = dequantize(qt.data.to(device), ggml_type, qt.shape, dtype)
    assert out.dtype == dtype and torch.equal(out.cpu(), ref.to(dtype))


def test_registered_through_the_hook_and_used_by_ktcore(device):
    from ktcore.weights import dequant
    from kt_cuda import plugin

    seen = {}
    plugin.register_dequantizers(lambda t, dev, fn: seen.setdefault((t, dev), fn))
    if device.type != "cuda":
        assert seen == {}  # registered only where CUDA and Triton are
        return
    assert {t for t, _ in seen} == set(TYPES) and {d for _, d in seen} == {"cuda"}
    qt, ref = ggml_tensor((8, 256), "Q4_K", seed=9)
    for (t, dev), fn in seen.items():
        dequant.register_dequantizer(t, dev, fn)
    out = dequant.dequantize_raw(qt.data, "Q4_K", qt.shape, torch.float32, device)
    assert torch.equal(out.cpu(), ref)
