"""``KAttentionAscend``: GQA self-attention with torch_npu's fused kernels.

- prefill: ``npu_fusion_attention`` (layout BNSD, grouped-query heads as they are); a causal prefill passes
  ``sparse_mode=3`` ("rightDownCausal": queries are the last positions of the keys) with the 2048x2048
  compressed mask the API asks for, a model-built mask is passed as ``atten_mask`` (True = masked);
- decode (one query per sequence): ``npu_incre_flash_attention``;
- rotary: ``npu_rotary_mul`` (``r1 * x + r2 * rotate_half(x)``) when the head size is 128, the one size
  every documented torch_npu version accepts; other sizes use the torch formula.

Projections, q/k norms and the cache are as in ktcore's ``KAttentionSDPA``, which this class extends;
soft-capped logits (which the fused kernels lack) take its torch path. Sources: the torch_npu API pages of
the three functions (argument names, mask polarity, sparse modes).
"""

from __future__ import annotations

import torch

from ktcore.sdk import KAttentionSDPA, apply_rope
from ktcore.sdk import compute_dtype as parse_compute_dtype

from ._env import device_type, npu_unavailable_reason, require_torch_npu_for, torch_npu

CAUSAL_MASK_SIZE = 2048  # sparse modes 2-4 take this compressed upper-triangular mask
RIGHT_DOWN_CAUSAL = 3
ROTARY_MUL_HEAD_DIM = 128


class AscendAttentionKernels:
    """The torch_npu calls."""

    @staticmethod
    def fusion_attention(q, k, v, *, head_num: int, atten_mask, scale: float, sparse_mode: int):
        out = torch_npu().npu_fusion_attention(q, k, v, head_num, "BNSD", atten_mask=atten_mask, scale=scale, sparse_mode=sparse_mode)
        return out[0]

    @staticmethod
    def incre_flash_attention(q, k, v, *, num_heads: int, num_kv_heads: int, atten_mask, scale: float):
        return torch_npu().npu_incre_flash_attention(
            q, k, v, atten_mask=atten_mask, num_heads=num_heads, scale_value=scale, input_layout="BNSD",
            num_key_value_heads=num_kv_heads,
        )

    @staticmethod
    def rotary_mul(x, r1, r2):
        return torch_npu().npu_rotary_mul(x, r1, r2)


class ReferenceAttentionKernels:
    """The three calls' documented semantics in torch (CPU tests and the device tests' reference)."""

    @staticmethod
    def _attend(q, k, v, masked, scale):
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q.float() @ k.float().transpose(-1, -2)) * scale
        if masked is not None:
            scores = scores.masked_fill(masked, float("-inf"))
        return (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype)

    @classmethod
    def fusion_attention(cls, q, k, v, *, head_num: int, atten_mask, scale: float, sparse_mode: int):
        assert q.shape[1] == head_num
        if sparse_mode == RIGHT_DOWN_CAUSAL:
            assert atten_mask.shape == (CAUSAL_MASK_SIZE, CAUSAL_MASK_SIZE) and atten_mask.dtype == torch.bool
            q_len, kv_len = q.shape[-2], k.shape[-2]
            atten_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).triu(kv_len - q_len + 1)
        return cls._attend(q, k, v, atten_mask, scale)

    @classmethod
    def incre_flash_attention(cls, q, k, v, *, num_heads: int, num_kv_heads: int, atten_mask, scale: float):
        assert q.shape[1] == num_heads and k.shape[1] == num_kv_heads and q.shape[-2] == 1
        return cls._attend(q, k, v, atten_mask, scale)

    @staticmethod
    def rotary_mul(x, r1, r2):
        x1, x2 = x.chunk(2, dim=-1)
        return r1 * x + r2 * torch.cat((-x2, x1), dim=-1)


def masked_positions(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A Transformers attention mask (bool: True attends; additive: 0 attends, very negative masks) as the
    Ascend kernels' ``atten_mask`` (True = masked)."""
    if mask is None:
        return None
    return ~mask if mask.dtype == torch.bool else mask < 0


class KAttentionAscend(KAttentionSDPA):
    """Self-attention of the GQA families on an Ascend NPU. Options: ``compute_dtype`` (``float16`` default,
    or ``bfloat16``): the kernels' dtype when the model runs in float32."""

    name = "KAttentionSDPA"
    aliases = ("KAttentionAscend",)  # its name before ops had backends
    preference = 10  # the NPU's fused attention before the torch code
    devices = ("npu",)

    def __init__(self, module: torch.nn.Module, device="npu", compute_dtype: str = "float16", **kwargs):
        require_torch_npu_for(device)  # torch.device("npu") parses only once torch_npu is imported
        super().__init__(module, device, **kwargs)
        self.compute_dtype = parse_compute_dtype(self.name, compute_dtype)
        self.kernels = AscendAttentionKernels if device_type(device) == "npu" else None  # tests set reference kernels
        self._causal_mask = None

    @classmethod
    def available(cls, device=None) -> str | None:
        return npu_unavailable_reason(device)

    def _rope(self, q, k, cos, sin):
        if self.head_dim != ROTARY_MUL_HEAD_DIM:
            return apply_rope(q, k, cos, sin)
        cos, sin = cos.unsqueeze(1).to(q.dtype), sin.unsqueeze(1).to(q.dtype)  # [B, 1, S, D] for BNSD
        return self.kernels.rotary_mul(q, cos, sin), self.kernels.rotary_mul(k, cos, sin)

    def _compressed_causal_mask(self, device) -> torch.Tensor:
        if self._causal_mask is None or self._causal_mask.device != device:
            ones = torch.ones(CAUSAL_MASK_SIZE, CAUSAL_MASK_SIZE, dtype=torch.bool, device=device)
            self._causal_mask = ones.triu(1)
        return self._causal_mask

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, **kwargs):
        if self.softcap is not None or self.kernels is None:
            return super().forward(hidden_states, position_embeddings, attention_mask, **kwargs)
        cache = kwargs.pop("cache", None)
        legacy = kwargs.pop("past_key_values", None)
        cache = cache if cache is not None else legacy
        attn = self.attn
        batch, q_len = hidden_states.shape[:-1]
        shape = (batch, q_len, -1, self.head_dim)
        dtype = hidden_states.dtype if hidden_states.dtype in (torch.float16, torch.bfloat16) else self.compute_dtype
        q = attn.q_proj(hidden_states).view(shape)
        k = attn.k_proj(hidden_states).view(shape)
        v = attn.v_proj(hidden_states).view(shape).transpose(1, 2)
        if self.has_qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2).to(dtype), k.transpose(1, 2).to(dtype), v.to(dtype)
        cos, sin = position_embeddings
        q, k = self._rope(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        kv_len = k.shape[-2]
        mask = attention_mask[..., :kv_len] if attention_mask is not None else None
        masked = masked_positions(mask)
        if q_len == 1:
            out = self.kernels.incre_flash_attention(
                q, k.contiguous(), v.contiguous(), num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                atten_mask=masked, scale=self.scaling,
            )
        elif masked is None and self.is_causal:
            out = self.kernels.fusion_attention(
                q, k.contiguous(), v.contiguous(), head_num=self.num_heads,
                atten_mask=self._compressed_causal_mask(q.device), scale=self.scaling, sparse_mode=RIGHT_DOWN_CAUSAL,
            )
        else:
            out = self.kernels.fusion_attention(
                q, k.contiguous(), v.contiguous(), head_num=self.num_heads, atten_mask=masked, scale=self.scaling, sparse_mode=0,
            )
        out = out.transpose(1, 2).reshape(batch, q_len, -1).to(hidden_states.dtype)
        return attn.o_proj(out), None
