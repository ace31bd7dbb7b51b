"""Tiny models of every supported family, for tests: explicit configs and seeded random weights; and
GGUF-quantized sample tensors with their ``gguf.quants`` reference values.

Every ``nn.Linear`` (and every expert projection) has ``in_features`` a multiple of 256, so that GGUF
K-quants (256-value super-blocks) apply to all of them. Weights are drawn with a scale of
``1/sqrt(in_features)`` so activations stay O(1) through the layers: attention is far from uniform,
routers spread tokens over the experts and the logits differ clearly between positions.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    Gemma3TextConfig,
    LlamaConfig,
    MixtralConfig,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

from .weights.quants import GGML_TYPES
from .weights.tensor import QuantizedTensor

FAMILIES = ("llama", "qwen3", "gemma3", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3")

# The model_type each family's config carries (the key of the shipped rule files).
MODEL_TYPES = {family: family for family in FAMILIES} | {"gemma3": "gemma3_text"}

VOCAB = 512
HIDDEN = 256
HEADS = 4
HEAD_DIM = 64  # HEADS * HEAD_DIM == 256: o_proj's in_features
MAX_POSITIONS = 512

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_attention_heads=HEADS,
    max_position_embeddings=MAX_POSITIONS,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)

# Rope scalings the tiny configs exercise (original context 128 so that the short prompts of the tests
# already cover frequencies that YaRN and llama3 interpolate and others they keep).
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=10000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=128,
)
YARN_ROPE = dict(
    rope_type="yarn",
    rope_theta=10000.0,
    factor=4.0,
    original_max_position_embeddings=128,
    beta_fast=32.0,
    beta_slow=1.0,
    mscale=1.0,
    mscale_all_dim=1.0,
)


def tiny_config(family: str) -> PreTrainedConfig:
    """A 2-3 layer config of ``family`` (one of ``FAMILIES``)."""
    if family == "llama":
        return LlamaConfig(
            **_COMMON,
            intermediate_size=512,
            num_hidden_layers=2,
            num_key_value_heads=2,
            head_dim=HEAD_DIM,
            rope_parameters=dict(LLAMA3_ROPE),
        )
    if family == "qwen3":
        return Qwen3Config(
            **_COMMON,
            intermediate_size=512,
            num_hidden_layers=2,
            num_key_value_heads=2,
            head_dim=HEAD_DIM,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        )
    if family == "gemma3":
        return Gemma3TextConfig(
            **(_COMMON | {"tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": 1}),
            intermediate_size=512,
            num_hidden_layers=3,
            num_key_value_heads=1,
            head_dim=HEAD_DIM,
            query_pre_attn_scalar=HEAD_DIM,
            hidden_activation="gelu_pytorch_tanh",
            # a window shorter than the test prompts, so the sliding layers really slide
            sliding_window=8,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 1_000_000.0, "factor": 2.0},
            },
        )
    if family == "qwen2_moe":
        return Qwen2MoeConfig(
            **_COMMON,
            intermediate_size=512,
            num_hidden_layers=2,
            num_key_value_heads=2,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=256,
            shared_expert_intermediate_size=512,
            norm_topk_prob=False,
            qkv_bias=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        )
    if family == "qwen3_moe":
        return Qwen3MoeConfig(
            **_COMMON,
            intermediate_size=512,
            num_hidden_layers=2,
            num_key_value_heads=2,
            head_dim=HEAD_DIM,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=256,
            norm_topk_prob=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        )
    if family == "mixtral":
        return MixtralConfig(
            **_COMMON,
            intermediate_size=256,
            num_hidden_layers=2,
            num_key_value_heads=2,
            head_dim=HEAD_DIM,
            num_local_experts=8,
            num_experts_per_tok=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        )
    if family in ("deepseek_v2", "deepseek_v3"):
        mla = dict(
            **_COMMON,
            intermediate_size=512,
            moe_intermediate_size=256,
            num_hidden_layers=3,
            num_key_value_heads=HEADS,
            kv_lora_rank=256,  # kv_b_proj's in_features
            qk_nope_head_dim=64,
            qk_rope_head_dim=32,
            v_head_dim=64,  # HEADS * v_head_dim == 256: o_proj's in_features
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,  # layer 0 dense, layers 1-2 MoE
        )
        if family == "deepseek_v2":
            return DeepseekV2Config(
                **mla,
                q_lora_rank=None,
                topk_method="greedy",
                routed_scaling_factor=1.0,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            )
        return DeepseekV3Config(
            **mla,
            q_lora_rank=256,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            rope_interleave=True,
            rope_parameters=dict(YARN_ROPE),
        )
    raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")


def _fill_(name: str, tensor: torch.Tensor, generator: torch.Generator, zero_centered_norms: bool, tied: bool) -> None:
    """Draw one tensor's values in place (in fp32, then cast)."""
    leaf = name.rsplit(".", 1)[-1]
    shape = tensor.shape
    if "norm" in name and tensor.dim() == 1:
        # RMSNorm gains around 1 (Gemma stores them as ``gain - 1``)
        values = 0.1 * torch.randn(shape, generator=generator)
        if not zero_centered_norms:
            values += 1.0
    elif leaf == "e_score_correction_bias" or leaf == "bias":
        values = 0.1 * torch.randn(shape, generator=generator)
    elif "embed_tokens" in name:
        # a tied embedding is also the output head: scale it like one
        values = torch.randn(shape, generator=generator) / (shape[-1] ** 0.5 if tied else 1.0)
    else:
        # linear [out, in], router [E, in], fused experts [E, out, in]: the last dim is in_features
        values = torch.randn(shape, generator=generator) / shape[-1] ** 0.5
    tensor.copy_(values.to(tensor.dtype))


@torch.no_grad()
def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A ``tiny_config(family)`` model in eval mode with seeded random weights (same seed: same weights,
    whatever the dtype, which only rounds the fp32 draw). Built by ``from_config(config, dtype=dtype)``, so
    modules Transformers keeps in fp32 (DeepSeek's routers) stay fp32 as in a real load."""
    config = tiny_config(family)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    zero_centered = config.model_type.startswith("gemma")
    tensors = dict(model.named_parameters())
    persistent = set(model.state_dict())
    tensors.update({n: b for n, b in model.named_buffers() if n in persistent})
    for name in sorted(tensors):
        _fill_(name, tensors[name], generator, zero_centered, bool(config.tie_word_embeddings))
    return model.eval()


_K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")  # gguf.quants cannot quantize these


def quantized_sample(ggml_type: str, shape: tuple[int, ...], seed: int = 0, name: str = "w") -> QuantizedTensor:
    """A seeded GGUF tensor: quantized with ``gguf.quants`` where it can, else random whole blocks with sane
    scales (``gguf.quants`` only dequantizes the K-quants). Its reference values are ``gguf_reference``."""
    rng = np.random.default_rng(seed)
    qtype = GGMLQuantizationType[ggml_type]
    if ggml_type in _K_TYPES:
        nbytes, halves = GGML_TYPES[ggml_type].type_size, GGML_TYPES[ggml_type].scale_fields
        blocks = rng.integers(0, 256, size=(int(np.prod(shape)) // 256, nbytes), dtype=np.uint8)
        for at in halves:
            blocks[:, at : at + 2] = (rng.uniform(1e-4, 1e-3, size=(blocks.shape[0], 1))).astype(np.float16).view(np.uint8)
        raw = blocks.reshape(-1)
    else:
        values = rng.standard_normal(shape).astype(np.float32) * 0.05
        if ggml_type in ("Q4_1", "Q5_1"):
            values += rng.uniform(-0.05, 0.05, size=shape[:-1] + (1,)).astype(np.float32)  # non-zero group means
        raw = quants.quantize(values, qtype).reshape(-1)
    return QuantizedTensor(name=name, ggml_type=ggml_type, shape=tuple(shape), data=torch.from_numpy(raw.copy()), source="test")


def gguf_reference(qt: QuantizedTensor) -> torch.Tensor:
    """``gguf.quants``' float32 dequantization of ``qt``."""
    raw = qt.data.numpy().reshape(*qt.shape[:-1], -1)
    return torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType[qt.ggml_type]).astype(np.float32)).reshape(qt.shape)


def quantized_moe_weights(experts: int, hidden: int, inter: int, ggml_type: str, layer: int = 1) -> dict[str, QuantizedTensor]:
    """Seeded ``gate_proj``/``up_proj`` ``[E, inter, hidden]`` and ``down_proj`` ``[E, hidden, inter]`` of one
    MoE layer, as an experts op's ``load`` takes them."""
    return {
        "gate_proj": quantized_sample(ggml_type, (experts, inter, hidden), seed=10, name=f"blk.{layer}.ffn_gate_exps.weight"),
        "up_proj": quantized_sample(ggml_type, (experts, inter, hidden), seed=11, name=f"blk.{layer}.ffn_up_exps.weight"),
        "down_proj": quantized_sample(ggml_type, (experts, hidden, inter), seed=12, name=f"blk.{layer}.ffn_down_exps.weight"),
    }


def experts_loop_reference(weights, act, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """The routed experts one (token, slot) at a time on ``gguf_reference`` weights, float32; an expert index
    outside ``[0, E)`` contributes nothing."""
    gate, up, down = (gguf_reference(weights[p]) for p in ("gate_proj", "up_proj", "down_proj"))
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(top_k_index.shape[1]):
            e = int(top_k_index[t, k])
            if 0 <= e < gate.shape[0]:
                h = act(gate[e] @ x[t]) * (up[e] @ x[t])
                out[t] += top_k_weights[t, k] * (down[e] @ h)
    return out
