"""Writing GGUF files: a Transformers model as llama.cpp's converter would write it, and synthetic MoE
models streamed tensor by tensor (benches).

``write_gguf(model, path, qtypes)`` uses llama.cpp's metadata keys and tensor names (through gguf-py's
``GGUFWriter`` and ``TensorNameMap``), its q/k row permutation for llama-arch models and its ``+1`` on
Gemma norm gains, and a small byte-level BPE tokenizer when none is given. Config fields GGUF has no key
for (rope variants, Gemma's layer pattern, routing flags) go to the ``ktcore.config_extras`` JSON key.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping

import numpy as np
import torch

from .gguf_config import EXTRAS_KEY
from .names import MODEL_TYPE_TO_ARCH, build_name_map, forward_qk_row_permutation, qkvz_row_permutation
from .quantize import quantize
from .quants import GGML_TYPES

# config fields with no GGUF key, carried in EXTRAS_KEY
_EXTRA_FIELDS = (
    "rope_parameters", "layer_types", "query_pre_attn_scalar", "norm_topk_prob", "rope_interleave", "topk_method",
    "sliding_window", "final_logit_softcapping", "attn_logit_softcapping", "hidden_activation", "hidden_act",
    "qkv_bias", "attention_bias", "decoder_sparse_step", "mlp_only_layers", "routed_scaling_factor", "n_group", "topk_group",
    "head_dim", "attention_chunk_size", "floor_scale", "attn_scale", "no_rope_layers", "use_qk_norm",
    "attn_temperature_tuning",
)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _ggml(type_name: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[type_name]


def pick_qtype(gguf_name: str, shape: tuple[int, ...], qtypes: str | Mapping[str, str]) -> str:
    """The type a tensor is written in: 1-D tensors and routers stay F32 (as llama.cpp keeps them);
    ``qtypes`` is one type name or ``{regex on the GGUF name: type}`` with an optional ``"default"``;
    a type whose block does not divide the row falls back to F16 (F32 if F32 was asked)."""
    if isinstance(qtypes, str):
        wanted = qtypes
    else:
        wanted = next((t for pat, t in qtypes.items() if pat != "default" and re.search(pat, gguf_name)), None)
        wanted = wanted or qtypes.get("default", "F32")
    if len(shape) == 1 or ".ffn_gate_inp" in gguf_name or "exp_probs_b" in gguf_name or gguf_name.endswith(".bias"):
        return "F32" if wanted != "F16" or len(shape) == 1 else wanted
    if shape[-1] % GGML_TYPES[wanted].block_size:
        return "F32" if wanted == "F32" else "F16"
    return wanted


def _byte_bpe_tokenizer(vocab_size: int, n_special: int = 3):
    """A byte-level BPE vocabulary of exactly ``vocab_size`` tokens: ``<pad> <s> </s>``, the 256 bytes, then
    merges learnt from a fixed English text (deterministic)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spell = bytes_to_unicode()
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"][: max(n_special, 3)]
    tokens = list(specials) + [spell[b] for b in range(256)]
    text = ("the quick brown fox jumps over the lazy dog. hello world, how are you today? "
            "a mixture of experts routes every token to a few of its experts, and the rest stay idle. ") * 4
    words = [[spell[b] for b in (" " + w if i else w).encode()] for i, w in enumerate(text.split(" ")) if w]
    merges: list[str] = []
    while len(tokens) < vocab_size:
        counts: dict[tuple[str, str], int] = {}
        for w in words:
            for a, b in zip(w, w[1:]):
                counts[(a, b)] = counts.get((a, b), 0) + 1
        if not counts:
            tokens.append(f"<unused{len(tokens)}>")
            continue
        (a, b), _ = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(f"{a} {b}")
        tokens.append(a + b)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i : i + 2] = [a + b]
                i += 1
    token_types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    return tokens[:vocab_size], merges, token_types[:vocab_size]


def _write_tokenizer(writer, config) -> None:
    vocab_size = config.vocab_size
    n_special = 5 if vocab_size >= 300 else 3
    tokens, merges, types = _byte_bpe_tokenizer(vocab_size, n_special)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, fn in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                    ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(config, key, None)
        if isinstance(value, list):
            value = value[0]
        if value is not None:
            fn(int(value))
    writer.add_add_bos_token(False)
    if n_special == 5:
        writer.add_chat_template(CHATML_TEMPLATE)


def _rope(config) -> dict:
    rope = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in rope:
        rope = rope["full_attention"]
    return dict(rope)


def _write_metadata(writer, config, arch: str, name: str) -> None:
    c = config
    writer.add_name(name)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(getattr(c, "intermediate_size_mlp", None) or c.intermediate_size)  # Llama 4: the dense MLP's
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(getattr(c, "num_key_value_heads", c.num_attention_heads))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    rope = _rope(c)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", "default")
    if rope_type in ("linear", "yarn"):
        writer.add_rope_scaling_type(_rope_scaling_type(rope_type))
        writer.add_rope_scaling_factor(float(rope["factor"]))
        if "original_max_position_embeddings" in rope:
            writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        if rope_type == "yarn" and rope.get("mscale_all_dim"):
            writer.add_rope_scaling_yarn_log_mul(0.1 * float(rope["mscale_all_dim"]))
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    mt = c.model_type
    if mt in ("llama", "mixtral", "mistral"):
        writer.add_rope_dimension_count(head_dim)
    if mt in ("qwen3", "qwen3_moe", "gemma3_text"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    n_experts = getattr(c, "num_experts", None) or getattr(c, "num_local_experts", None) or getattr(c, "n_routed_experts", None)
    if n_experts:
        writer.add_expert_count(n_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
    if getattr(c, "moe_intermediate_size", None) and mt != "mixtral":
        writer.add_expert_feed_forward_length(c.moe_intermediate_size)
    if mt == "qwen2_moe":
        writer.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    if mt in ("deepseek_v2", "deepseek_v3"):
        writer.add_leading_dense_block_count(c.first_k_dense_replace)
        writer.add_expert_shared_count(c.n_shared_experts)
        writer.add_expert_weights_scale(float(c.routed_scaling_factor))
        writer.add_expert_weights_norm(bool(getattr(c, "norm_topk_prob", False)))
        writer.add_expert_gating_func(_gating("sigmoid" if mt == "deepseek_v3" else "softmax"))
        if getattr(c, "n_group", None):
            writer.add_expert_group_count(c.n_group)
            writer.add_expert_group_used_count(c.topk_group)
        if c.q_lora_rank:
            writer.add_q_lora_rank(c.q_lora_rank)
        writer.add_kv_lora_rank(c.kv_lora_rank)
        writer.add_key_length(c.qk_nope_head_dim + c.qk_rope_head_dim)
        writer.add_value_length(c.v_head_dim)
        writer.add_rope_dimension_count(c.qk_rope_head_dim)
    if mt in _FAMILY_METADATA:
        _FAMILY_METADATA[mt](writer, c, head_dim)
    if mt == "gemma3_text":
        writer.add_sliding_window(c.sliding_window)
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in c.layer_types])
        local = (getattr(c, "rope_parameters", None) or {}).get("sliding_attention", {})
        writer.add_rope_freq_base_swa(float(local.get("rope_theta", 10000.0)))
    fields = set(_EXTRA_FIELDS) - ({"head_dim"} if mt in ("deepseek_v2", "deepseek_v3") else set())  # MLA: derived
    extras = {k: v for k, v in c.to_dict().items() if k in fields and v is not None}
    writer.add_string(EXTRAS_KEY, json.dumps(extras, sort_keys=True))


def _rotary_dims(c, head_dim: int) -> int:
    return int(head_dim * _rope(c).get("partial_rotary_factor", 1.0))


def _head_dims(writer, c, head_dim: int) -> None:
    """key/value lengths and the rotated dims (partial rotary), as llama.cpp's converters write them."""
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(_rotary_dims(c, head_dim))


def _glm4_moe_metadata(writer, c, head_dim: int) -> None:
    writer.add_leading_dense_block_count(c.first_k_dense_replace)
    writer.add_expert_shared_count(c.n_shared_experts)
    writer.add_expert_weights_scale(float(c.routed_scaling_factor))
    writer.add_expert_weights_norm(bool(c.norm_topk_prob))
    writer.add_expert_gating_func(_gating("sigmoid"))
    writer.add_expert_group_count(c.n_group)
    writer.add_expert_group_used_count(c.topk_group)
    _head_dims(writer, c, head_dim)
    writer.add_nextn_predict_layers(int(c.num_nextn_predict_layers or 0))


def _minimax_m2_metadata(writer, c, head_dim: int) -> None:
    writer.add_expert_feed_forward_length(c.intermediate_size)
    writer.add_expert_gating_func(_gating("sigmoid"))
    _head_dims(writer, c, head_dim)


def _qwen3_next_metadata(writer, c, head_dim: int) -> None:
    writer.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    writer.add_ssm_conv_kernel(c.linear_conv_kernel_dim)
    writer.add_ssm_state_size(c.linear_key_head_dim)
    writer.add_ssm_group_count(c.linear_num_key_heads)
    writer.add_ssm_time_step_rank(c.linear_num_value_heads)
    writer.add_ssm_inner_size(c.linear_value_head_dim * c.linear_num_value_heads)
    full = [i for i, t in enumerate(c.layer_types) if t == "full_attention"]
    writer.add_full_attention_interval(full[0] + 1 if full else c.num_hidden_layers + 1)
    _head_dims(writer, c, head_dim)


def _gpt_oss_metadata(writer, c, head_dim: int) -> None:
    writer.add_expert_feed_forward_length(c.intermediate_size)
    writer.add_sliding_window(c.sliding_window)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)


def _llama4_metadata(writer, c, head_dim: int) -> None:
    writer.add_interleave_moe_layer_step(c.interleave_moe_layer_step)
    writer.add_expert_feed_forward_length(c.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    if not c.attention_chunk_size:
        writer.add_sliding_window(0)  # llama.cpp: no chunked attention, rope on every layer


# model_type -> the keys llama.cpp's converter writes for it beyond the common ones
_FAMILY_METADATA = {"glm4_moe": _glm4_moe_metadata, "minimax_m2": _minimax_m2_metadata, "gpt_oss": _gpt_oss_metadata,
                    "qwen3_next": _qwen3_next_metadata, "llama4_text": _llama4_metadata}


def _gating(name: str):
    from gguf import ExpertGatingFuncType

    return ExpertGatingFuncType.SIGMOID if name == "sigmoid" else ExpertGatingFuncType.SOFTMAX


def _rope_scaling_type(name: str):
    from gguf import RopeScalingType

    return RopeScalingType.LINEAR if name == "linear" else RopeScalingType.YARN


def _gguf_tensors(model, arch: str) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 tensor in torch order) for every tensor llama.cpp's converter would write (of a
    model on the meta device: the names and shapes alone)."""
    config = model.config
    state = {n: t for n, t in model.state_dict().items()}
    refs = build_name_map(arch, config, {n: tuple(t.shape) for n, t in state.items()})
    out: list[tuple[str, torch.Tensor]] = []
    for hf_name, tensor in state.items():
        ref = refs.get(hf_name)
        if ref is None:
            raise ValueError(f"write_gguf: no GGUF name for {hf_name!r} ({arch})")
        t = tensor.detach().to(torch.float32)
        t = t if t.is_meta else t.cpu()
        if ref.kind == "concat":  # gate_up_proj -> ffn_gate_exps, ffn_up_exps
            half = t.shape[1] // 2
            out += [(ref.gguf[0], t[:, :half]), (ref.gguf[1], t[:, half:])]
            continue
        if ref.kind in ("interleave_t", "interleave"):  # GPT-OSS: [E, H, 2I] -> [E, I, H] gate and up
            gate, up = t[..., 0::2], t[..., 1::2]
            if ref.kind == "interleave_t":
                gate, up = gate.transpose(1, 2), up.transpose(1, 2)
            out += [(ref.gguf[0], gate.contiguous()), (ref.gguf[1], up.contiguous())]
            continue
        if ref.kind == "concat_t":  # Llama 4: [E, H, 2I] -> [E, I, H] gate and up
            gate, up = t.transpose(1, 2).chunk(2, dim=1)
            out += [(ref.gguf[0], gate.contiguous()), (ref.gguf[1], up.contiguous())]
            continue
        if ref.kind == "transpose":
            t = t.transpose(1, 2).contiguous()
        if ref.kind == "qkvz":  # Qwen3-Next: rows per key head (q, k, v, z) -> attn_qkv (all q, k, v) + attn_gate (all z)
            rows = torch.empty_like(t)
            rows[torch.tensor(qkvz_row_permutation(config))] = t
            n_qkv = t.shape[0] - config.linear_num_value_heads * config.linear_value_head_dim
            out += [(ref.gguf[0], rows[:n_qkv]), (ref.gguf[1], rows[n_qkv:])]
            continue
        name = ref.gguf[0]
        if name == "output.weight" and getattr(config, "tie_word_embeddings", False):
            continue
        if name.endswith(".ssm_conv1d.weight"):
            t = t.squeeze(1)  # llama.cpp: [channels, kernel]
        if ref.transform == "log_neg":
            t = -torch.exp(t)
        elif ref.transform in ("permute_q", "permute_k"):
            heads = config.num_attention_heads if ref.transform == "permute_q" else config.num_key_value_heads
            t = t[torch.tensor(forward_qk_row_permutation(t.shape[0], heads))]
        elif ref.transform == "minus_one":
            t = t + 1.0
        out.append((name, t))
    factors = _llama3_rope_factors(config) if arch in ("llama", "llama4") else None
    if factors is not None:
        out.append(("rope_freqs.weight", factors))
    return out


def _llama3_rope_factors(config) -> torch.Tensor | None:
    """llama.cpp's ``rope_freqs`` for llama3 rope scaling (it has no metadata key for it): per frequency, 1 for
    short wavelengths, ``factor`` for long ones, a smooth blend between; as its converter computes them."""
    rope = _rope(config)
    if rope.get("rope_type") != "llama3":
        return None
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freqs
    smooth = (old / wavelen - low) / (high - low) if high != low else torch.zeros_like(wavelen)
    blend = 1 / ((1 - smooth) / factor + smooth)
    return torch.where(wavelen < old / high, 1.0, torch.where(wavelen > old / low, factor, blend)).to(torch.float32)


def encode(values: np.ndarray, qtype: str, name: str = "") -> np.ndarray:
    """``values[..., n]`` as ``qtype`` bytes: quantized (``quantize``) where ktcore or gguf-py has a quantizer;
    for the other types (the i-quants, whose llama.cpp quantizer needs an importance search) random valid
    blocks whose dequantized values have the standard deviation of ``values``, seeded by ``name``: a
    synthetic stand-in, so a test's reference must be the file's dequantized values, not ``values``."""
    from .quantize import QUANTIZABLE

    if qtype in QUANTIZABLE:
        return quantize(values, qtype)
    import zlib

    from .dequant import dequantize_raw

    info = GGML_TYPES[qtype]
    n_blocks = values.size // info.block_size
    seed = zlib.crc32(name.encode())

    def blocks(scale: float) -> np.ndarray:
        return random_valid_blocks(np.random.default_rng(seed), qtype, n_blocks, scale)

    probe = dequantize_raw(torch.from_numpy(blocks(1.0).reshape(-1)), qtype, (values.size,)).std().item()
    out = blocks(float(values.std()) / probe if probe > 0 else 1.0)
    return out.reshape(*values.shape[:-1], -1)


def random_valid_blocks(rng: np.random.Generator, type_name: str, n_blocks: int, scale: float) -> np.ndarray:
    """``n_blocks`` random blocks of ``type_name`` (uint8 ``[n, type_size]``) with finite scales about ``scale``."""
    from .dequant_lowbit import LOWBIT_DEQUANTIZERS, random_lowbit_blocks

    if type_name in LOWBIT_DEQUANTIZERS:
        return random_lowbit_blocks(rng, type_name, n_blocks, scale)
    info = GGML_TYPES[type_name]
    blocks = rng.integers(0, 256, size=(n_blocks, info.type_size), dtype=np.uint8)
    for at in info.scale_fields:
        d = (scale * rng.uniform(0.5, 1.0, size=n_blocks)).astype(np.float16)
        blocks[:, at : at + 2] = d.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def write_gguf(model, path: str | os.PathLike, qtypes: str | Mapping[str, str] = "F32", name: str | None = None) -> str:
    """Write the Transformers ``model`` as a GGUF file at ``path``; returns the path.

    ``qtypes``: one GGML type name for every matrix, or ``{regex on GGUF tensor name: type, "default": type}``.
    1-D tensors and MoE routers are kept F32; see ``pick_qtype``."""
    import gguf

    config = model.config
    arch = MODEL_TYPE_TO_ARCH.get(config.model_type)
    if arch is None:
        raise ValueError(f"write_gguf: model type {config.model_type!r} has no GGUF architecture here")
    writer = gguf.GGUFWriter(str(path), arch)
    try:
        _write_metadata(writer, config, arch, name or f"ktcore-{config.model_type}")
        _write_tokenizer(writer, config)
        for gguf_name, t in _gguf_tensors(model, arch):
            qtype = pick_qtype(gguf_name, tuple(t.shape), qtypes)
            values = t.contiguous().numpy()
            if qtype == "F32":
                writer.add_tensor(gguf_name, values.astype(np.float32))
            elif qtype == "F16":
                writer.add_tensor(gguf_name, values.astype(np.float16))
            else:
                writer.add_tensor(gguf_name, encode(values, qtype, gguf_name), raw_dtype=_ggml(qtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return str(path)


def write_synthetic_moe_gguf(
    path: str | os.PathLike,
    layers: int = 2,
    qtype: str = "Q4_K",
    experts: int = 64,
    experts_used: int = 6,
    hidden: int = 2048,
    moe_intermediate: int = 1408,
    intermediate: int = 10944,
    heads: int = 16,
    kv_lora_rank: int = 512,
    vocab: int = 1024,
    seed: int = 0,
    dense_qtype: str = "Q8_0",
) -> str:
    """A DeepSeek-V2-Lite-shaped model (scaled by ``layers``; layer 0 dense, the rest MoE) written straight
    to GGUF, one tensor at a time: nothing model-sized is ever held in memory. Blocks are random bytes with
    finite f16 scales (valid for every dequantizer; the numbers mean nothing). Returns the path."""
    import gguf

    rng = np.random.default_rng(seed)
    qk_nope, qk_rope, v_dim = 128, 64, 128
    arch = "deepseek2"
    tensors: list[tuple[str, tuple[int, ...], str]] = [("token_embd.weight", (vocab, hidden), dense_qtype)]
    for i in range(layers):
        b = f"blk.{i}"
        tensors += [
            (f"{b}.attn_norm.weight", (hidden,), "F32"),
            (f"{b}.attn_q.weight", (heads * (qk_nope + qk_rope), hidden), dense_qtype),
            (f"{b}.attn_kv_a_mqa.weight", (kv_lora_rank + qk_rope, hidden), dense_qtype),
            (f"{b}.attn_kv_a_norm.weight", (kv_lora_rank,), "F32"),
            (f"{b}.attn_kv_b.weight", (heads * (qk_nope + v_dim), kv_lora_rank), dense_qtype),
            (f"{b}.attn_output.weight", (hidden, heads * v_dim), dense_qtype),
            (f"{b}.ffn_norm.weight", (hidden,), "F32"),
        ]
        if i == 0:
            tensors += [
                (f"{b}.ffn_gate.weight", (intermediate, hidden), dense_qtype),
                (f"{b}.ffn_up.weight", (intermediate, hidden), dense_qtype),
                (f"{b}.ffn_down.weight", (hidden, intermediate), dense_qtype),
            ]
        else:
            shexp = 2 * moe_intermediate
            tensors += [
                (f"{b}.ffn_gate_inp.weight", (experts, hidden), "F32"),
                (f"{b}.ffn_gate_exps.weight", (experts, moe_intermediate, hidden), qtype),
                (f"{b}.ffn_up_exps.weight", (experts, moe_intermediate, hidden), qtype),
                (f"{b}.ffn_down_exps.weight", (experts, hidden, moe_intermediate), _row_type(qtype, moe_intermediate)),
                (f"{b}.ffn_gate_shexp.weight", (shexp, hidden), dense_qtype),
                (f"{b}.ffn_up_shexp.weight", (shexp, hidden), dense_qtype),
                (f"{b}.ffn_down_shexp.weight", (hidden, shexp), _row_type(dense_qtype, shexp)),
            ]
    tensors += [("output_norm.weight", (hidden,), "F32"), ("output.weight", (vocab, hidden), dense_qtype)]

    writer = gguf.GGUFWriter(str(path), arch)
    try:
        writer.add_name("ktcore-synthetic-moe")
        writer.add_block_count(layers)
        writer.add_context_length(4096)
        writer.add_embedding_length(hidden)
        writer.add_feed_forward_length(intermediate)
        writer.add_head_count(heads)
        writer.add_head_count_kv(heads)
        writer.add_layer_norm_rms_eps(1e-6)
        writer.add_vocab_size(vocab)
        writer.add_rope_freq_base(10000.0)
        writer.add_expert_count(experts)
        writer.add_expert_used_count(experts_used)
        writer.add_expert_feed_forward_length(moe_intermediate)
        writer.add_expert_shared_count(2)
        writer.add_leading_dense_block_count(1)
        writer.add_expert_weights_scale(1.0)
        writer.add_expert_gating_func(_gating("softmax"))
        writer.add_kv_lora_rank(kv_lora_rank)
        writer.add_key_length(qk_nope + qk_rope)
        writer.add_value_length(v_dim)
        writer.add_rope_dimension_count(qk_rope)
        tok_config = type("C", (), {"vocab_size": vocab, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
        _write_tokenizer(writer, tok_config)
        _write_random_tensors(writer, tensors, rng)
    finally:
        writer.close()
    return str(path)


def _write_random_tensors(writer, tensors: list[tuple[str, tuple[int, ...], str]], rng: np.random.Generator) -> None:
    """Header, metadata and random tensors ``(GGUF name, shape, type)``, streamed one tensor at a time."""
    for gguf_name, shape, t in tensors:
        info = GGML_TYPES[t]
        n = int(np.prod(shape))
        nbytes = info.nbytes(n)
        byte_shape = (*shape[:-1], shape[-1] // info.block_size * info.type_size)
        writer.add_tensor_info(gguf_name, byte_shape if info.block_size > 1 else shape,
                               np.dtype(np.uint8) if info.block_size > 1 else np.dtype(np.float32 if t == "F32" else np.float16),
                               nbytes, raw_dtype=_ggml(t) if info.block_size > 1 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for gguf_name, shape, t in tensors:
        data = _random_tensor(rng, shape, t)
        if gguf_name.endswith(".ssm_a"):  # Qwen3-Next's -exp(A_log): a decay, negative
            data = -np.abs(data) - np.float32(0.5)
        writer.write_tensor_data(data)


def write_synthetic_family_gguf(path: str | os.PathLike, config, qtypes: str | Mapping[str, str] = "Q4_K",
                                seed: int = 0) -> str:
    """A model of ``config`` (any family ``write_gguf`` writes; real widths, as few layers as the config says)
    written straight to GGUF with random valid blocks, one tensor at a time (never built in memory): for
    speed and memory measurements at a real model's widths. ``qtypes`` as for ``write_gguf``."""
    import gguf
    from transformers import AutoModelForCausalLM

    arch = MODEL_TYPE_TO_ARCH[config.model_type]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tensors = []
    for gguf_name, t in _gguf_tensors(model, arch):
        shape = tuple(t.shape)
        qtype = pick_qtype(gguf_name, shape, qtypes)
        if qtype == "F16" and len(shape) > 1:  # a row the asked type's blocks do not divide (as llama.cpp falls back)
            qtype = _row_type("Q8_0", shape[-1]) if shape[-1] % 32 == 0 else "F16"
        tensors.append((gguf_name, shape, qtype))
    writer = gguf.GGUFWriter(str(path), arch)
    try:
        _write_metadata(writer, config, arch, f"ktcore-synthetic-{config.model_type}")
        _write_tokenizer(writer, config)
        _write_random_tensors(writer, tensors, np.random.default_rng(seed))
    finally:
        writer.close()
    return str(path)


def copy_metadata(reader, writer) -> None:
    """Every key/value of the ``gguf.GGUFReader`` ``reader`` into the ``gguf.GGUFWriter`` ``writer``, but the
    file's own header fields and the architecture (which the writer was created with)."""
    import gguf

    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        kind = field.types[0]
        writer.add_key_value(key, field.contents(), kind, sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)


def write_dequantized_copy(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """The GGUF ``src`` with every tensor expanded to F32 and the metadata unchanged: the same model for
    an engine whose quantized kernels round the activations (llama.cpp's int8 dot products), so that its
    kernels' error can be told apart from a difference in the model. Returns ``dst``."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    copy_metadata(reader, writer)
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        writer.add_tensor(t.name, values.reshape([int(n) for n in reversed(t.shape)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(dst)


def _row_type(qtype: str, row: int) -> str:
    return qtype if row % GGML_TYPES[qtype].block_size == 0 else "Q8_0"


def _random_tensor(rng: np.random.Generator, shape: tuple[int, ...], type_name: str) -> np.ndarray:
    """Random data of one tensor (blocks with scales below 0.002)."""
    info = GGML_TYPES[type_name]
    if info.block_size == 1:
        values = (0.02 * rng.standard_normal(shape, dtype=np.float32))
        return values.astype(np.float32 if type_name == "F32" else np.float16)
    n_blocks = int(np.prod(shape)) // info.block_size
    return random_valid_blocks(rng, type_name, n_blocks, 0.002).reshape(*shape[:-1], -1)


def main(argv=None) -> int:
    """``python -m ktcore.weights.gguf_writer PATH [--layers N] [--qtype Q4_K]``: write a synthetic MoE GGUF."""
    import argparse

    parser = argparse.ArgumentParser(description="Write a DeepSeek-V2-Lite-shaped synthetic MoE GGUF (random blocks).")
    parser.add_argument("path")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--qtype", default="Q4_K", help="experts' GGML type (dense tensors: --dense-qtype)")
    parser.add_argument("--dense-qtype", default="Q8_0")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--experts-used", type=int, default=6)
    parser.add_argument("--family", default=None,
                        help="write this family at its real widths instead (ktcore.testing.REAL_WIDTHS: "
                             "glm4_moe, gpt_oss, minimax_m2, kimi_k2, deepseek_v3, qwen2, mistral, ...); --layers, --qtype and "
                             "--dense-qtype apply, --experts/--experts-used do not")
    args = parser.parse_args(argv)
    if args.family:
        from ktcore.testing import real_width_config

        config = real_width_config(args.family, layers=args.layers)
        path = write_synthetic_family_gguf(args.path, config, {r"_exps\.": args.qtype, "default": args.dense_qtype})
    else:
        path = write_synthetic_moe_gguf(args.path, layers=args.layers, qtype=args.qtype, dense_qtype=args.dense_qtype,
                                        experts=args.experts, experts_used=args.experts_used)
    print(f"{path}: {os.path.getsize(path) / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
