"""Whole decoder layers in one native call per decode step (``KLinearCPU.fuse_decoder_layers``; the core's
``ktcore.fused_decode`` asks for it).

A layer qualifies when it is the pre-norm layer of the Llama / Mistral / Qwen2 / Qwen3 / DeepSeek-V2 families
with every linear on ``KLinearCPU`` (one runtime) and its norms RMSNorms (checked by running them:
``w * x / rms(x)``), and
- its attention is Transformers' own or ``KAttentionSDPA``, without soft-capping or a sliding window; or
  ``KAttentionMLA`` without q LoRA (DeepSeek-V2-Lite), absorbed: each head's query goes to latent space through
  ``kv_b_proj``'s packed key rows, dequantized in float as they stream (8-bit rows in groups of 32: Q8_0, Q5_0,
  Q5_1), or, for other formats, through ``W_k`` transposed and quantized to int8 at fuse time (online, groups of
  16: then not on the GGUF's own values); ``W_v`` is read from ``kv_b_proj``'s packed rows;
- its MLP is gated (SiLU or GELU-tanh), or a DeepSeek-V2 MoE block (greedy softmax top-k routing, routed experts
  on ``KExpertsCPU``, shared experts on ``KLinearCPU``).
The layer then runs as ``Runtime.decoder_step`` (csrc/decoder.cpp) on the same packed weights, or for several
sequences at once as ``Runtime.decoder_step_batch`` (``FusedLayers.step_batch``: the linears as one B-row GEMM,
on the int8 tile kernel from 4 rows, each sequence's attention over its own blocks, latent attention's too): the same
quantized GEMMs as the ops, with norms, rotary, attention, routing and residuals in C++, so outputs match the
module path to float rounding (GQA) or to the absorbed key's int8 rounding (MLA), not bit for bit.
``KT_CPU_FUSE=0`` turns it off.
"""

from __future__ import annotations

import torch
from torch import nn

from . import fusion
from .runtime import get_runtime, kernels, share_cores

LAYER_CLASSES = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer",
                           "DeepseekV2DecoderLayer"})
MOE_ROUTERS = frozenset({"DeepseekV2TopkRouter"})
ATTENTION_CLASSES = frozenset({"LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention"})
LAYER_CHILDREN = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}


class Unfusable(Exception):
    """Why a layer cannot run fused."""


def _floats(t: torch.Tensor | None) -> list[float]:
    return [] if t is None else t.detach().to(device="cpu", dtype=torch.float32).reshape(-1).tolist()


def _rms_norm(module: nn.Module, size: int, what: str) -> tuple[list[float], float]:
    """``(weight, eps)`` of an RMSNorm computing ``w * (x * rsqrt(mean(x^2) + eps))``, checked on a probe."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", None)
    if not isinstance(weight, torch.Tensor) or weight.shape != (size,) or eps is None or not type(module).__name__.endswith("RMSNorm"):
        raise Unfusable(f"{what} is not an RMSNorm of size {size} ({type(module).__name__})")
    probe = torch.linspace(-2.0, 3.0, size, dtype=torch.float32).reshape(1, 1, size)
    with torch.inference_mode():
        got = module(probe)
        want = weight.float() * (probe * torch.rsqrt(probe.pow(2).mean(-1, keepdim=True) + float(eps)))
    if got.shape != want.shape or not torch.allclose(got.float(), want, rtol=1e-5, atol=1e-6):
        raise Unfusable(f"{what} ({type(module).__name__}) does not compute w * x / rms(x)")
    return _floats(weight), float(eps)


def _linear_op(module: nn.Module, what: str):
    from .ops import KLinearCPU

    op = getattr(module, "_modules", {}).get("generate_op")
    if not isinstance(op, KLinearCPU) or op.weight is None:
        raise Unfusable(f"{what} does not run on a loaded KLinearCPU")
    if op._runtime is None:
        op._resolve_runtime()
    return op


def _attention(attn: nn.Module):
    """``(the module owning the projections, the KAttentionMLA op or None)``, checked: Transformers' own
    attention, a KAttentionSDPA wrapper, or a KAttentionMLA wrapper."""
    from ktcore.sdk import KAttention, KAttentionMLA, KAttentionSDPA

    if isinstance(attn, KAttention):
        op = attn._modules.get("generate_op")
        if isinstance(op, KAttentionMLA):
            return attn.original, op
        if not isinstance(op, KAttentionSDPA) or op.softcap is not None or not op.is_causal:
            raise Unfusable(f"attention op {type(op).__name__} is not a causal KAttentionSDPA without soft-capping "
                            "nor a KAttentionMLA")
        original = attn.original
    elif type(attn).__name__ in ATTENTION_CLASSES:
        original = attn
    else:
        raise Unfusable(f"attention {type(attn).__name__} is not one fused decoding knows")
    if getattr(original, "sliding_window", None):
        raise Unfusable("sliding-window attention")
    return original, None


def _gqa(L, attn, config, ops: dict, where: str) -> None:
    L.kind = "gqa"
    L.q, L.k, L.v, L.o = (ops[n].weight for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    L.bq, L.bk, L.bv, L.bo = (_floats(ops[n]._bias) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    L.head_dim = int(attn.head_dim)
    L.heads = int(config.num_attention_heads)
    L.kv_heads = int(getattr(config, "num_key_value_heads", None) or L.heads)
    L.scaling = float(attn.scaling)
    q_norm, k_norm = attn._modules.get("q_norm"), attn._modules.get("k_norm")
    if (q_norm is None) != (k_norm is None):
        raise Unfusable(f"{where}: a q norm without a k norm or the reverse")
    if q_norm is not None:
        L.q_norm, q_eps = _rms_norm(q_norm, L.head_dim, f"{where} q_norm")
        L.k_norm, k_eps = _rms_norm(k_norm, L.head_dim, f"{where} k_norm")
        L.qk_eps = q_eps
        if k_eps != q_eps:
            raise Unfusable(f"{where}: q and k norms have different epsilons")


def _mla(L, attn, op, ops: dict, where: str) -> None:
    if op.q_lora_rank is not None:
        raise Unfusable(f"{where}: latent attention with q LoRA")
    if getattr(attn.config, "rope_interleave", False):
        raise Unfusable(f"{where}: latent attention with interleaved rotary tables")
    if op.w_k is None:
        op._absorb()
    L.kind = "mla"
    L.q, L.k, L.v, L.o = (ops[n].weight for n in ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"))
    if any(ops[n]._bias is not None for n in ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj")):
        raise Unfusable(f"{where}: latent attention projections with biases")
    L.bo = _floats(ops["o_proj"]._bias)
    L.heads, L.nope, L.rope_dim = op.num_heads, op.qk_nope_head_dim, op.qk_rope_head_dim
    L.v_dim, L.rank, L.scaling = op.v_head_dim, op.kv_lora_rank, op.scaling
    L.kv_norm, L.kv_eps = _rms_norm(attn.kv_a_layernorm, L.rank, f"{where} kv_a_layernorm")
    v = L.v
    if v.bits == 8 and v.group == 32 and not v.sub8_scales and not v.sub16_scales:
        return  # W_k read from kv_b's packed rows as they are (csrc: axpy_rows)
    packed = kernels().PackedMatrix
    wkt = []
    for h in range(L.heads):
        w = op.w_k[h].detach().to(device="cpu", dtype=torch.float32).t().contiguous()  # [rank, nope]
        wkt.append(packed.from_float(w.data_ptr(), L.rank, L.nope, 8))
    L.wkt = wkt


def _moe(L, mlp, hidden: int, where: str):
    """The routed experts' op of a DeepSeek-V2 MoE block (router checked), or raises."""
    from ktcore.sdk import KExperts

    from .ops import KExpertsCPU

    gate, experts = mlp._modules.get("gate"), mlp._modules.get("experts")
    if type(gate).__name__ not in MOE_ROUTERS or getattr(gate, "topk_method", None) != "greedy":
        raise Unfusable(f"{where}: the MoE router is not DeepSeek-V2's greedy top-k ({type(gate).__name__})")
    op = experts._modules.get("generate_op") if isinstance(experts, KExperts) else None
    if not isinstance(op, KExpertsCPU) or op.layer is None:
        raise Unfusable(f"{where}: the routed experts do not run on a loaded KExpertsCPU")
    L.experts = op.layer
    L.router = _floats(gate.weight)
    L.top_k = int(gate.top_k)
    L.routed_scale = float(gate.routed_scaling_factor)
    return op


def _layer(layer: nn.Module, cache_layer, index: int):
    """``(DecoderLayer, runtime, ops)`` for one decoder layer, or raises ``Unfusable``."""
    where = f"layer {index}"
    if type(layer).__name__ not in LAYER_CLASSES or set(layer._modules) != LAYER_CHILDREN:
        raise Unfusable(f"{where}: {type(layer).__name__} is not a decoder layer fused decoding knows")
    config = layer.self_attn.config
    hidden = config.hidden_size
    attn, mla = _attention(layer.self_attn)
    names = ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj") if mla else ("q_proj", "k_proj", "v_proj", "o_proj")
    ops = {name: _linear_op(getattr(attn, name, None), f"{where} {name}") for name in names}
    mlp = layer.mlp
    L = kernels().DecoderLayer()
    if "experts" in mlp._modules:
        experts_op = _moe(L, mlp, hidden, where)
        dense = mlp._modules.get("shared_experts")
        if set(mlp._modules) - {"gate", "experts", "shared_experts"}:
            raise Unfusable(f"{where}: the MoE block has more than a router, experts and shared experts")
    else:
        experts_op, dense = None, mlp
    if dense is not None:
        for name in ("gate_proj", "up_proj", "down_proj"):
            ops[name] = _linear_op(getattr(dense, name, None), f"{where} mlp {name}")
        if set(dense._modules) - {"gate_proj", "up_proj", "down_proj", "act_fn"}:
            raise Unfusable(f"{where}: the MLP has more than gate, up and down projections")
        from .ops import _activation_name

        try:
            L.act = _activation_name(dense)
        except ValueError as exc:
            raise Unfusable(f"{where}: {exc}") from None
        L.gate, L.up, L.down = (ops[n].weight for n in ("gate_proj", "up_proj", "down_proj"))
        L.bgate, L.bup, L.bdown = (_floats(ops[n]._bias) for n in ("gate_proj", "up_proj", "down_proj"))
    runtimes = {id(op._runtime) for op in ops.values()}
    if experts_op is not None:
        if experts_op._runtime is None:
            experts_op._runtime = get_runtime(experts_op.threads, experts_op.isa)
        runtimes.add(id(experts_op._runtime))
    if len(runtimes) != 1:
        raise Unfusable(f"{where}: its ops run on different kt_cpu_amx runtimes (threads or ISA differ)")
    if mla:
        _mla(L, attn, mla, ops, where)
    else:
        _gqa(L, attn, config, ops, where)
    L.attn_norm, L.eps = _rms_norm(layer.input_layernorm, hidden, f"{where} input_layernorm")
    L.mlp_norm, mlp_eps = _rms_norm(layer.post_attention_layernorm, hidden, f"{where} post_attention_layernorm")
    if mlp_eps != layer.input_layernorm.variance_epsilon:
        raise Unfusable(f"{where}: its two norms have different epsilons")
    why = L.check()
    if why:
        raise Unfusable(f"{where}: {why}")
    keys, values = getattr(cache_layer, "keys", None), getattr(cache_layer, "values", None)
    if mla:
        shapes = [(1, 1, cache_layer.max_cache_len, L.rank), (1, 1, cache_layer.max_cache_len, L.rope_dim)]
    else:
        shapes = [(1, L.kv_heads, cache_layer.max_cache_len, L.head_dim)] * 2
    for t, shape in zip((keys, values), shapes):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype is not torch.float32 \
                or not t.is_contiguous() or t.device.type != "cpu":
            raise Unfusable(f"{where}: its cache is not float32 {list(shape)} on the CPU (one sequence)")
    L.set_cache(keys.data_ptr(), values.data_ptr(), cache_layer.max_cache_len)
    return L, ops["o_proj"]._runtime, ops["o_proj"]


class FusedLayers:
    """``step(hidden, position_embeddings, position)`` through every layer (see ``ktcore.fused_decode``)."""

    def __init__(self, runtime, layers: list, torch_threads, keep: list):
        self.runtime = runtime
        self.layers = layers
        self.torch_threads = torch_threads
        self._keep = keep  # the cache tensors the layers point into: (keys, values) per layer
        self._slot_offset = 0

    def _point_at(self, slot_offset: int) -> None:
        """Point every layer's cache at slot ``slot_offset`` of its pool (the head stride stays the pool's)."""
        for i, L in enumerate(self.layers):
            keys, values = self._keep[2 * i], self._keep[2 * i + 1]
            kf, vf = (L.rank, L.rope_dim) if L.kind == "mla" else (L.head_dim, L.head_dim)  # floats per slot
            L.set_cache(keys.data_ptr() + 4 * slot_offset * kf, values.data_ptr() + 4 * slot_offset * vf,
                        keys.shape[2])
        self._slot_offset = slot_offset

    def _rotary(self, position_embeddings, rows: int):
        """``(cos, sin)`` float32 tables of ``rows`` rows for the native call: GQA's two ``[rows, 1, head_dim]``
        tensors, or latent attention's complex factors ``[rows, 1, rope_dim / 2]`` as adjacent (cos, sin) pairs
        (then both the same tensor)."""
        mla = self.layers[0].kind == "mla"
        if mla:
            if not (torch.is_tensor(position_embeddings) and position_embeddings.is_complex()):
                raise ValueError("kt_cpu_amx fused decode: latent attention takes complex rotary factors")
            cos = sin = torch.view_as_real(position_embeddings.to(torch.complex64)).contiguous()
            width = 2 * cos.shape[-2]
        else:
            cos, sin = (t.to(torch.float32).contiguous() for t in position_embeddings)
            width = cos.shape[-1]
        expected = self.layers[0].rope_dim if mla else self.layers[0].head_dim
        if width != expected or cos.numel() != rows * width:
            raise ValueError(f"kt_cpu_amx fused decode: the rotary tables must be {rows} rows of {expected}; got "
                             f"{tuple(cos.shape)}")
        return cos, sin

    def step_batch(self, hidden: torch.Tensor, position_embeddings, positions: torch.Tensor, tables: torch.Tensor,
                   block_size: int) -> None:
        """One step of B sequences: ``hidden`` ``[B, 1, H]`` (updated in place), the rotary module's output for
        their positions, ``positions`` int32 ``[B]``, ``tables`` int32 ``[B, width]`` (each row's blocks of its
        layers' pools)."""
        batch = hidden.shape[0]
        if hidden.dtype is not torch.float32 or not hidden.is_contiguous():
            raise ValueError(f"kt_cpu_amx fused decode: hidden must be contiguous float32 [B, 1, H]; got {hidden.dtype}")
        cos, sin = self._rotary(position_embeddings, batch)
        for t, what in ((positions, "positions"), (tables, "tables")):
            if t.dtype is not torch.int32 or not t.is_contiguous() or t.shape[0] != batch:
                raise ValueError(f"kt_cpu_amx fused decode: {what} must be contiguous int32 with {batch} rows")
        if self._slot_offset != 0:
            self._point_at(0)
        share_cores(batch, self.torch_threads)
        self.runtime.decoder_step_batch(self.layers, batch, hidden.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                        positions.data_ptr(), tables.data_ptr(), tables.shape[1], int(block_size))

    def step(self, hidden: torch.Tensor, position_embeddings, position: int, slot_offset: int = 0) -> None:
        if hidden.dtype is not torch.float32 or not hidden.is_contiguous():
            raise ValueError(f"kt_cpu_amx fused decode: hidden must be contiguous float32; got {hidden.dtype}")
        cos, sin = self._rotary(position_embeddings, 1)
        if slot_offset != self._slot_offset:
            self._point_at(slot_offset)
        share_cores(1, self.torch_threads)
        self.runtime.decoder_step(self.layers, hidden.data_ptr(), cos.data_ptr(), sin.data_ptr(), position)


def fuse_decoder_layers(layers: list, cache_layers: list):
    """A ``FusedLayers`` for the model's decoder layers over their caches, or why not (a string)."""
    if not fusion.ENABLED:
        return "kt_cpu_amx fusion is off (KT_CPU_FUSE=0)"
    built, keep, runtime, op = [], [], None, None
    try:
        for i, (layer, cache_layer) in enumerate(zip(layers, cache_layers)):
            L, rt, op = _layer(layer, cache_layer, i)
            if runtime is not None and rt is not runtime:
                raise Unfusable(f"layer {i} runs on another kt_cpu_amx runtime than layer 0")
            runtime = rt
            built.append(L)
            keep += [cache_layer.keys, cache_layer.values]
    except Unfusable as exc:
        return f"kt_cpu_amx cannot fuse the decoder layers: {exc}"
    return FusedLayers(runtime, built, op._torch_threads, keep)
