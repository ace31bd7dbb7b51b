"""Whole decoder layers in one native call per decode step (``KLinearCPU.fuse_decoder_layers``; the core's
``ktcore.fused_decode`` asks for it).

A layer qualifies when it is the pre-norm layer of the Llama / Mistral / Qwen2 / Qwen3 families with every
linear on ``KLinearCPU`` (one runtime), its attention Transformers' own or ``KAttentionSDPA`` without
soft-capping or a sliding window, its norms RMSNorms (checked by running them: ``w * x / rms(x)``) and its
MLP gated (SiLU or GELU-tanh). The layer then runs as ``Runtime.decoder_step`` (csrc/decoder.cpp) on the same
packed weights: the same quantized GEMMs as the ops, with norms, rotary, attention and residuals in C++, so
outputs match the module path to float rounding, not bit for bit. ``KT_CPU_FUSE=0`` turns it off.
"""

from __future__ import annotations

import torch
from torch import nn

from . import fusion
from .runtime import kernels, share_cores

LAYER_CLASSES = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"})
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
    """The attention module's projections' owner, checked: Transformers' own or a KAttentionSDPA wrapper."""
    from ktcore.builtin.attention import KAttentionSDPA
    from ktcore.modules import KAttention

    if isinstance(attn, KAttention):
        op = attn._modules.get("generate_op")
        if not isinstance(op, KAttentionSDPA) or op.softcap is not None or not op.is_causal:
            raise Unfusable(f"attention op {type(op).__name__} is not a causal KAttentionSDPA without soft-capping")
        original = attn.original
    elif type(attn).__name__ in ATTENTION_CLASSES:
        original = attn
    else:
        raise Unfusable(f"attention {type(attn).__name__} is not one fused decoding knows")
    if getattr(original, "sliding_window", None):
        raise Unfusable("sliding-window attention")
    return original


def _layer(layer: nn.Module, cache_layer, index: int):
    """``(DecoderLayer, runtime, ops)`` for one decoder layer, or raises ``Unfusable``."""
    where = f"layer {index}"
    if type(layer).__name__ not in LAYER_CLASSES or set(layer._modules) != LAYER_CHILDREN:
        raise Unfusable(f"{where}: {type(layer).__name__} is not a decoder layer fused decoding knows")
    config = layer.self_attn.config
    hidden = config.hidden_size
    attn = _attention(layer.self_attn)
    mlp = layer.mlp
    ops = {name: _linear_op(getattr(attn, name, None), f"{where} {name}") for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    for name in ("gate_proj", "up_proj", "down_proj"):
        ops[name] = _linear_op(getattr(mlp, name, None), f"{where} mlp.{name}")
    if set(mlp._modules) - {"gate_proj", "up_proj", "down_proj", "act_fn"}:
        raise Unfusable(f"{where}: the MLP has more than gate, up and down projections")
    runtimes = {id(op._runtime) for op in ops.values()}
    if len(runtimes) != 1:
        raise Unfusable(f"{where}: its linears run on different kt_cpu_amx runtimes (threads or ISA differ)")
    from .ops import _activation_name

    try:
        act = _activation_name(mlp)
    except ValueError as exc:
        raise Unfusable(f"{where}: {exc}") from None

    L = kernels().DecoderLayer()
    L.q, L.k, L.v, L.o = (ops[n].weight for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    L.gate, L.up, L.down = (ops[n].weight for n in ("gate_proj", "up_proj", "down_proj"))
    L.bq, L.bk, L.bv, L.bo = (_floats(ops[n]._bias) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    L.bgate, L.bup, L.bdown = (_floats(ops[n]._bias) for n in ("gate_proj", "up_proj", "down_proj"))
    L.attn_norm, L.eps = _rms_norm(layer.input_layernorm, hidden, f"{where} input_layernorm")
    L.mlp_norm, mlp_eps = _rms_norm(layer.post_attention_layernorm, hidden, f"{where} post_attention_layernorm")
    if mlp_eps != layer.input_layernorm.variance_epsilon:
        raise Unfusable(f"{where}: its two norms have different epsilons")
    L.head_dim = int(attn.head_dim)
    L.heads = int(config.num_attention_heads)
    L.kv_heads = int(getattr(config, "num_key_value_heads", None) or L.heads)
    L.scaling = float(attn.scaling)
    L.act = act
    q_norm, k_norm = attn._modules.get("q_norm"), attn._modules.get("k_norm")
    if (q_norm is None) != (k_norm is None):
        raise Unfusable(f"{where}: a q norm without a k norm or the reverse")
    if q_norm is not None:
        L.q_norm, q_eps = _rms_norm(q_norm, L.head_dim, f"{where} q_norm")
        L.k_norm, k_eps = _rms_norm(k_norm, L.head_dim, f"{where} k_norm")
        L.qk_eps = q_eps
        if k_eps != q_eps:
            raise Unfusable(f"{where}: q and k norms have different epsilons")
    why = L.check()
    if why:
        raise Unfusable(f"{where}: {why}")
    keys, values = getattr(cache_layer, "keys", None), getattr(cache_layer, "values", None)
    shape = (1, L.kv_heads, cache_layer.max_cache_len, L.head_dim)
    for t in (keys, values):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype is not torch.float32 \
                or not t.is_contiguous() or t.device.type != "cpu":
            raise Unfusable(f"{where}: its cache is not float32 {list(shape)} on the CPU (one sequence)")
    L.set_cache(keys.data_ptr(), values.data_ptr(), cache_layer.max_cache_len)
    return L, ops["q_proj"]._runtime, ops["q_proj"]


class FusedLayers:
    """``step(hidden, cos, sin, position)`` through every layer (see ``ktcore.fused_decode``)."""

    def __init__(self, runtime, layers: list, torch_threads, keep: list):
        self.runtime = runtime
        self.layers = layers
        self.torch_threads = torch_threads
        self._keep = keep  # the cache tensors the layers point into

    def step(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position: int) -> None:
        head_dim = self.layers[0].head_dim
        if hidden.dtype is not torch.float32 or not hidden.is_contiguous() or cos.shape[-1] != head_dim \
                or cos.dtype is not torch.float32 or sin.dtype is not torch.float32:
            raise ValueError(f"kt_cpu_amx fused decode: hidden must be contiguous float32 and cos/sin float32 "
                             f"[..., {head_dim}]; got {hidden.dtype}, {cos.dtype} {tuple(cos.shape)}")
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
