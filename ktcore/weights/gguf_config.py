"""A Transformers config from GGUF metadata (the keys llama.cpp's converter writes), no hub access.

Transformers' ``GGUF_CONFIG_MAPPING`` covers the plain keys of several architectures; this adds what it
lacks for the families ktcore runs: DeepSeek-2/3 (MLA dims, YaRN, expert counts, shared experts, routed
scaling, sigmoid gating), MoE intermediate sizes, Mixtral (llama arch with experts), Gemma 3 text.
"""

from __future__ import annotations

import json

from transformers import AutoConfig

from .names import ARCH_TO_MODEL_TYPE
from .source import WeightError

# Key written by ktcore's GGUF writer for config fields that GGUF has no key for (rope variants, layer
# types); llama.cpp ignores unknown keys.
EXTRAS_KEY = "ktcore.config_extras"

# "<arch>.<suffix>" -> config attribute, for every architecture
_COMMON_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
    "expert_used_count": "num_experts_per_tok",
    "expert_feed_forward_length": "moe_intermediate_size",
}
_PER_MODEL_TYPE_KEYS = {
    "llama": {"rope.dimension_count": "head_dim"},
    "mixtral": {"expert_count": "num_local_experts", "rope.dimension_count": "head_dim"},
    "qwen2": {},
    "qwen3": {"attention.key_length": "head_dim"},
    "qwen2_moe": {"expert_count": "num_experts", "expert_shared_feed_forward_length": "shared_expert_intermediate_size"},
    "qwen3_moe": {"expert_count": "num_experts", "attention.key_length": "head_dim"},
    "gemma3_text": {"attention.key_length": "head_dim", "attention.sliding_window": "sliding_window"},
    "deepseek_v2": {
        "expert_count": "n_routed_experts",
        "expert_shared_count": "n_shared_experts",
        "leading_dense_block_count": "first_k_dense_replace",
        "expert_weights_scale": "routed_scaling_factor",
        "expert_weights_norm": "norm_topk_prob",
        "expert_group_count": "n_group",
        "expert_group_used_count": "topk_group",
        "attention.kv_lora_rank": "kv_lora_rank",
        "attention.q_lora_rank": "q_lora_rank",
        "attention.value_length": "v_head_dim",
        "rope.dimension_count": "qk_rope_head_dim",
    },
}
_PER_MODEL_TYPE_KEYS["deepseek_v3"] = _PER_MODEL_TYPE_KEYS["deepseek_v2"]
_PER_MODEL_TYPE_KEYS["glm4_moe"] = {
    **{k: v for k, v in _PER_MODEL_TYPE_KEYS["deepseek_v2"].items() if not k.startswith(("attention.", "rope."))},
    "attention.key_length": "head_dim",
    "nextn_predict_layers": "num_nextn_predict_layers",
}
_PER_MODEL_TYPE_KEYS["qwen3_next"] = {
    "expert_count": "num_experts", "expert_shared_feed_forward_length": "shared_expert_intermediate_size",
    "attention.key_length": "head_dim", "ssm.conv_kernel": "linear_conv_kernel_dim", "ssm.state_size": "linear_key_head_dim",
    "ssm.group_count": "linear_num_key_heads", "ssm.time_step_rank": "linear_num_value_heads",
}
_PER_MODEL_TYPE_KEYS["llama4_text"] = {
    "expert_count": "num_local_experts", "expert_feed_forward_length": "intermediate_size",
    "feed_forward_length": "intermediate_size_mlp", "interleave_moe_layer_step": "interleave_moe_layer_step",
    "rope.dimension_count": "head_dim",
}
_PER_MODEL_TYPE_KEYS["gpt_oss"] = {"expert_count": "num_local_experts", "attention.key_length": "head_dim",
                                   "expert_feed_forward_length": "intermediate_size",
                                   "attention.sliding_window": "sliding_window"}
_PER_MODEL_TYPE_KEYS["minimax_m2"] = {"expert_count": "num_local_experts", "attention.key_length": "head_dim",
                                      "expert_feed_forward_length": "intermediate_size"}

# Transformers defaults llama.cpp assumes for these families
_DEFAULTS = {
    "qwen3_moe": {"norm_topk_prob": True},
    "qwen2_moe": {"norm_topk_prob": False},
}


def read_metadata(header) -> dict:
    """Metadata of a ``GGUFHeader`` for the config: scalars and short arrays. The token tables are left in
    the file (the tokenizer builder reads them); ``"<key>#len"`` holds their length."""
    out = {}
    for key, value in header.fields.items():
        if key.startswith("GGUF."):
            continue
        if key.startswith("tokenizer.ggml.") and not isinstance(value, (int, float, str)):
            out[key + "#len"] = len(value)
            continue
        out[key] = header.value(key)
    return out


def _transformers_keys(arch: str, model_type: str) -> dict[str, str]:
    """Transformers' own GGUF key table for this architecture, where it has one (rope keys excepted:
    rope parameters are assembled below)."""
    try:
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    except ImportError:
        return {}
    table = GGUF_CONFIG_MAPPING.get(model_type) or GGUF_CONFIG_MAPPING.get(arch) or {}
    return {k: v for k, v in table.items() if isinstance(v, str) and not k.startswith("rope.freq")}


def model_type_from_metadata(meta: dict, tensor_names, path: str) -> str:
    arch = meta.get("general.architecture")
    if arch not in ARCH_TO_MODEL_TYPE:
        raise WeightError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(ARCH_TO_MODEL_TYPE))}"
        )
    model_type = ARCH_TO_MODEL_TYPE[arch]
    names = set(tensor_names)
    if arch == "llama" and (meta.get("llama.expert_count") or any("_exps." in n for n in names)):
        model_type = "mixtral"
    if arch == "deepseek2" and (meta.get("deepseek2.expert_gating_func") == 2 or any(".exp_probs_b." in n for n in names)):
        model_type = "deepseek_v3"
    return model_type


def config_dict_from_metadata(meta: dict, tensor_names, path: str) -> dict:
    """The kwargs of the Transformers config class (plus ``model_type``)."""
    model_type = model_type_from_metadata(meta, tensor_names, path)
    arch = meta["general.architecture"]
    keys = _COMMON_KEYS | _transformers_keys(arch, model_type) | _PER_MODEL_TYPE_KEYS.get(model_type, {})
    cfg: dict = {"model_type": model_type, **_DEFAULTS.get(model_type, {})}
    for suffix, attr in keys.items():
        value = meta.get(f"{arch}.{suffix}")
        if value is not None:
            cfg[attr] = value
    if "vocab_size" not in cfg and "tokenizer.ggml.tokens#len" in meta:
        cfg["vocab_size"] = meta["tokenizer.ggml.tokens#len"]
    for gguf_key, attr in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("padding_token_id", "pad_token_id")):
        if f"tokenizer.ggml.{gguf_key}" in meta:
            cfg[attr] = meta[f"tokenizer.ggml.{gguf_key}"]
    cfg["tie_word_embeddings"] = "output.weight" not in set(tensor_names)

    rope_theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
    rope = {"rope_type": "default", "rope_theta": rope_theta}
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling in ("linear", "yarn"):
        rope["rope_type"] = scaling
        rope["factor"] = float(meta.get(f"{arch}.rope.scaling.factor", 1.0))
        if f"{arch}.rope.scaling.original_context_length" in meta:
            rope["original_max_position_embeddings"] = int(meta[f"{arch}.rope.scaling.original_context_length"])
    if scaling == "yarn" and f"{arch}.rope.scaling.yarn_log_multiplier" in meta:
        # llama.cpp writes 0.1 * mscale_all_dim
        mscale_all_dim = round(float(meta[f"{arch}.rope.scaling.yarn_log_multiplier"]) / 0.1, 6)
        rope["mscale_all_dim"] = mscale_all_dim
        rope["mscale"] = mscale_all_dim

    if model_type in ("deepseek_v2", "deepseek_v3"):
        _deepseek(cfg, meta, arch)
    if model_type == "gemma3_text":
        _gemma3(cfg, meta, arch, rope)
    else:
        cfg["rope_parameters"] = rope
    if model_type == "qwen2_moe" and "shared_expert_intermediate_size" not in cfg:
        cfg["shared_expert_intermediate_size"] = 0
    if model_type in ("qwen2", "qwen2_moe"):
        cfg.setdefault("qkv_bias", any(n.endswith("attn_q.bias") for n in tensor_names))
    if model_type in _FAMILY_FIXUPS:
        _FAMILY_FIXUPS[model_type](cfg, meta, arch, tensor_names)

    extras = meta.get(EXTRAS_KEY)
    if extras:
        cfg.update(json.loads(extras))
    if model_type in ("deepseek_v2", "deepseek_v3"):
        # MLA's head_dim is its rope width (Transformers derives it so), as the file's keys state it: files whose
        # extras carry a stale one (the writer wrote real_width_config's before) load as llama.cpp reads them
        cfg["head_dim"] = cfg.get("qk_rope_head_dim", 64)
    return cfg


def _deepseek(cfg: dict, meta: dict, arch: str) -> None:
    heads = cfg["num_attention_heads"]
    cfg["num_key_value_heads"] = heads
    rope_dim = cfg.get("qk_rope_head_dim", 64)
    # files converted for MLA absorption state the per-head dims in *_mla keys
    key_length = meta.get(f"{arch}.attention.key_length_mla", meta.get(f"{arch}.attention.key_length"))
    if key_length is not None:
        cfg["qk_nope_head_dim"] = int(key_length) - rope_dim
    if f"{arch}.attention.value_length_mla" in meta:
        cfg["v_head_dim"] = int(meta[f"{arch}.attention.value_length_mla"])
    if not cfg.get("q_lora_rank"):
        cfg["q_lora_rank"] = None
    cfg["head_dim"] = rope_dim
    gating = meta.get(f"{arch}.expert_gating_func")
    if cfg["model_type"] == "deepseek_v2":
        cfg["topk_method"] = "group_limited_greedy" if cfg.get("n_group", 1) > 1 else "greedy"
    elif gating not in (None, 2):
        raise WeightError(f"deepseek_v3 expects sigmoid expert gating (expert_gating_func 2), file says {gating}")
    if cfg.get("n_group", 0) == 0:
        cfg.pop("n_group", None)
        cfg.pop("topk_group", None)


def _gemma3(cfg: dict, meta: dict, arch: str, rope: dict) -> None:
    head_dim = cfg.get("head_dim", 256)
    cfg["query_pre_attn_scalar"] = head_dim
    layers = cfg["num_hidden_layers"]
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list) and len(pattern) == layers:
        cfg["layer_types"] = ["sliding_attention" if swa else "full_attention" for swa in pattern]
    else:  # llama.cpp's fixed Gemma 3 pattern: every sixth layer global
        cfg["layer_types"] = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
    local = {"rope_type": "default", "rope_theta": float(meta.get(f"{arch}.rope.freq_base_swa", 10000.0))}
    cfg["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}


def _partial_rotary(cfg: dict, meta: dict, arch: str) -> None:
    """llama.cpp writes the rotated dims as ``rope.dimension_count``; Transformers wants the fraction."""
    rot = meta.get(f"{arch}.rope.dimension_count")
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if rot and int(rot) != head_dim:
        cfg["rope_parameters"]["partial_rotary_factor"] = int(rot) / head_dim


def _glm4_moe(cfg: dict, meta: dict, arch: str, tensor_names) -> None:
    names = set(tensor_names)
    # block_count counts the multi-token-prediction layers llama.cpp appends; Transformers builds none
    nextn = int(cfg.get("num_nextn_predict_layers") or 0)
    cfg["num_hidden_layers"] -= nextn
    cfg["attention_bias"] = "blk.0.attn_q.bias" in names
    cfg["use_qk_norm"] = "blk.0.attn_q_norm.weight" in names
    _partial_rotary(cfg, meta, arch)


def _minimax_m2(cfg: dict, meta: dict, arch: str, tensor_names) -> None:
    _partial_rotary(cfg, meta, arch)


def _gpt_oss(cfg: dict, meta: dict, arch: str, tensor_names) -> None:
    # llama.cpp's GPT-OSS: even layers slide, odd layers attend fully; YaRN without truncation
    cfg["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(cfg["num_hidden_layers"])]
    if cfg["rope_parameters"].get("rope_type") == "yarn":
        cfg["rope_parameters"]["truncate"] = False
    cfg["attention_bias"] = "blk.0.attn_q.bias" in set(tensor_names)


def _qwen3_next(cfg: dict, meta: dict, arch: str, tensor_names) -> None:
    cfg["linear_value_head_dim"] = int(meta[f"{arch}.ssm.inner_size"]) // int(cfg["linear_num_value_heads"])
    interval = int(meta.get(f"{arch}.full_attention_interval", 4))
    cfg["layer_types"] = ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                          for i in range(cfg["num_hidden_layers"])]
    cfg.setdefault("norm_topk_prob", True)
    _partial_rotary(cfg, meta, arch)


def _llama4(cfg: dict, meta: dict, arch: str, tensor_names) -> None:
    # llama.cpp's Llama 4: a sliding_window of 0 means full attention with rope everywhere; otherwise chunks of
    # 8192 on three layers of four, the fourth without rope and with attention temperature tuning
    layers = cfg["num_hidden_layers"]
    if meta.get(f"{arch}.attention.sliding_window") == 0:
        cfg.update(attention_chunk_size=None, no_rope_layers=[1] * layers)
    else:
        cfg.update(attention_chunk_size=8192, floor_scale=8192, attn_scale=0.1,
                   no_rope_layers=[0 if (i + 1) % 4 == 0 else 1 for i in range(layers)])
    cfg["use_qk_norm"] = cfg.get("num_local_experts") != 128  # llama.cpp: all but the 128-expert Maverick


# model_type -> what its config needs beyond the key tables
_FAMILY_FIXUPS = {"glm4_moe": _glm4_moe, "minimax_m2": _minimax_m2, "gpt_oss": _gpt_oss, "qwen3_next": _qwen3_next,
                  "llama4_text": _llama4}


def config_from_metadata(meta: dict, tensor_names, path: str):
    cfg = config_dict_from_metadata(meta, tensor_names, path)
    model_type = cfg.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **cfg)
    except Exception as e:  # noqa: BLE001
        raise WeightError(f"{path}: cannot build a {model_type} config from the GGUF metadata: {e}") from e
    return config
