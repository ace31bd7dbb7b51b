"""The one-launch int4 GEMV of ``kt_cuda.triton_w4_one`` for 1-4 rows: ``a8one`` (int8 activations).

It must compute what ``a8gemv`` computes (the same int8 rounding of the activations, done inside the GEMV):
bit for bit at one K split with the same tile, within float reassociation with split K (partials summed in
split order instead of fp32 atomics), and the exact product of the int4 weight with the rounded activations
(``quantize_activations`` / ``dequantize_activations``) against a float64 reference. Cases: 1-4 rows (a
row block with missing rows), odd N, K not a multiple of BLOCK_K, splits 1-3 (one with no K tile),
asymmetric / symmetric groups of 32/64/128, with and without bias.

Two tiers as in ``test_cuda_int4_wtc.py``: Triton's interpreter on CPU (a subprocess with
``TRITON_INTERPRET=1``, dp4a emulated; skipped where CUDA runs the kernels compiled) and a CUDA GPU
(float16 and bfloat16, the autotuner's candidates, a CUDA-graph replay of split K)."""

import importlib.util

import pytest
import torch

from cuda_test_helpers import rel_err, run_interpreted

from kt_cuda import int4

INTERPRETED = r"""
import torch
from kt_cuda import int4
from kt_cuda.triton_int4 import Int4Config as C, int4_matmul
from kt_cuda.triton_w4_tc import _SCRATCH
from kt_cuda.triton_w4a8 import dequantize_activations, quantize_activations

torch.manual_seed(0)
N, K = 21, 384  # N not a multiple of any block; K = 1.5 tiles of 256, 3 tiles of 128
cases = [  # group, symmetric, M, bias, config
    (32, False, 1, True, C("a8one", 8, 128, 1, block_m=1)),
    (32, True, 1, False, C("a8one", 4, 256, 2, block_m=1)),  # 2 tiles (the second half empty), 2 splits
    (64, False, 3, True, C("a8one", 16, 128, 2, block_m=4)),  # a missing row in the block
    (64, True, 2, True, C("a8one", 8, 256, 3, block_m=2, prefetch=False)),  # a split with no K tile
    (128, False, 4, False, C("a8one", 32, 128, 3, block_m=4)),
    (128, True, 2, True, C("a8one", 8, 128, 1, block_m=1)),  # two row programs
    (32, False, 2, True, C("a8one", 8, 128, 2, block_m=2)),  # float32 activations (below)
]
for i, (group, symmetric, M, with_bias, cfg) in enumerate(cases):
    w = int4.quantize(torch.randn(N, K), group, symmetric=symmetric)
    x = torch.randn(M, K) if i == len(cases) - 1 else torch.randn(M, K).half()
    bias = torch.randn(N) if with_bias else None
    lo, hi, dx, xs = quantize_activations(x)
    x_hat = dequantize_activations(dx, lo, hi).double()
    exact = x_hat @ w.dequantize(torch.float64).T  # int4 weights x the int8-rounded activations
    if with_bias:
        exact = exact + bias.double()
    out = int4_matmul(x, w, bias, cfg)
    err = ((out.double() - exact).norm() / exact.norm()).item()
    twin = C("a8gemv", cfg.block_n, cfg.block_k, cfg.split_k, block_m=cfg.block_m, prefetch=cfg.prefetch)
    ref = int4_matmul(x, w, bias, twin)
    diff = (out.float() - ref.float()).abs().max().item()
    print(cfg.label(), group, symmetric, M, f"{err:.1e} {diff:.1e}")
    assert out.shape == (M, N) and out.dtype == x.dtype
    assert err < 2e-3, (cfg.label(), group, symmetric, M, err)
    if cfg.split_k == 1:
        assert torch.equal(out, ref), (cfg.label(), diff)  # the same rounding, the same sums in the same order
    else:
        assert torch.allclose(out.float(), ref.float(), rtol=2e-3, atol=2e-2), (cfg.label(), diff)
        assert torch.equal(int4_matmul(x, w, bias, cfg), out)  # partials summed in split order
    assert all(int(cnt.abs().sum()) == 0 for _, cnt in _SCRATCH.values()), "split-K counters not reset"

print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (its interpreter runs the kernels on CPU)")
def test_one_launch_kernels_in_triton_interpreter():
    run_interpreted(INTERPRETED)


def test_one_launch_labels_and_candidates():
    from kt_cuda.triton_int4 import Int4Config as C, candidates

    assert C("a8one", 8, 1024, 2, 4, block_m=1).label() == "a8one:m1n8k1024s2w4st3"
    assert C("a8one", 8, 1024, 1, 4, block_m=4, prefetch=False).label() == "a8one0:m4n8k1024s1w4st3"
    for M in (1, 2, 3, 4):
        cands = candidates(M, 32, act_int8=True)
        kinds = [c.kernel for c in cands]
        assert kinds[0] == "a8one" and "a8gemv" in kinds  # the one-launch kernel won the H200 sweep
        assert kinds.index("a8gemv") > max(i for i, k in enumerate(kinds) if k == "a8one")  # two launches after
        assert all(c.block_m == (1 if M == 1 else (2 if M == 2 else 4)) for c in cands if c.kernel == "a8one")
    # float activations (the default) never round to int8; K-major bytes and 5+ rows keep their kernels
    assert not any(c.kernel == "a8one" for M in (1, 4) for c in candidates(M, 32))
    for M in (1, 3, 4):
        assert {c.kernel for c in candidates(M, 32)} == {"wgemv"}  # float activations: the swept wgemv tiles
    assert not any(c.kernel == "a8one" for c in candidates(4, 32, k_major=True, act_int8=True))
    assert not any(c.kernel == "a8one" for c in candidates(5, 32, act_int8=True))


def _exact(x, w, bias):
    """float64 product of the int4 weight with ``x`` rounded as ``a8gemv`` / ``a8one`` round it."""
    from kt_cuda.triton_w4a8 import dequantize_activations, quantize_activations

    lo, hi, dx, xs = quantize_activations(x)
    y = dequantize_activations(dx, lo, hi).double().cpu() @ w.dequantize(torch.float64).cpu().T
    return y + bias.double().cpu() if bias is not None else y


GPU_CONFIGS = [  # block_n, block_k, split_k, num_warps, prefetch
    (8, 1024, 1, 4, True), (4, 512, 2, 2, True), (16, 512, 3, 8, False), (32, 1024, 4, 8, True), (8, 2048, 2, 4, True),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("cfg", GPU_CONFIGS, ids=lambda c: "n{}k{}s{}w{}p{}".format(*c))
@pytest.mark.parametrize("M,symmetric,dtype", [(1, False, torch.float16), (3, True, torch.bfloat16), (4, False, torch.float16)],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_a8one_matches_a8gemv_on_gpu(cfg, M, symmetric, dtype):
    """Compiled: the exact product of the rounded activations, and ``a8gemv``'s result (same tile)."""
    from kt_cuda.triton_int4 import Int4Config, int4_matmul
    from kt_cuda.triton_w4_tc import _SCRATCH

    dev = torch.device("cuda")
    torch.manual_seed(M + 7 * symmetric)
    N, K = 333, 2560  # K not a multiple of 1024 / 2048; N not of any block
    w = int4.quantize(torch.randn(N, K, device=dev) * 0.02, 32, symmetric=symmetric)
    x = torch.randn(M, K, device=dev).to(dtype)
    bias = torch.randn(N, device=dev)
    bn, bk, sk, nw, pf = cfg
    c = Int4Config("a8one", bn, bk, sk, nw, 3, block_m=1 if M == 1 else 4, prefetch=pf)
    out = int4_matmul(x, w, bias, c)
    assert out.shape == (M, N) and out.dtype == dtype
    assert rel_err(out.cpu(), _exact(x, w, bias)) < (2e-3 if dtype == torch.float16 else 1e-2)
    twin = Int4Config("a8gemv", bn, bk, sk, nw, 3, block_m=c.block_m, prefetch=pf)
    assert rel_err(out.cpu(), int4_matmul(x, w, bias, twin).cpu()) < (1e-3 if dtype == torch.float16 else 8e-3)
    assert all(int(cnt.abs().sum()) == 0 for _, cnt in _SCRATCH.values())
    assert torch.equal(int4_matmul(x, w, bias, c), out)  # deterministic split-K sums


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("M", [1, 4])
def test_a8one_candidates_on_gpu(M):
    """Every ``a8one`` tile the autotuner may pick compiles on this GPU and is exact on a Llama-like shape."""
    from kt_cuda.triton_int4 import candidates, int4_matmul

    dev = torch.device("cuda")
    torch.manual_seed(M)
    N, K = 4096 + 48, 4096
    w = int4.quantize(torch.randn(N, K, device=dev) * 0.02, 32)
    x = torch.randn(M, K, device=dev).half()
    ref = _exact(x, w, None)
    for c in candidates(M, 32, act_int8=True):
        if c.kernel == "a8one":
            assert rel_err(int4_matmul(x, w, None, c).cpu(), ref) < 2e-3, c.label()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_a8one_split_k_in_cuda_graph():
    """One launch per call with split K: a captured graph replays it on new inputs (counters back at zero)."""
    from kt_cuda.triton_int4 import Int4Config, int4_matmul

    dev = torch.device("cuda")
    torch.manual_seed(1)
    N, K = 1000, 4096
    w = int4.quantize(torch.randn(N, K, device=dev) * 0.02, 32)
    bias = torch.randn(N, device=dev)
    cfg = Int4Config("a8one", 16, 512, 4, 8, 3, block_m=4)
    x = torch.randn(3, K, device=dev).half()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        int4_matmul(x, w, bias, cfg)  # warm-up: compile, allocate the workspace outside capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            y = int4_matmul(x, w, bias, cfg)
    torch.cuda.current_stream().wait_stream(stream)
    for seed in range(3):
        x.copy_(torch.randn(3, K, generator=torch.Generator().manual_seed(seed)).to(dev, torch.float16))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(y.cpu(), _exact(x, w, bias)) < 2e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("split_k", [1, 4])
def test_a8one_one_kernel_per_call(split_k):
    """A call launches one kernel (``a8gemv``: rounding + GEMV; with split K also a memset and a cast)."""
    from torch.profiler import ProfilerActivity, profile

    from kt_cuda.triton_int4 import Int4Config, int4_matmul

    dev = torch.device("cuda")
    w = int4.quantize(torch.randn(512, 4096, device=dev) * 0.02, 32)
    x = torch.randn(1, 4096, device=dev).half()
    cfg = Int4Config("a8one", 8, 1024, split_k, 4, 3, block_m=1)
    int4_matmul(x, w, None, cfg)  # compile, workspace
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        int4_matmul(x, w, None, cfg)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1 and "one" in kernels[0], kernels


def test_one_launch_rejects_bad_inputs(device):
    from kt_cuda.triton_int4 import Int4Config, int4_matmul

    w = int4.quantize(torch.randn(32, 256), 32).to(device)
    x = torch.randn(2, 256, device=device).half()
    with pytest.raises(ValueError, match="N-major"):
        int4_matmul(x, int4.with_layout(w, True), None, Int4Config("a8one", 8, 128, block_m=2))
    with pytest.raises(ValueError, match="block_m"):
        int4_matmul(x, w, None, Int4Config("a8one", 8, 128, block_m=16))
    with pytest.raises(ValueError, match="group size"):
        int4_matmul(x, int4.quantize(torch.randn(32, 256), 128).to(device), None, Int4Config("a8one", 8, 64, block_m=2))
