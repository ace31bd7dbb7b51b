"""The pipelined tensor-core int4 kernel ``wtc`` (``kt_cuda.triton_w4_tc``) against a float64 product of the
same int4 weights: both unpacks (``f32``, ``half``), plain and swapped operands, split K reduced
inside the kernel (including a split with no K tile), 5, 16 and 17-32 rows, odd N, K not a multiple of
BLOCK_K, asymmetric and symmetric groups of 32/64/128, with and without bias.

Two tiers: in Triton's interpreter on CPU (a subprocess with ``TRITON_INTERPRET=1``; skipped where CUDA
runs the kernels compiled) and on a CUDA GPU (compiled; float16 and bfloat16, the autotuner's candidates,
CUDA-graph replays). The split-K counters must be back at zero after every launch."""

import importlib.util

import pytest
import torch

from cuda_test_helpers import half_dtypes, rel_err, run_interpreted

from kt_cuda import int4

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}

INTERPRETED = r"""
import torch
from kt_cuda import int4
from kt_cuda.triton_int4 import Int4Config as C, int4_matmul
from kt_cuda.triton_w4_tc import _SCRATCH

torch.manual_seed(0)
N, K = 21, 384  # N not a multiple of any block; K = 1.5 tiles of 256
cases = [  # group, symmetric, M, bias, config
    (32, False, 5, True, C("wtc", 16, 128, 1, block_m=16, unpack="f32")),
    (32, True, 16, False, C("wtc", 32, 256, 2, block_m=16, swap=True, unpack="f32")),
    (32, False, 16, True, C("wtc", 32, 256, 3, block_m=16, swap=True, unpack="half")),  # 2 tiles, 3 splits
    (64, True, 5, True, C("wtc", 16, 128, 1, block_m=16, unpack="half")),
    (128, False, 17, True, C("wtc", 16, 128, 3, block_m=16, unpack="half")),  # two row blocks
    (32, True, 5, False, C("wtc", 16, 256, 1, block_m=16, unpack="half")),
    (64, False, 16, True, C("wtc", 32, 128, 2, block_m=16, swap=True, unpack="f32")),
    (128, True, 32, True, C("wtc", 16, 256, 2, block_m=32, swap=True, unpack="half")),
]
for group, symmetric, M, with_bias, cfg in cases:
    w = int4.quantize(torch.randn(N, K), group, symmetric=symmetric)
    x = torch.randn(M, K).half()
    bias = torch.randn(N) if with_bias else None
    ref = x.double() @ w.dequantize(torch.float64).T
    if with_bias:
        ref = ref + bias.double()
    out = int4_matmul(x, w, bias, cfg)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    print(cfg.label(), group, symmetric, M, f"{err:.1e}")
    assert out.shape == (M, N) and out.dtype == torch.float16
    assert err < 2e-3, (cfg.label(), group, symmetric, M, err)
    assert all(int(cnt.abs().sum()) == 0 for _, cnt in _SCRATCH.values()), "split-K counters not reset"
    if cfg.split_k > 1:
        assert torch.equal(int4_matmul(x, w, bias, cfg), out)  # partials summed in split order
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (its interpreter runs the kernels on CPU)")
def test_wtc_in_triton_interpreter():
    run_interpreted(INTERPRETED)


def test_wtc_labels_and_candidates():
    from kt_cuda.triton_int4 import Int4Config as C, candidates

    labels = {C("wtc", 64, 256, 4, swap=True, unpack=u).label() for u in ("f32", "half")}
    assert labels == {"wtcT:m16n64k256s4w4st3", "wtcHT:m16n64k256s4w4st3"}
    for M in (5, 16, 17, 32):
        wtc = [c for c in candidates(M, 32) if c.kernel == "wtc"]
        assert wtc and all(c.block_m == (16 if M <= 16 else 32) for c in wtc)
        # swept at 16 rows (won on the H200); 17-32 rows keep the byte kernels first until they are swept
        assert (candidates(M, 32)[0].kernel == "wtc") == (M <= 16)
    assert not any(c.kernel == "wtc" for M in (1, 4, 33) for c in candidates(M, 32))
    assert not any(c.kernel == "wtc" for c in candidates(16, 32, k_major=True))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_split_scratch_grows_without_freeing():
    """An outgrown workspace stays allocated (a captured CUDA graph may still use it); counters start zeroed."""
    from kt_cuda.triton_w4_tc import _RETIRED, _split_scratch

    dev = torch.device("cpu")
    ws, cnt = _split_scratch(dev, 10, 10)
    assert ws.numel() >= 10 and cnt.numel() >= 10 and int(cnt.abs().sum()) == 0
    assert _split_scratch(dev, 10, 10)[0] is ws  # reused
    bigger, cnt2 = _split_scratch(dev, ws.numel() + 1, cnt.numel() + 1)
    assert bigger.numel() > ws.numel() and cnt2.numel() > cnt.numel() and int(cnt2.abs().sum()) == 0
    assert any(t is ws for t in _RETIRED) and any(t is cnt for t in _RETIRED)


def _reference(x, w, bias):
    y = x.double().cpu() @ w.dequantize(torch.float64).cpu().T
    return y + bias.double().cpu() if bias is not None else y


GPU_CONFIGS = [  # every unpack, plain and swapped, split K 1-4 (3 of them with an empty split on K=640/256)
    dict(block_n=16, block_k=128, split_k=1, unpack="f32"),
    dict(block_n=64, block_k=256, split_k=4, swap=True, unpack="f32", num_stages=4),
    dict(block_n=32, block_k=256, split_k=2, unpack="half", num_stages=4),
    dict(block_n=64, block_k=256, split_k=4, swap=True, unpack="half", num_stages=4),
    dict(block_n=128, block_k=128, split_k=3, swap=True, unpack="half", num_warps=8),
    dict(block_n=16, block_k=256, split_k=2, unpack="f32", num_warps=2),
    dict(block_n=64, block_k=128, split_k=4, swap=True, unpack="half", num_stages=5),
]


# (rows, symmetric, dtype) per config: each combination is its own compilation, so a few per config
ROWS = [(5, False, torch.float16), (16, True, torch.bfloat16), (32, False, torch.float16), (32, True, torch.float16)]


@pytest.mark.parametrize("cfg", GPU_CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("M,symmetric,dtype", ROWS, ids=lambda v: str(v).replace("torch.", ""))
def test_wtc_configs(device, cfg, M, symmetric, dtype):
    from kt_cuda.triton_int4 import Int4Config, int4_matmul
    from kt_cuda.triton_w4_tc import _SCRATCH

    if dtype not in half_dtypes():
        pytest.skip(f"{dtype} is not tested here (Triton's interpreter: numpy has no bfloat16)")
    torch.manual_seed(M + 3 * symmetric)
    N, K = 61, 640  # K not a multiple of 256, N not of any block
    w = int4.quantize(torch.randn(N, K), 32, symmetric=symmetric).to(device)
    x = torch.randn(M, K, device=device).to(dtype)
    bias = torch.randn(N, device=device)
    c = Int4Config("wtc", block_m=16 if M <= 16 else 32, **cfg)
    out = int4_matmul(x, w, bias, c)
    assert out.shape == (M, N) and out.dtype == dtype
    assert rel_err(out.cpu(), _reference(x, w, bias)) < TOL[dtype]
    assert all(int(cnt.abs().sum()) == 0 for _, cnt in _SCRATCH.values())
    assert torch.equal(int4_matmul(x, w, bias, c), out)  # deterministic split-K sums


@pytest.mark.parametrize("group_size,scales_dtype", [(32, torch.float32), (64, torch.float16), (128, torch.float16)])
def test_wtc_group_sizes_and_fp32_scales(device, group_size, scales_dtype):
    from kt_cuda.triton_int4 import Int4Config, int4_matmul

    torch.manual_seed(group_size)
    N, K = 40, 1024
    w = int4.quantize(torch.randn(N, K), group_size, scales_dtype=scales_dtype).to(device)
    x = torch.randn(16, K, device=device).half()
    for unpack in ("f32", "half") if scales_dtype == torch.float32 else ("half",):
        out = int4_matmul(x, w, None, Int4Config("wtc", 32, 256, 2, swap=True, unpack=unpack))
        assert rel_err(out.cpu(), _reference(x, w, None)) < TOL[torch.float16], unpack


def test_wtc_rejects_bad_inputs(device):
    from kt_cuda.triton_int4 import Int4Config, int4_matmul

    w = int4.quantize(torch.randn(32, 256), 32).to(device)
    x = torch.randn(16, 256, device=device).half()
    with pytest.raises(ValueError, match="N-major"):
        int4_matmul(x, int4.with_layout(w, True), None, Int4Config("wtc", 16, 128))
    with pytest.raises(ValueError, match="at least 16"):
        int4_matmul(x, w, None, Int4Config("wtc", 8, 128))
    with pytest.raises(ValueError, match="unpack"):
        int4_matmul(x, w, None, Int4Config("wtc", 16, 128, unpack="fp8"))
    with pytest.raises(ValueError, match="group size"):
        int4_matmul(x, int4.quantize(torch.randn(32, 256), 128).to(device), None, Int4Config("wtc", 16, 64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("M", [16, 24])
def test_wtc_candidates_on_gpu(M):
    """Every ``wtc`` tile the autotuner may pick compiles on this GPU and is correct on a shape with
    several K tiles per split."""
    from kt_cuda.triton_int4 import candidates, int4_matmul

    dev = torch.device("cuda")
    torch.manual_seed(M)
    N, K = 4096 + 48, 2048
    w = int4.quantize(torch.randn(N, K, device=dev) * 0.02, 32)
    x = torch.randn(M, K, device=dev).half()
    ref = _reference(x, w, None)
    for c in candidates(M, 32):
        if c.kernel == "wtc":
            assert rel_err(int4_matmul(x, w, None, c).cpu(), ref) < TOL[torch.float16], c.label()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_wtc_split_k_in_cuda_graph():
    """Split K through the workspace and counters replays in a CUDA graph: each replay recomputes from the
    current input (the counters are back at zero after every launch)."""
    from kt_cuda.triton_int4 import Int4Config, int4_matmul

    dev = torch.device("cuda")
    torch.manual_seed(1)
    N, K = 1000, 4096
    w = int4.quantize(torch.randn(N, K, device=dev) * 0.02, 32)
    cfg = Int4Config("wtc", 64, 256, 4, 4, 4, block_m=16, swap=True, unpack="half")
    x = torch.randn(16, K, device=dev).half()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        int4_matmul(x, w, None, cfg)  # warm-up: compile, allocate the workspace outside capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            y = int4_matmul(x, w, None, cfg)
    torch.cuda.current_stream().wait_stream(stream)
    for seed in range(3):
        x.copy_(torch.randn(16, K, generator=torch.Generator().manual_seed(seed)).to(dev, torch.float16))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(y.cpu(), _reference(x, w, None)) < TOL[torch.float16]
