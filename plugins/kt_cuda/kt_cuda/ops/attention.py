"""Attention ops over kt-cuda's Triton flash attention (``kt_cuda.triton_mla``).

``KMLAAttention`` is ktcore's ``KAttentionMLA`` (projections, rotary, ``kv_b_proj`` absorption, the
latent-only cache) with the latent attention itself in Triton: flash-decoding over the compressed cache
for single-token steps, a causal flash kernel in latent space for prefill. ``KAttentionFlashGQA`` is
ktcore's ``KAttentionSDPA`` (which already calls SDPA with ``enable_gqa``, never repeating key/value
heads) with masked single-token steps (a static cache's decode) in Triton. Measured on an H200 with torch
2.11 (``bench/bench_mla.py``, Llama-8B heads 32/8, D 128, bf16): masked decode over 4k keys inside a CUDA
graph 18.8 us against SDPA's 24.3 us; but a masked 512-query chunk after 2k keys 279 us against SDPA's
98 us, so prefill stays in SDPA unless asked.

Both are graph-capture friendly: no host syncs, launch shapes fixed by tensor shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ktcore.sdk import KAttentionMLA, KAttentionSDPA, module_dtype

from .._env import cuda_unavailable_reason

PREFILL_KERNELS = ("auto", "triton", "torch", "expanded")
EXPANDED_MAX_BYTES = 512 << 20  # "auto": per-head keys and values of the cached positions up to this size
GQA_KERNELS = ("decode", "masked", "triton")


class KMLAAttention(KAttentionMLA):
    """DeepSeek-V2/V3 absorbed multi-head latent attention with Triton kernels over the latent cache.

    Options (besides ``KAttentionMLA``'s ``dtype`` and ``query_chunk``): ``prefill``: ``"expanded"`` (the
    cached latents expanded to per-head keys and values, 192/128 wide instead of 576/512, then SDPA: on an
    H200 47 / 332 us for 512 / 2k tokens with 128 heads, expansion included, ``bench/bench_mla.py``),
    ``"triton"`` (causal flash attention in latent space: 330 / 4155 us, but no per-head copies of the
    cache), ``"torch"`` (the core op's chunked matmuls: 899 / 9179 us) or ``"auto"`` (default: expanded
    while the expanded keys and values fit in ``EXPANDED_MAX_BYTES``, else triton); ``decode_splits``:
    fixed number of key splits for decode (default: enough programs to fill the GPU, from the shapes
    alone). Decode is always absorbed, in Triton.
    """

    name = "KMLAAttention"
    role = "attention"
    devices = ("cuda",)
    graph_capturable = True

    def __init__(self, module: torch.nn.Module, device="cuda", dtype=None, query_chunk: int = 256,
                 prefill: str = "auto", decode_splits: int | None = None, **kwargs):
        super().__init__(module, device, dtype=dtype, query_chunk=query_chunk, **kwargs)
        if prefill not in PREFILL_KERNELS:
            raise ValueError(f"{self.name}: prefill must be one of {', '.join(PREFILL_KERNELS)}, got {prefill!r}")
        if decode_splits is not None and int(decode_splits) < 1:
            raise ValueError(f"{self.name}: decode_splits must be >= 1, got {decode_splits!r}")
        self.prefill = prefill
        self.decode_splits = None if decode_splits is None else int(decode_splits)

    @classmethod
    def available(cls, device=None) -> str | None:
        return cuda_unavailable_reason(device)

    @torch.no_grad()
    def prepare_capture(self, max_positions: int) -> None:
        """Compiles the decode kernels for a cache of ``max_positions`` (with and without a mask) before a
        graph capture, so that no compilation happens under it."""
        from ..triton_mla import latent_attention

        dev = dict(device=self.device, dtype=self.dtype)
        q = torch.zeros(1, self.num_heads, 1, self.kv_lora_rank, **dev)
        q_pe = torch.zeros(1, self.num_heads, 1, self.qk_rope_head_dim, **dev)
        latent = torch.zeros(1, 1, max_positions, self.kv_lora_rank, **dev)
        k_pe = torch.zeros(1, 1, max_positions, self.qk_rope_head_dim, **dev)
        for mask in (None, torch.ones(1, 1, 1, max_positions, dtype=torch.bool, device=self.device)):
            latent_attention(q, q_pe, latent, k_pe, scale=self.scaling, mask=mask, num_splits=self.decode_splits)

    def _expands(self, q_nope, latent) -> bool:
        if q_nope.shape[2] == 1 or self.prefill in ("triton", "torch"):
            return False
        if self.prefill == "expanded":
            return True
        batch, heads = q_nope.shape[:2]
        width = self.w_k.shape[1] + self.qk_rope_head_dim + self.v_head_dim
        return batch * heads * latent.shape[2] * width * self.dtype.itemsize <= EXPANDED_MAX_BYTES

    def _attend(self, q_nope, q_pe, latent, k_pe, mask) -> torch.Tensor:
        if self._expands(q_nope, latent):
            return self._attend_expanded(q_nope, q_pe, latent, k_pe, mask)
        return super()._attend(q_nope, q_pe, latent, k_pe, mask)

    def _attend_expanded(self, q_nope, q_pe, latent, k_pe, mask) -> torch.Tensor:
        """Non-absorbed attention for prefill: ``k_nope = W_k c`` and ``v = W_v c`` per head for the cached
        positions, ``[q_nope | q_pe]`` against ``[k_nope | k_pe]`` through SDPA. The cache keeps only ``c``."""
        batch, heads, q_len, _ = q_nope.shape
        dtype = self.dtype
        c = latent[:, 0].to(dtype)  # [B, T, r]
        k_nope = torch.einsum("btr,hnr->bhtn", c, self.w_k)
        v = torch.einsum("btr,hvr->bhtv", c, self.w_v)
        k = torch.cat([k_nope, k_pe.to(dtype).expand(-1, heads, -1, -1)], dim=-1)
        q = torch.cat([q_nope.to(dtype), q_pe.to(dtype)], dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        return out.transpose(1, 2).reshape(batch, q_len, heads * self.v_head_dim)

    def _latent_attention(self, q_latent, q_pe, latent, k_pe, mask) -> torch.Tensor:
        q_len = q_latent.shape[2]
        if q_len > 1 and self.prefill == "torch":  # "auto" past its size cap: triton
            return super()._latent_attention(q_latent, q_pe, latent, k_pe, mask)
        from ..triton_mla import latent_attention

        return latent_attention(q_latent, q_pe, latent, k_pe, scale=self.scaling, mask=mask,
                                num_splits=self.decode_splits if q_len == 1 else None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, prefill={self.prefill}"


class KAttentionFlashGQA(KAttentionSDPA):
    """Grouped-query attention (Llama, Qwen, Mixtral, Gemma 3, ...) as ``KAttentionSDPA``, with some calls in
    a Triton flash kernel that reads each key/value head once for its group of query heads.

    Options: ``kernel``: ``"decode"`` (default: Triton for single-token calls that carry a mask, as a
    static cache's decode does; SDPA otherwise), ``"masked"`` (Triton for every call with a mask: for
    torch versions whose SDPA falls back to repeating heads under a mask) or ``"triton"`` (every call).
    Logit soft-capping, attention sinks and non-causal modules stay in SDPA's op.
    """

    name = "KAttentionFlashGQA"
    role = "attention"
    devices = ("cuda",)
    graph_capturable = True
    computes_sinks = True  # calls with sinks (GPT-OSS) take KAttentionSDPA's explicit path

    def __init__(self, module: torch.nn.Module, device="cuda", kernel: str = "decode", **kwargs):
        super().__init__(module, device, **kwargs)
        if kernel not in GQA_KERNELS:
            raise ValueError(f"{self.name}: kernel must be one of {', '.join(GQA_KERNELS)}, got {kernel!r}")
        self.kernel = kernel
        self.dtype = module_dtype(module)  # the activations' dtype: the model's

    @classmethod
    def available(cls, device=None) -> str | None:
        return cuda_unavailable_reason(device)

    @torch.no_grad()
    def prepare_capture(self, max_positions: int) -> None:
        """Compiles the masked decode kernel for a cache of ``max_positions`` before a graph capture."""
        from ..triton_mla import flash_attention

        q = torch.zeros(1, self.num_heads, 1, self.head_dim, device=self.device, dtype=self.dtype)
        kv = torch.zeros(1, self.num_kv_heads, max_positions, self.head_dim, device=self.device, dtype=self.dtype)
        mask = torch.ones(1, 1, 1, max_positions, dtype=torch.bool, device=self.device)
        flash_attention(q, kv, kv, scale=self.scaling, mask=mask)

    def _attend(self, q, k, v, mask, is_causal: bool) -> torch.Tensor:
        # without a mask the call is square causal or a single query over all keys: the kernel's own
        # bottom-right causal bound covers both
        use = {"decode": mask is not None and q.shape[2] == 1, "masked": mask is not None, "triton": True}[self.kernel]
        if use and self.softcap is None and self.is_causal and not self.has_sinks:
            from ..triton_mla import flash_attention

            return flash_attention(q, k, v, scale=self.scaling, mask=mask)
        return super()._attend(q, k, v, mask, is_causal)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, kernel={self.kernel}"
