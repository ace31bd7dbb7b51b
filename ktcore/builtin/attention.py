"""Attention ops in plain torch: ``KAttentionSDPA`` (multi-head / grouped-query attention through
``scaled_dot_product_attention``) and ``KAttentionMLA`` (DeepSeek's multi-head latent attention with
``kv_b_proj`` absorbed, attending over the compressed latent cache).

Both are built with the original attention module, whose children (projections, norms) the wrapper
adopted and the rules may have replaced; they call those children at forward time, so a projection
runs through whatever linear op its own rule chose.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import ANY_DEVICE, Op
from ._common import causal_mask, module_dtype, parse_dtype

# scaled_dot_product_attention takes enable_gqa from torch 2.5; before, keys and values are repeated
SDPA_HAS_GQA = torch.__version__ >= "2.5"


def _cache_of(kwargs: dict):
    """The cache argument under either of its Transformers names (``cache`` since 5.2x, ``past_key_values``)."""
    cache = kwargs.pop("cache", None)
    legacy = kwargs.pop("past_key_values", None)
    return cache if cache is not None else legacy


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Half-split rotary embedding on ``[B, heads, S, D]`` with ``cos``/``sin`` ``[B, S, R]``; with ``R < D``
    (partial rotary: GLM-4.5, MiniMax-M2) the first ``R`` dims rotate and the rest pass through."""
    rot = cos.shape[-1]
    if rot < q.shape[-1]:
        q_rot, k_rot = apply_rope(q[..., :rot], k[..., :rot], cos, sin)
        return torch.cat([q_rot, q[..., rot:]], dim=-1), torch.cat([k_rot, k[..., rot:]], dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def apply_rope_interleaved(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary embedding over adjacent pairs ``(x0, x1), (x2, x3), ...`` (DeepSeek's layout); the result
    is laid out ``[rotated evens | rotated odds]`` as Transformers does it (same for q and k, so scores
    are unchanged)."""
    cos = cos[..., : cos.shape[-1] // 2].unsqueeze(1)
    sin = sin[..., : sin.shape[-1] // 2].unsqueeze(1)

    def rotate(x):
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.cat([even * cos - odd * sin, odd * cos + even * sin], dim=-1)

    return rotate(q), rotate(k)


def apply_rope_complex(q: torch.Tensor, k: torch.Tensor, freqs_cis: torch.Tensor):
    """Rotary embedding as a complex product over adjacent pairs (DeepSeek-V2's rotary module output)."""
    freqs_cis = freqs_cis.unsqueeze(1).to(q.device)

    def rotate(x):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis).flatten(3).type_as(x)

    return rotate(q), rotate(k)


def _without_mask(keys: torch.Tensor, values: torch.Tensor, q_len: int):
    """Keys, values and mask for a call that got no mask from the model. Transformers passes none only
    when nothing precedes the queries: they are positions ``0..q_len-1`` and attend causally to the
    first ``q_len`` cache slots (a static cache returns more slots, still empty). A single query sees
    every key it is given."""
    if q_len == 1:
        return keys, values, None
    keys, values = keys[..., :q_len, :], values[..., :q_len, :]
    return keys, values, causal_mask(q_len, q_len, keys.device)[None, None]


def _add_mask(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask


class KAttentionSDPA(Op):
    """Self-attention of the GQA families (Llama, Qwen2/3(-MoE), Mixtral, Gemma 3, ...): q/k/v projections,
    optional per-head ``q_norm``/``k_norm``, half-split rotary, cache through ``cache.update``, then
    ``scaled_dot_product_attention`` with the model's mask (causal, sliding window) and ``enable_gqa``;
    logit soft-capping and attention sinks (GPT-OSS: one learnt logit per head that joins the softmax and
    attends to nothing), which SDPA lacks, take an explicit path. q/k norms apply per head, or to the whole
    projection where their weight spans all heads (MiniMax-M2).
    """

    name = "KAttentionSDPA"
    graph_capturable = True
    computes_sinks = True  # a subclass whose own ``_attend`` handles ``self.sinks`` says so in its class body
    role = "attention"
    devices = ANY_DEVICE

    def __init__(self, module: torch.nn.Module, device="cpu", **kwargs):
        super().__init__(module, device, **kwargs)
        missing = [p for p in ("q_proj", "k_proj", "v_proj", "o_proj") if getattr(module, p, None) is None]
        if missing:
            raise ValueError(f"{self.name}: {type(module).__name__} has no {', '.join(missing)}; it is not a q/k/v/o attention")
        config = module.config
        self.__dict__["attn"] = module  # not a child: its modules belong to the wrapper
        self.layer_idx = module.layer_idx
        self.head_dim = module.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.scaling = float(getattr(module, "scaling", self.head_dim**-0.5))
        self.softcap = getattr(module, "attn_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None)
        self.is_causal = bool(getattr(module, "is_causal", True))
        self.has_qk_norm = getattr(module, "q_norm", None) is not None
        # a norm over the whole projection (MiniMax-M2) instead of each head's
        self.qk_norm_whole = self.has_qk_norm and tuple(getattr(module.q_norm, "weight", torch.empty(0)).shape) != (self.head_dim,)
        self.has_sinks = isinstance(getattr(module, "sinks", None), torch.Tensor)
        self.register_buffer("sinks", None, persistent=False)  # [heads] float32, from load()
        attend_owner = next(c for c in type(self).__mro__ if "_attend" in vars(c))
        if self.has_sinks and not vars(attend_owner).get("computes_sinks", False):
            raise ValueError(f"{self.name}: {type(module).__name__} has attention sinks (GPT-OSS), which this op's "
                             f"kernel does not compute; use KAttentionSDPA for it")

    def load(self, weights) -> None:
        if self.has_sinks:
            if "sinks" not in weights:
                raise KeyError(f"{self.name}: {type(self.attn).__name__} has attention sinks; no 'sinks' tensor given")
            self.sinks = weights["sinks"].dequantize(torch.float32, self.device).reshape(self.num_heads)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, **kwargs):
        cache = _cache_of(kwargs)
        attn = self.attn
        batch, q_len = hidden_states.shape[:-1]
        shape = (batch, q_len, -1, self.head_dim)
        q, k = attn.q_proj(hidden_states), attn.k_proj(hidden_states)
        if self.qk_norm_whole:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.view(shape), k.view(shape)
        v = attn.v_proj(hidden_states).view(shape).transpose(1, 2)
        if self.has_qk_norm and not self.qk_norm_whole:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rope(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        mask, is_causal = attention_mask, False
        if mask is None and self.is_causal:
            k, v, mask = _without_mask(k, v, q_len)
            if mask is not None and self.softcap is None and not self.has_sinks:
                mask, is_causal = None, True  # square causal: SDPA's own flag keeps its fast kernels
        elif mask is not None and mask.shape[-1] != k.shape[-2]:
            mask = mask[..., : k.shape[-2]]
        out = self._attend(q, k, v, mask, is_causal)
        out = out.transpose(1, 2).reshape(batch, q_len, -1)
        return attn.o_proj(out), None

    def _attend(self, q, k, v, mask, is_causal: bool) -> torch.Tensor:
        """Attention of ``q`` ``[B, H, S, D]`` over the cached ``k``/``v`` ``[B, KVH, T, D]`` with the prepared
        mask (or ``is_causal`` for a square causal call): ``[B, H, S, D]``. Subclasses swap the kernel here."""
        if self.softcap is not None or self.has_sinks:
            return self._explicit(q, k, v, mask)
        gqa = {}
        if self.num_kv_heads != self.num_heads:
            if SDPA_HAS_GQA:
                gqa = {"enable_gqa": True}
            else:
                groups = self.num_heads // self.num_kv_heads
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scaling, **gqa)

    def _explicit(self, q, k, v, mask):
        """Attention with soft-capped logits and/or sinks, as Transformers' eager path computes it."""
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        scores = _add_mask(scores, mask)
        if not self.has_sinks:
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            return torch.matmul(probs, v)
        sinks = self.sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        both = torch.cat([scores, sinks], dim=-1)
        both = both - both.max(dim=-1, keepdim=True).values
        probs = torch.softmax(both, dim=-1, dtype=both.dtype)[..., :-1].to(v.dtype)
        return torch.matmul(probs, v)


class KAttentionMLA(Op):
    """DeepSeek-V2/V3 multi-head latent attention, absorbed.

    ``kv_b_proj`` maps the normalized latent ``c`` (``kv_lora_rank``) to each head's ``k_nope`` and ``v``.
    Its key part is folded into the query (``q_nope @ W_k`` gives a query in latent space) and its value
    part into the output (``W_v`` applied to the attention-weighted latents), so the cache holds only the
    latent and the shared rotary key (``cache.update(latent[B,1,T,r], k_pe[B,1,T,rope], layer_idx)``, as
    Transformers' ``DeepseekV2Attention`` stores them) and keys/values are never expanded per head.
    Scores use the module's ``scaling`` (YaRN ``mscale`` included). The absorbed weights are read by running
    ``kv_b_proj`` (whatever linear op it is) on the identity after loading.

    Options: ``dtype`` of the absorbed weights and the latent attention (default: the model's dtype; the
    softmax is always fp32); ``query_chunk`` (queries per score block in prefill, default 256).
    """

    name = "KAttentionMLA"
    graph_capturable = True
    role = "attention"
    devices = ANY_DEVICE

    def __init__(self, module: torch.nn.Module, device="cpu", dtype=None, query_chunk: int = 256, **kwargs):
        super().__init__(module, device, **kwargs)
        if getattr(module, "kv_b_proj", None) is None or getattr(module, "kv_a_proj_with_mqa", None) is None:
            raise ValueError(f"{self.name}: {type(module).__name__} is not a multi-head latent attention (no kv_b_proj)")
        config = module.config
        self.__dict__["attn"] = module
        self.layer_idx = module.layer_idx
        self.num_heads = module.num_heads
        self.q_lora_rank = module.q_lora_rank
        self.kv_lora_rank = module.kv_lora_rank
        self.qk_nope_head_dim = module.qk_nope_head_dim
        self.qk_rope_head_dim = module.qk_rope_head_dim
        self.v_head_dim = module.v_head_dim
        self.qk_head_dim = module.qk_head_dim
        self.scaling = float(module.scaling)
        # DeepSeek-V3.2 (a sparse-attention indexer, ``_sparse_mask``) always rotates interleaved pairs
        self.index_topk = int(config.index_topk) if getattr(module, "indexer", None) is not None else None
        self.rope_interleave = bool(getattr(config, "rope_interleave", False)) or self.index_topk is not None
        self.dtype = parse_dtype(dtype, self.name) or module_dtype(module)
        self.query_chunk = int(query_chunk)
        self.register_buffer("w_k", None, persistent=False)  # [H, nope, r]
        self.register_buffer("w_v", None, persistent=False)  # [H, v, r]

    def post_load(self) -> None:
        self._absorb()

    @torch.no_grad()
    def _absorb(self) -> None:
        r = self.kv_lora_rank
        kv_b = self.attn.kv_b_proj
        # a plain nn.Linear takes inputs of its own dtype and device; a linear wrapper converts them
        plain = next(kv_b.parameters(), None)
        where = dict(dtype=plain.dtype, device=plain.device) if plain is not None else dict(dtype=self.dtype, device=self.device)
        # eye @ W.T = W.T: [r, H*(nope+v)], one row per call: a call of r rows would be prefill-sized, and a
        # prefill path may round the weights (kt-cpu-amx's AMX tiles take them as bf16)
        eye = torch.eye(r, **where)
        w_t = torch.cat([kv_b(eye[i : i + 1]) for i in range(r)]).to(device=self.device, dtype=self.dtype)
        bias = kv_b(torch.zeros(1, r, **where))
        if bool(bias.abs().max() > 0):
            raise ValueError(f"{self.name}: layer {self.layer_idx} kv_b_proj has a bias, which absorption does not support")
        w = w_t.t().reshape(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, r)
        self.w_k = w[:, : self.qk_nope_head_dim].contiguous()
        self.w_v = w[:, self.qk_nope_head_dim :].contiguous()

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, **kwargs):
        cache = _cache_of(kwargs)
        if self.w_k is None:
            self._absorb()
        attn = self.attn
        batch, q_len = hidden_states.shape[:-1]
        q_resid = None
        if self.q_lora_rank is None:
            q = attn.q_proj(hidden_states)
        else:
            q_resid = attn.q_a_layernorm(attn.q_a_proj(hidden_states))
            q = attn.q_b_proj(q_resid)
        q = q.view(batch, q_len, -1, self.qk_head_dim).transpose(1, 2)
        q_nope, q_pe = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

        compressed = attn.kv_a_proj_with_mqa(hidden_states)
        latent, k_pe = torch.split(compressed, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent = attn.kv_a_layernorm(latent).view(batch, 1, q_len, self.kv_lora_rank)
        k_pe = k_pe.view(batch, 1, q_len, self.qk_rope_head_dim)

        if torch.is_tensor(position_embeddings) and position_embeddings.is_complex():
            q_pe, k_pe = apply_rope_complex(q_pe, k_pe, position_embeddings)
        elif self.rope_interleave:
            q_pe, k_pe = apply_rope_interleaved(q_pe, k_pe, *position_embeddings)
        else:
            q_pe, k_pe = apply_rope(q_pe, k_pe, *position_embeddings)

        if cache is not None:
            latent, k_pe = cache.update(latent, k_pe, self.layer_idx)
        mask = attention_mask
        if mask is None:
            latent, k_pe, mask = _without_mask(latent, k_pe, q_len)
        elif mask.shape[-1] != latent.shape[-2]:
            mask = mask[..., : latent.shape[-2]]
        if self.index_topk is not None:
            mask = self._sparse_mask(hidden_states, q_resid, position_embeddings, mask, cache, latent.shape[-2])

        out = self._attend(q_nope, q_pe, latent, k_pe, mask)
        return attn.o_proj(out.to(hidden_states.dtype)), None

    def _sparse_mask(self, hidden_states, q_resid, position_embeddings, mask, cache, keys: int) -> torch.Tensor:
        """DeepSeek-V3.2's lightning indexer: each query keeps the ``index_topk`` keys of highest index score
        (``sum_h w[h] * relu(q_h . k * scale)`` over the indexer's own heads and its one key per position, kept
        in the cache beside the latents: ``cache.update_indexer``); the returned mask is ``mask`` with every
        other key hidden. Computed as Transformers' ``DeepseekV32Indexer`` does (same shapes and fp32 order,
        so the same keys win)."""
        ix = self.attn.indexer
        batch, q_len = hidden_states.shape[:-1]
        q = ix.wq_b(q_resid).view(batch, q_len, ix.n_heads, ix.head_dim)  # [B, S, H, D]
        k = ix.k_norm(ix.wk(hidden_states)).unsqueeze(2)  # [B, S, 1, D]
        cos, sin = (t.unsqueeze(2) for t in position_embeddings)  # half-split rotary on the first dims
        rot = cos.shape[-1]
        q = torch.cat([q[..., :rot] * cos + rotate_half(q[..., :rot]) * sin, q[..., rot:]], dim=-1)
        k = torch.cat([k[..., :rot] * cos + rotate_half(k[..., :rot]) * sin, k[..., rot:]], dim=-1).squeeze(2)
        if cache is not None:
            k = cache.update_indexer(k, self.layer_idx)
        k = k[:, :keys]
        scores = F.relu(torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1)) * ix.softmax_scale)
        proj_weight = getattr(ix.weights_proj, "weight", None)  # a plain Linear may be kept in fp32 (Transformers)
        x = hidden_states.to(proj_weight.dtype) if isinstance(proj_weight, torch.Tensor) else hidden_states
        weights = ix.weights_proj(x).float() * (ix.n_heads**-0.5)
        index_scores = torch.matmul(weights.unsqueeze(-2), scores).squeeze(-2)  # [B, S, T]
        if mask is None:
            mask = causal_mask(q_len, keys, hidden_states.device)[None, None]
        if mask.dtype == torch.bool:
            index_scores = index_scores.masked_fill(~mask[:, 0], float("-inf"))
        else:
            index_scores = index_scores + mask[:, 0]
        top = index_scores.topk(min(self.index_topk, keys), dim=-1).indices
        dropped = torch.ones_like(index_scores, dtype=torch.bool).scatter(-1, top, False).unsqueeze(1)  # [B, 1, S, T]
        if mask.dtype == torch.bool:
            return mask & ~dropped
        return mask.masked_fill(dropped, torch.finfo(mask.dtype).min)

    def _attend(self, q_nope, q_pe, latent, k_pe, mask) -> torch.Tensor:
        """The heads' outputs ``[B, S, H * v_head_dim]`` (in ``self.dtype``) of queries ``q_nope``
        ``[B, H, S, nope]`` / ``q_pe`` ``[B, H, S, rope]`` over the cache's ``latent`` ``[B, 1, T, r]`` and
        ``k_pe`` ``[B, 1, T, rope]`` with the prepared mask: absorbed (``W_k`` into the query, attention in
        latent space by ``_latent_attention``, then ``W_v``). Subclasses may take another route here."""
        batch, _, q_len, _ = q_nope.shape
        dtype = self.dtype
        q_latent = torch.einsum("bhsn,hnr->bhsr", q_nope.to(dtype), self.w_k)  # [B, H, S, r]
        q_pe, latent, k_pe = q_pe.to(dtype), latent.to(dtype), k_pe.to(dtype)
        out = self._latent_attention(q_latent, q_pe, latent, k_pe, mask)
        return torch.einsum("bhsr,hvr->bshv", out, self.w_v).reshape(batch, q_len, self.num_heads * self.v_head_dim)

    def _latent_attention(self, q_latent, q_pe, latent, k_pe, mask) -> torch.Tensor:
        """Attention in latent space: ``q_latent`` ``[B, H, S, r]`` and ``q_pe`` ``[B, H, S, rope]`` over the
        cache's ``latent`` ``[B, 1, T, r]`` (keys and values) and ``k_pe`` ``[B, 1, T, rope]`` with the prepared
        mask, all in ``self.dtype``: the attention-weighted latents ``[B, H, S, r]``. Subclasses swap the
        kernel here; this one goes ``query_chunk`` queries at a time."""
        batch, heads, q_len, rank = q_latent.shape
        out = torch.empty(batch, heads, q_len, rank, dtype=q_latent.dtype, device=q_latent.device)
        for start in range(0, q_len, self.query_chunk):
            rows = slice(start, min(q_len, start + self.query_chunk))
            scores = torch.matmul(q_latent[:, :, rows], latent.transpose(2, 3))
            scores = scores + torch.matmul(q_pe[:, :, rows], k_pe.transpose(2, 3))
            chunk_mask = None if mask is None else mask[..., rows, :]
            probs = torch.softmax(_add_mask(scores * self.scaling, chunk_mask), dim=-1, dtype=torch.float32)
            out[:, :, rows] = torch.matmul(probs.to(q_latent.dtype), latent)
        return out

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_lora_rank={self.kv_lora_rank}, q_lora_rank={self.q_lora_rank}, "
                f"rope={'interleaved' if self.rope_interleave else 'half'}, dtype={self.dtype}")
