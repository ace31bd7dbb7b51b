"""Launch configurations of kt-cuda's Triton int4 kernels for AMD GPUs.

kt-cuda times a list of candidate configurations per problem on the GPU it runs on (``tuned_config``), with
candidates from sweeps on an H200. On AMD those candidates are the wrong starting point; kt-rocm launches
one configuration per batch size instead, chosen for the AMD hardware:

- ``num_warps`` counts wavefronts of 64 lanes on AMD (32-lane warps on NVIDIA): 4 wavefronts are 256
  lanes, as many as 8 NVIDIA warps, so no configuration asks for more than 4.
- LDS is 64 KiB per compute unit on MI200/MI300 (an H100 SM has 228 KiB of shared memory): tensor-core
  tiles keep two pipeline stages of their fp16 operands within 32 KiB.
- ``num_stages=2``: the AMD backend's software pipeliner overlaps one load stage with compute.
- ``split_k=1``: no float32 atomics in the output.
- from 256 rows the weight is expanded once and multiplied by torch's GEMM (hipBLASLt): kt-cuda's
  ``dense`` kernel, which is what its own sweep chose at that size too.
- Nothing Hopper-only is involved: the kernels use ``tl.dot`` (MFMA on CDNA, WMMA on RDNA) and plain
  loads (no TMA, no wgmma, no warp specialization).

These values are reasoned, not tuned: no AMD GPU was available to time them.
"""

from __future__ import annotations

HIP_NUM_STAGES = 2
HIP_MAX_WARPS = 4
LDS_BYTES = 64 * 1024
DENSE_FROM_ROWS = 256

# moe_matmul launch parameters (block_m is the op's choice, by the number of token-expert pairs)
HIP_MOE_LAUNCH = {"block_n": 64, "block_k": 64, "num_warps": 4, "num_stages": HIP_NUM_STAGES}


def lds_bytes(block_m: int, block_n: int, block_k: int, stages: int, element_bytes: int = 2) -> int:
    """Shared memory (LDS) the pipelined ``tl.dot`` operands of one program take."""
    return (block_m + block_n) * block_k * element_bytes * stages


def _gemm_tile(block_m: int, block_n: int, block_k: int) -> tuple[int, int, int]:
    """Halve block_n, then block_m (down to 16), until two stages fit half the LDS (room for a second
    program per compute unit)."""
    while lds_bytes(block_m, block_n, block_k, HIP_NUM_STAGES) > LDS_BYTES // 2 and block_n > 16:
        block_n //= 2
    while lds_bytes(block_m, block_n, block_k, HIP_NUM_STAGES) > LDS_BYTES // 2 and block_m > 16:
        block_m //= 2
    return block_m, block_n, block_k


def hip_int4_config(M: int, group_size: int):
    """The ``Int4Config`` of one ``int4_matmul`` launch of ``x[M, K] @ W[N, K].T`` on an AMD GPU."""
    from kt_cuda.triton_int4 import Int4Config

    if M == 1:
        return Int4Config("gemv", block_n=32, block_k=max(512, group_size), num_warps=4, num_stages=HIP_NUM_STAGES)
    if M >= DENSE_FROM_ROWS:
        return Int4Config("dense")
    block_m, block_n, block_k = _gemm_tile(16 if M <= 16 else 64, 64, max(64, group_size))  # whole groups per tile
    return Int4Config("gemm", block_m=block_m, block_n=block_n, block_k=block_k, num_warps=4, num_stages=HIP_NUM_STAGES)
