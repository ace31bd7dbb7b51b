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
# Families added for the models people run today (tests/test_families_new.py); same contract as FAMILIES.
NEW_FAMILIES = ("qwen2", "mistral", "glm4_moe", "gpt_oss", "minimax_m2", "llama4", "qwen3_next", "kimi_k2", "deepseek_v32")

# The model_type each family's config carries (the key of the shipped rule files).
MODEL_TYPES = {family: family for family in FAMILIES + NEW_FAMILIES} | {"gemma3": "gemma3_text", "kimi_k2": "deepseek_v3",
                                                                    "llama4": "llama4_text"}

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
    if family in NEW_FAMILIES:
        return _new_family_config(family)
    raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES + NEW_FAMILIES)}")


def _new_family_config(family: str) -> PreTrainedConfig:
    from transformers import AutoConfig

    dense = dict(_COMMON, intermediate_size=512, num_hidden_layers=2, num_key_value_heads=2)
    if family == "qwen2":  # q/k/v with biases
        return AutoConfig.for_model("qwen2", **dense, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
    if family == "mistral":  # llama.cpp writes Mistral as the llama architecture; no sliding window (v0.2+)
        return AutoConfig.for_model("mistral", **dense, head_dim=HEAD_DIM, sliding_window=None,
                                    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
    if family == "glm4_moe":  # GLM-4.5/4.6/4.7: partial rotary, q/k/v biases, sigmoid routing with a bias, shared expert
        return AutoConfig.for_model(
            "glm4_moe", **(dense | {"num_hidden_layers": 3}), head_dim=HEAD_DIM, attention_bias=True,
            moe_intermediate_size=256, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
            first_k_dense_replace=1, n_group=1, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
            use_qk_norm=False, num_nextn_predict_layers=0,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "partial_rotary_factor": 0.5},
        )
    if family == "gpt_oss":  # attention sinks, a window on every other layer, biased experts with clamped SwiGLU
        return AutoConfig.for_model(
            "gpt_oss", **(dense | {"intermediate_size": 256}), head_dim=HEAD_DIM, num_local_experts=8,
            num_experts_per_tok=2, attention_bias=True, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters=dict(YARN_ROPE, rope_theta=150_000.0, truncate=False, mscale=None, mscale_all_dim=None),
        )
    if family == "minimax_m2":  # q/k norms over the whole projection, partial rotary, sigmoid routing with a bias
        return AutoConfig.for_model(
            "minimax_m2", **(dense | {"intermediate_size": 256}), head_dim=HEAD_DIM, num_local_experts=8,
            num_experts_per_tok=2,
            rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.5},
        )
    if family == "kimi_k2":  # Kimi-K2: DeepSeek-V3 at 384 routed experts, 8 active, one group, no q/k rope interleave change
        config = tiny_config("deepseek_v3")
        config.update(dict(n_routed_experts=384, num_experts_per_tok=8, n_group=1, topk_group=1,
                           routed_scaling_factor=2.827, moe_intermediate_size=32, num_hidden_layers=2))
        return config
    if family == "llama4":  # Llama 4 text: every 4th layer without rope, chunked attention, L2 q/k norm, top-1 sigmoid routing
        return AutoConfig.for_model(
            "llama4_text", **(dense | {"num_hidden_layers": 4, "intermediate_size": 256}), head_dim=HEAD_DIM,
            intermediate_size_mlp=512, num_local_experts=8, num_experts_per_tok=1, interleave_moe_layer_step=2,
            attention_chunk_size=8, use_qk_norm=True, attn_temperature_tuning=True, floor_scale=8, attn_scale=0.1,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 128},
        )
    if family == "qwen3_next":  # a gated-delta-net (linear attention) layer, then a gated full-attention layer
        return AutoConfig.for_model(
            "qwen3_next", **dense, head_dim=HEAD_DIM, layer_types=["linear_attention", "full_attention"],
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64, linear_value_head_dim=64,
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256, shared_expert_intermediate_size=256,
            norm_topk_prob=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25},
        )
    # DeepSeek-V3.2: V3's MLA plus the sparse-attention indexer (top 8 keys: prompts go past it). 16 indexer heads:
    # with 4, a key whose every head's ReLU is 0 scores exactly 0, and topk breaks such ties by the layout (chunk,
    # padding), in Transformers too
    if family == "deepseek_v32":
        from transformers import AutoConfig

        v3 = {k: v for k, v in tiny_config("deepseek_v3").to_dict().items() if k in _V3_FIELDS}
        return AutoConfig.for_model("deepseek_v32", **v3, index_topk=8, index_head_dim=64, index_n_heads=16)
    raise ValueError(family)


_V3_FIELDS = (
    "vocab_size", "hidden_size", "num_attention_heads", "max_position_embeddings", "rms_norm_eps", "bos_token_id",
    "eos_token_id", "pad_token_id", "tie_word_embeddings", "intermediate_size", "moe_intermediate_size",
    "num_hidden_layers", "num_key_value_heads", "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
    "v_head_dim", "n_routed_experts", "num_experts_per_tok", "n_shared_experts", "first_k_dense_replace", "n_group",
    "topk_group", "norm_topk_prob", "routed_scaling_factor", "rope_parameters",
)


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
def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> PreTrainedModel:
    """A ``tiny_config(family)`` model (with the config fields ``overrides`` changed) in eval mode with seeded
    random weights (same seed: same weights, whatever the dtype, which only rounds the fp32 draw). Built by
    ``from_config(config, dtype=dtype)``, so modules Transformers keeps in fp32 (DeepSeek's routers) stay
    fp32 as in a real load."""
    config = tiny_config(family)
    config.update(overrides)
    return random_model(_rederive(config), seed, dtype)


@torch.no_grad()
def random_model(config: PreTrainedConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A model of ``config`` in eval mode with ``tiny_model``'s seeded random weights."""
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


# The published widths of the models each new family stands for (config.json of the Hugging Face repos), on
# top of the family's tiny config: for synthetic GGUFs at real widths (``gguf_writer --family``), benches only.
_LONG_ROPE = dict(max_position_embeddings=131072)
REAL_WIDTHS = {
    "qwen2": dict(vocab_size=152064, hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,  # Qwen2.5-7B
                  intermediate_size=18944, num_hidden_layers=28, max_position_embeddings=32768),
    "mistral": dict(vocab_size=32768, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,  # Mistral-7B v0.3
                    head_dim=128, intermediate_size=14336, num_hidden_layers=32, max_position_embeddings=32768),
    "glm4_moe": dict(vocab_size=151552, hidden_size=4096, num_attention_heads=96, num_key_value_heads=8,  # GLM-4.5-Air
                     head_dim=128, intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=128,
                     num_experts_per_tok=8, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=1.0,
                     num_hidden_layers=46, **_LONG_ROPE),
    "gpt_oss": dict(vocab_size=201088, hidden_size=2880, num_attention_heads=64, num_key_value_heads=8,  # gpt-oss-120b
                    head_dim=64, intermediate_size=2880, num_local_experts=128, num_experts_per_tok=4,
                    num_hidden_layers=36, sliding_window=128, **_LONG_ROPE,
                    rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0,
                                         beta_slow=1.0, truncate=False, original_max_position_embeddings=4096)),
    "minimax_m2": dict(vocab_size=200064, hidden_size=3072, num_attention_heads=48, num_key_value_heads=8,  # MiniMax-M2
                       head_dim=128, intermediate_size=1536, num_local_experts=256, num_experts_per_tok=8,
                       num_hidden_layers=62, max_position_embeddings=196608),
    "llama4": dict(vocab_size=202048, hidden_size=5120, num_attention_heads=40, num_key_value_heads=8,  # Llama-4-Scout-17B-16E
                   head_dim=128, intermediate_size=8192, intermediate_size_mlp=16384, num_local_experts=16,
                   num_experts_per_tok=1, interleave_moe_layer_step=1, num_hidden_layers=48, attention_chunk_size=8192,
                   floor_scale=8192, **_LONG_ROPE,
                   rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 16.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}),
    "qwen3_next": dict(vocab_size=151936, hidden_size=2048, num_attention_heads=16, num_key_value_heads=2,  # Qwen3-Next-80B-A3B
                       head_dim=256, intermediate_size=5120, moe_intermediate_size=512, shared_expert_intermediate_size=512,
                       num_experts=512, num_experts_per_tok=10, num_hidden_layers=48, linear_key_head_dim=128,
                       linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=32,
                       max_position_embeddings=262144,
                       rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25}),
    "deepseek_v3": dict(vocab_size=129280, hidden_size=7168, num_attention_heads=128, num_key_value_heads=128,  # DeepSeek-V3
                        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                        intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256, num_experts_per_tok=8,
                        n_shared_experts=1, first_k_dense_replace=3, n_group=8, topk_group=4, routed_scaling_factor=2.5,
                        norm_topk_prob=True, num_hidden_layers=61, max_position_embeddings=163840,
                        rope_parameters=dict(YARN_ROPE, rope_theta=10000.0, factor=40.0, beta_fast=32.0, beta_slow=1.0,
                                             mscale=1.0, mscale_all_dim=1.0, original_max_position_embeddings=4096)),
    "deepseek_v2": dict(vocab_size=102400, hidden_size=2048, num_attention_heads=16, num_key_value_heads=16,  # DeepSeek-V2-Lite
                        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                        intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=64, num_experts_per_tok=6,
                        n_shared_experts=2, first_k_dense_replace=1, num_hidden_layers=27, max_position_embeddings=163840,
                        rope_parameters=dict(YARN_ROPE, rope_theta=10000.0, factor=40.0, beta_fast=32.0, beta_slow=1.0,
                                             mscale=0.707, mscale_all_dim=0.707, original_max_position_embeddings=4096)),
    "kimi_k2": dict(vocab_size=163840, hidden_size=7168, num_attention_heads=64, num_key_value_heads=64,  # Kimi-K2
                    q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                    intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=384, num_experts_per_tok=8,
                    n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=61, **_LONG_ROPE,
                    rope_parameters=dict(YARN_ROPE, rope_theta=50000.0, factor=32.0, beta_fast=1.0,
                                         original_max_position_embeddings=4096)),
}


def real_width_config(family: str, layers: int | None = None) -> PreTrainedConfig:
    """``family``'s config at its real model's widths (``REAL_WIDTHS``), with ``layers`` decoder layers if given."""
    if family not in REAL_WIDTHS:
        raise ValueError(f"no real widths for {family!r}; known: {', '.join(REAL_WIDTHS)}")
    config = tiny_config(family)
    config.update(REAL_WIDTHS[family])
    if family in ("qwen2",):
        config.head_dim = config.hidden_size // config.num_attention_heads
    if layers is not None:
        config.num_hidden_layers = int(layers)
        if hasattr(config, "first_k_dense_replace"):
            config.first_k_dense_replace = min(config.first_k_dense_replace, max(int(layers) - 1, 0))
    n = config.num_hidden_layers
    if getattr(config, "layer_types", None):  # the tiny model's pattern, repeated
        config.layer_types = [config.layer_types[i % len(config.layer_types)] for i in range(n)]
    if family == "gpt_oss":  # even layers slide
        config.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    if family == "llama4":  # every fourth layer: full attention without rope; the rest chunked with rope
        config.no_rope_layers = [0 if (i + 1) % 4 == 0 else 1 for i in range(n)]
        config.layer_types = ["full_attention" if (i + 1) % 4 == 0 else "chunked_attention" for i in range(n)]
        config.moe_layers = list(range(config.interleave_moe_layer_step - 1, n, config.interleave_moe_layer_step))
    if family == "qwen3_next":  # every fourth layer full attention, the rest gated delta nets
        config.layer_types = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n)]
    return _rederive(config)


def _rederive(config: PreTrainedConfig) -> PreTrainedConfig:
    """The fields a config class derives from others in its constructor, which ``config.update`` leaves stale:
    MLA's head_dim (its rope width, what the rotary embedding is built with) and qk_head_dim."""
    if config.model_type in ("deepseek_v2", "deepseek_v3", "deepseek_v32"):
        config.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        config.head_dim = config.qk_rope_head_dim
    return config
