"""Triton flash attention where several query heads share one key/value head: DeepSeek's absorbed
multi-head latent attention (every head reads the same latent cache) and grouped-query attention.

One kernel serves both. A program takes a block of *rows*, a row being one (query position, query head)
pair of the ``group`` heads that share a key/value head, so keys and values are loaded once for the whole
group instead of once per head. Scores are ``q . k`` plus an optional second product ``q_rope . k_rope``
(MLA's decoupled rotary part), values are their own tensor or the keys themselves (MLA: the latent ``c``
is both). Attention is causal with the queries as the last ``q_len`` of the ``kv_len`` keys (as after a
cache update); an optional mask (bool, or additive float as Transformers builds them) restricts it further
(padding, sliding windows, the unfilled tail of a static cache).

Decode (few rows) splits the keys across programs (flash-decoding): each writes its normalized partial
output and log-sum-exp, and a second kernel combines them. The number of splits depends on shapes only,
and nothing here reads a tensor's value on the host, so calls can be captured in a CUDA graph.

The kernels are decorated at first use, so that a test can set ``TRITON_INTERPRET=1`` for one call and
run them on CPU tensors in Triton's interpreter.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def _attention_kernel(
    Q, QR, K, KR, V, Mask, Out, PartO, PartLse,
    stride_qb, stride_qh, stride_qs,
    stride_qrb, stride_qrh, stride_qrs,
    stride_kb, stride_kh, stride_kt,
    stride_krb, stride_krh, stride_krt,
    stride_vb, stride_vh, stride_vt,
    stride_mb, stride_mh, stride_ms, stride_mt,
    stride_ob, stride_oh, stride_os,
    kv_heads, group, q_len, kv_len, keys_per_split, num_splits, qk_scale,
    D: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_ROPE: tl.constexpr, V_IS_K: tl.constexpr, MASK_KIND: tl.constexpr, SPLIT: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // kv_heads).to(tl.int64)
    kvh = pid_bh % kv_heads
    n_rows = q_len * group
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    s = rows // group
    h = kvh * group + rows % group

    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + s[:, None] * stride_qs + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    if HAS_ROPE:
        offs_dr = tl.arange(0, BLOCK_DR)
        qr = tl.load(QR + b * stride_qrb + h[:, None] * stride_qrh + s[:, None] * stride_qrs + offs_dr[None, :],
                     mask=row_ok[:, None] & (offs_dr[None, :] < DR), other=0.0)

    # keys a row may see: causal, the queries being the last q_len positions
    offset = kv_len - q_len
    last_row = tl.minimum(pid_m * BLOCK_M + BLOCK_M, n_rows) - 1
    lo = pid_s * keys_per_split
    hi = tl.minimum(lo + keys_per_split, offset + last_row // group + 1)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    k_base = K + b * stride_kb + kvh * stride_kh
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :],
                    mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        if HAS_ROPE:
            kr = tl.load(KR + b * stride_krb + kvh * stride_krh + cols[:, None] * stride_krt + offs_dr[None, :],
                         mask=col_ok[:, None] & (offs_dr[None, :] < DR), other=0.0)
            if IEEE:
                qk += tl.dot(qr, tl.trans(kr), input_precision="ieee")
            else:
                qk += tl.dot(qr, tl.trans(kr))
        qk = qk * qk_scale
        allowed = col_ok[None, :] & (cols[None, :] <= offset + s[:, None])
        if MASK_KIND != 0:
            m_ptrs = Mask + b * stride_mb + h[:, None] * stride_mh + s[:, None] * stride_ms + cols[None, :] * stride_mt
            m_ok = row_ok[:, None] & col_ok[None, :]
            if MASK_KIND == 1:
                allowed = allowed & (tl.load(m_ptrs, mask=m_ok, other=0) != 0)
            else:
                # clamped first: Transformers fills with finfo.min, which overflows when scaled (harmless, but noisy)
                qk += tl.maximum(tl.load(m_ptrs, mask=m_ok, other=0.0).to(tl.float32), -1e30) * 1.4426950408889634
        qk = tl.where(allowed, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at zero
        p = tl.exp2(qk - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        if V_IS_K:
            v = k
        else:
            v = tl.load(V + b * stride_vb + kvh * stride_vh + cols[:, None] * stride_vt + offs_dv[None, :],
                        mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    seen = l_i > 0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    if SPLIT:
        part = (pid_bh * num_splits + pid_s).to(tl.int64) * n_rows + rows
        tl.store(PartO + part[:, None] * BLOCK_DV + offs_dv[None, :], o, mask=row_ok[:, None])
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(PartLse + part, lse, mask=row_ok)
    else:
        o_ptrs = Out + b * stride_ob + h[:, None] * stride_oh + s[:, None] * stride_os + offs_dv[None, :]
        tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))


def _combine_kernel(
    PartO, PartLse, Out, stride_ob, stride_oh, stride_os, kv_heads, group, n_rows, num_splits,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
):
    """Merges the splits' partial outputs of one row by their log-sum-exps (log2 units)."""
    row = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // kv_heads).to(tl.int64)
    s = row // group
    h = (pid_bh % kv_heads) * group + row % group
    lse_base = PartLse + pid_bh.to(tl.int64) * num_splits * n_rows + row
    splits = tl.arange(0, BLOCK_SPLITS)
    lse = tl.load(lse_base + splits * n_rows, mask=splits < num_splits, other=float("-inf"))
    m = tl.max(lse, 0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp2(lse - m_ref), 0)
    offs_dv = tl.arange(0, BLOCK_DV)
    acc = tl.zeros([BLOCK_DV], tl.float32)
    o_base = PartO + (pid_bh.to(tl.int64) * num_splits * n_rows + row) * BLOCK_DV
    for i in range(0, num_splits):
        w = tl.exp2(tl.load(lse_base + i * n_rows) - m_ref)
        acc += w * tl.load(o_base + i * n_rows * BLOCK_DV + offs_dv)
    o = acc / tl.where(total > 0, total, 1.0)
    tl.store(Out + b * stride_ob + h * stride_oh + s * stride_os + offs_dv, o.to(Out.dtype.element_ty), mask=offs_dv < DV)


@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool):
    """The jitted kernels for the current mode (``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates)."""
    return triton.jit(_attention_kernel), triton.jit(_combine_kernel)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _launch_config(d: int, dv: int, rows: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)``: row blocks of 16 for decode-sized row counts; with MLA's
    512-wide latents the key tile is kept small so that tiles and the fp32 accumulator fit. float32 inputs
    (exact dots, no tensor cores) spread the same tile over 8 warps: DeepSeek-V2-Lite's 16 heads over 560 /
    4096 cached positions on an H200, in a CUDA graph, 30.6 / 43.3 us against 35.7 / 49.1 us at 4 warps
    (bfloat16 at 4 warps: 8.4 / 20.6 us)."""
    wide = max(d, dv) >= 256
    if rows <= 16:
        if wide and dtype == torch.float32:
            return 16, 32, 8, 2
        return 16, (32 if wide else 64), 4, 2
    if wide:
        return (32 if rows <= 32 else 64), 32, 8, 2
    return (32 if rows <= 32 else 64), 64, 4, 2


def _smaller(config: tuple[int, int, int, int]) -> tuple[int, int, int, int] | None:
    """The next config to try when a kernel asks for more shared memory or registers than the GPU has."""
    block_m, block_n, warps, stages = config
    if stages > 1:
        return block_m, block_n, warps, 1
    if block_m > 16:
        return block_m // 2, block_n, warps, 2
    if block_n > 16:
        return block_m, block_n // 2, warps, 2
    return None


_FITTED: dict[tuple, tuple[int, int, int, int]] = {}


def _num_splits(programs: int, key_blocks: int, device: torch.device, requested: int | None) -> int:
    if requested is not None:
        return max(1, min(int(requested), key_blocks))
    if device.type != "cuda":
        return 1
    target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(key_blocks, -(-target // programs)))


def _check_4d(name: str, t: torch.Tensor | None) -> None:
    if t is not None and t.dim() != 4:
        raise ValueError(f"flash_attention: {name} must be 4-D [batch, heads, length, dim], got shape {tuple(t.shape)}")


def _last_dim_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None = None,
    *,
    scale: float,
    q_rope: torch.Tensor | None = None,
    k_rope: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    num_splits: int | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Causal attention of ``q`` ``[B, H, S, D]`` over ``k`` ``[B, KVH, T, D]`` (``H`` a multiple of
    ``KVH``; head ``h`` reads key head ``h // (H // KVH)``) and ``v`` ``[B, KVH, T, DV]``, or over the keys as
    values when ``v`` is None. ``q_rope`` ``[B, H, S, DR]`` / ``k_rope`` ``[B, KVH, T, DR]`` add a second
    score term. The queries are the last ``S`` of the ``T`` positions. ``mask`` (broadcastable to
    ``[B, H, S, T]``; bool: True where allowed, or float added to the scores) restricts further.
    ``num_splits`` forces the number of key splits (default: enough programs to fill the GPU); ``config``
    ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` overrides the launch settings (for benchmarks).
    Returns ``[B, H, S, DV]`` in ``q``'s dtype; softmax and accumulation in fp32."""
    for name, t in (("q", q), ("k", k), ("v", v), ("q_rope", q_rope), ("k_rope", k_rope)):
        _check_4d(name, t)
    if (q_rope is None) != (k_rope is None):
        raise ValueError("flash_attention: q_rope and k_rope go together")
    B, H, S, D = q.shape
    _, KVH, T, _ = k.shape
    values = k if v is None else v
    DV = values.shape[-1]
    if k.shape[0] != B or k.shape[-1] != D or values.shape[:3] != k.shape[:3]:
        raise ValueError(f"flash_attention: q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(values.shape)} do not agree")
    if H % KVH:
        raise ValueError(f"flash_attention: {H} query heads are not a multiple of {KVH} key/value heads")
    if S > T:
        raise ValueError(f"flash_attention: {S} queries but only {T} keys (the queries' own keys must be among them)")
    DR = 0
    if q_rope is not None:
        DR = q_rope.shape[-1]
        if q_rope.shape[:3] != q.shape[:3] or k_rope.shape[:3] != k.shape[:3] or k_rope.shape[-1] != DR:
            raise ValueError(f"flash_attention: q_rope {tuple(q_rope.shape)} / k_rope {tuple(k_rope.shape)} do not match q, k")
    dtypes = {t.dtype for t in (q, k, values, q_rope, k_rope) if t is not None}
    if len(dtypes) != 1:
        raise ValueError(f"flash_attention: inputs must share one dtype, got {sorted(map(str, dtypes))}")
    dtype = q.dtype
    q, k, v, q_rope, k_rope = (_last_dim_contiguous(t) for t in (q, k, v, q_rope, k_rope))

    mask_kind, mask_arg, mask_strides = 0, q, (0, 0, 0, 0)
    if mask is not None:
        if mask.dim() != 4 or mask.shape[-1] != T or mask.shape[-2] not in (1, S):
            raise ValueError(f"flash_attention: mask of shape {tuple(mask.shape)} does not broadcast to {(B, H, S, T)}")
        mask = mask.expand(B, H, S, T)
        mask_kind = 1 if mask.dtype == torch.bool else 2
        mask_arg = mask.view(torch.uint8) if mask_kind == 1 else mask
        mask_strides = mask_arg.stride()

    out = torch.empty(B, H, S, DV, dtype=dtype, device=q.device)
    group = H // KVH
    rows = S * group
    block_d, block_dv = triton.next_power_of_2(D), triton.next_power_of_2(DV)
    block_dr = triton.next_power_of_2(DR) if DR else 16
    attention_kernel, combine_kernel = _kernels(_interpreting())
    key = (D, DV, DR, rows <= 16, min(rows, 64), str(dtype), q.device.type)
    chosen = config is None  # a caller's config (benchmarks) is used, not remembered for the defaults
    config = config or _FITTED.get(key) or _launch_config(D, DV, rows, dtype)
    while True:
        block_m, block_n, warps, stages = config
        row_blocks = triton.cdiv(rows, block_m)
        key_blocks = triton.cdiv(T, block_n)
        splits = _num_splits(row_blocks * B * KVH, key_blocks, q.device, num_splits)
        keys_per_split = triton.cdiv(key_blocks, splits) * block_n
        splits = triton.cdiv(T, keys_per_split)
        part_o = part_lse = out
        if splits > 1:
            part_o = torch.empty(B * KVH * splits * rows, block_dv, dtype=torch.float32, device=q.device)
            part_lse = torch.empty(B * KVH * splits * rows, dtype=torch.float32, device=q.device)
        try:
            attention_kernel[(row_blocks, B * KVH, splits)](
                q, q if q_rope is None else q_rope, k, k if k_rope is None else k_rope, k if v is None else v,
                mask_arg, out, part_o, part_lse,
                *q.stride()[:3], *(q if q_rope is None else q_rope).stride()[:3],
                *k.stride()[:3], *(k if k_rope is None else k_rope).stride()[:3],
                *(k if v is None else v).stride()[:3],
                *mask_strides, *out.stride()[:3],
                KVH, group, S, T, keys_per_split, splits, float(scale) * LOG2E,
                D=D, DR=max(DR, 1), DV=DV, BLOCK_D=block_d, BLOCK_DR=block_dr, BLOCK_DV=block_dv,
                HAS_ROPE=q_rope is not None, V_IS_K=v is None, MASK_KIND=mask_kind, SPLIT=splits > 1,
                IEEE=dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages,
            )
        except triton.runtime.errors.OutOfResources:
            config = _smaller(config)
            if config is None:
                raise
            continue
        if chosen:
            _FITTED[key] = config
        break
    if splits > 1:
        combine_kernel[(rows, B * KVH)](
            part_o, part_lse, out, *out.stride()[:3], KVH, group, rows, splits,
            DV=DV, BLOCK_DV=block_dv, BLOCK_SPLITS=triton.next_power_of_2(splits), num_warps=4,
        )
    return out


def latent_attention(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    *,
    scale: float,
    mask: torch.Tensor | None = None,
    num_splits: int | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Absorbed MLA: ``q_latent`` ``[B, H, S, r]`` and ``q_rope`` ``[B, H, S, rope]`` against the cache's
    ``latent`` ``[B, 1, T, r]`` (keys and values at once) and ``k_rope`` ``[B, 1, T, rope]``. Returns the
    attention-weighted latents ``[B, H, S, r]``."""
    if latent.dim() != 4 or latent.shape[1] != 1:
        raise ValueError(f"latent_attention: latent must be [B, 1, T, r], got {tuple(latent.shape)}")
    return flash_attention(q_latent, latent, None, scale=scale, q_rope=q_rope, k_rope=k_rope, mask=mask,
                           num_splits=num_splits, config=config)
