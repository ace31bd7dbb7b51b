"""FP8 e4m3 with DeepSeek-V3's block scaling: weights in 128x128 blocks, activations in 1x128 groups.

``w = w_fp8 * w_scale[n // 128, k // 128]`` and ``x = x_fp8 * x_scale[m, k // 128]``; the product sums,
per K block, ``dot(x_fp8, w_fp8) * x_scale * w_scale`` in float32 (``triton_fp8`` holds the kernel).
"""

from __future__ import annotations

import torch

BLOCK = 128
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_weight(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> ``(w_fp8 [N, K], scale f32 [ceil(N/b), ceil(K/b)])``, amax of each block -> 448."""
    N, K = w.shape
    nb, kb = -(-N // block), -(-K // block)
    padded = torch.zeros(nb * block, kb * block, dtype=torch.float32, device=w.device)
    padded[:N, :K] = w.float()
    tiles = padded.view(nb, block, kb, block)
    scale = (tiles.abs().amax(dim=(1, 3)) / FP8_MAX).clamp_min(1e-12)
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(nb * block, kb * block)[:N, :K].contiguous(), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    s = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[: q.shape[0], : q.shape[1]]
    return q.float() * s


def quantize_activation(x: torch.Tensor, group: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` (K a multiple of ``group``) -> ``(x_fp8 [M, K], scale f32 [M, K/group])``."""
    M, K = x.shape
    g = x.float().view(M, K // group, group)
    scale = (g.abs().amax(dim=-1) / FP8_MAX).clamp_min(1e-12)
    q = (g / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(M, K), scale


def dequantize_activation(q: torch.Tensor, scale: torch.Tensor, group: int = BLOCK) -> torch.Tensor:
    return q.float() * scale.repeat_interleave(group, 1)
