"""Launch configurations of kt-cuda's Triton int4 kernels for AMD GPUs.

What differs from the CUDA defaults, and why:

- ``num_warps`` counts wavefronts of 64 lanes on AMD (32-lane warps on NVIDIA): 4 wavefronts are 256 lanes,
  as many as 8 NVIDIA warps, so no tile here asks for more than 4.
- LDS is 64 KiB per compute unit on MI200/MI300 (an H100 SM has 228 KiB of shared memory): the large-M
  tile is 64x128x64 instead of 128x128x64, whose two stages of fp16 operands would fill all 64 KiB.
- ``num_stages=2``: the AMD backend's software pipeliner overlaps one load stage with compute; deeper
  pipelines only cost LDS.
- Nothing Hopper-only is involved: the kernels use ``tl.dot`` (MFMA on CDNA, WMMA on RDNA) and plain loads
  (no TMA, no wgmma, no warp specialization).

Split-K and the small-M tiles follow kt-cuda's ``default_config`` (its split heuristic counts compute units
through ``multi_processor_count``, which ROCm reports as the CU count).
These values are reasoned, not tuned: no AMD GPU was available to measure them.
"""

from __future__ import annotations

from dataclasses import replace

import torch

HIP_NUM_STAGES = 2
HIP_MAX_WARPS = 4
LARGE_M_TILE = (64, 128, 64)  # block_m, block_n, block_k for M > 64

# moe_matmul launch parameters (block_m is the op's choice, by the number of token-expert pairs)
HIP_MOE_LAUNCH = {"block_n": 64, "num_warps": 4, "num_stages": HIP_NUM_STAGES}


def hip_int4_config(M: int, N: int, K: int, group_size: int, device: torch.device):
    """The ``Int4Config`` of one ``int4_matmul`` launch of ``x[M, K] @ W[N, K].T`` on an AMD GPU."""
    from kt_cuda.triton_int4 import default_config

    base = default_config(M, N, K, group_size, device)
    if base.block_m > 64:
        block_m, block_n, block_k = LARGE_M_TILE
        base = replace(base, block_m=block_m, block_n=block_n, block_k=max(block_k, group_size))
    return replace(base, num_warps=min(base.num_warps, HIP_MAX_WARPS), num_stages=HIP_NUM_STAGES)
