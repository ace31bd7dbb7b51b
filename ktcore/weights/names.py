"""Tensor names: Transformers <-> GGUF, per architecture.

The Transformers side is whatever the model class's ``state_dict()`` holds (read from a model built on the
meta device), so a new Transformers naming never needs a table here. Each name is turned into its GGUF name
with gguf-py's ``TensorNameMap`` (the same table llama.cpp's converter uses), plus the few cases it does not
cover: fused experts, DeepSeek-V3's ``e_score_correction_bias`` and tied output heads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import gguf

# GGUF architecture -> Transformers model_type (the arch names llama.cpp writes in general.architecture)
ARCH_TO_MODEL_TYPE = {
    "llama": "llama",  # "mixtral" when the file has expert tensors
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "deepseek2": "deepseek_v2",  # "deepseek_v3" with sigmoid gating
    "gemma3": "gemma3_text",
    "glm4moe": "glm4_moe",
    "minimax-m2": "minimax_m2",
    "gpt-oss": "gpt_oss",
    "qwen3next": "qwen3_next",
    "llama4": "llama4_text",
}
MODEL_TYPE_TO_ARCH = {
    "llama": "llama",
    "mistral": "llama",
    "mixtral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "deepseek_v2": "deepseek2",
    "deepseek_v3": "deepseek2",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
    "glm4_moe": "glm4moe",
    "minimax_m2": "minimax-m2",
    "gpt_oss": "gpt-oss",
    "qwen3_next": "qwen3next",
    "llama4_text": "llama4",
}

# llama.cpp's converter permutes q/k rows of these architectures (rotary halves interleaved)
PERMUTED_QK_ARCHS = frozenset({"llama"})
# llama.cpp stores Gemma's (and Qwen3-Next's, but for its gated-delta-net norm) RMSNorm gains as (1 + w)
NORM_PLUS_ONE_ARCHS = frozenset({"gemma3", "qwen3next"})

EXPERT_PARTS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
# model types whose fused experts are Transformers-transposed (``gate_up_proj [E, H, 2I]``, gate and up
# interleaved along the last dim, ``down_proj [E, I, H]``) and carry biases: GPT-OSS
INTERLEAVED_EXPERTS_MODEL_TYPES = frozenset({"gpt_oss"})
# ... transposed with gate and up as halves of the last dim, no biases: Llama 4
TRANSPOSED_EXPERTS_MODEL_TYPES = frozenset({"llama4_text"})
_TRANSPOSED_EXPERTS_RE = re.compile(r"^(?P<prefix>.*\.layers\.(?P<bid>\d+)\..*experts)\.(?P<part>gate_up_proj|down_proj)(?P<bias>_bias)?$")
_EXPERTS_RE = re.compile(r"^(?P<prefix>.*\.layers\.(?P<bid>\d+)\..*experts)\.(?P<part>gate_up_proj|gate_proj|up_proj|down_proj)$")


@dataclass(frozen=True)
class TensorRef:
    """How one Transformers tensor is read from GGUF tensors.

    ``kind``: ``direct`` (one tensor), ``concat`` (the ``gguf`` tensors joined along dim 1, e.g.
    gate_up_proj), ``kv_b`` (DeepSeek's kv_b_proj rebuilt from split ``attn_k_b``/``attn_v_b``), or GPT-OSS's
    experts: ``interleave_t`` (gate_up_proj ``[E, H, 2I]`` from ``[E, I, H]`` gate and up), ``interleave``
    (their biases) and ``transpose`` (down_proj ``[E, I, H]`` from ``[E, H, I]``).
    ``transform``: ``permute_q``/``permute_k`` (undo llama.cpp's rotary row order), ``minus_one`` (Gemma
    norms) or ``""``.
    """

    hf_name: str
    gguf: tuple[str, ...]
    shape: tuple[int, ...]
    kind: str = "direct"
    transform: str = ""
    alternatives: tuple["TensorRef", ...] = field(default=())


def _arch_enum(arch: str) -> gguf.MODEL_ARCH:
    for key, value in gguf.MODEL_ARCH_NAMES.items():
        if value == arch:
            return key
    raise KeyError(arch)


def _gguf_base_name(name_map: gguf.TensorNameMap, hf_name: str) -> tuple[str | None, str]:
    """(GGUF base name, suffix) of a Transformers parameter name."""
    if hf_name.endswith("e_score_correction_bias"):
        # llama.cpp renames the DeepSeek-V3 router bias to exp_probs_b.bias
        m = re.search(r"layers\.(\d+)\.", hf_name)
        return (f"blk.{m.group(1)}.exp_probs_b" if m else None), ".bias"
    if hf_name.endswith(".dt_bias"):  # Qwen3-Next: llama.cpp writes it as ssm_dt.bias
        return name_map.get_name(hf_name[: -len(".dt_bias")] + ".dt_proj"), ".bias"
    base, dot, suffix = hf_name.rpartition(".")
    if suffix == "sinks":  # GPT-OSS: llama.cpp writes blk.N.attn_sinks.weight
        name = name_map.get_name(hf_name)
        return name, (".weight" if name else "")
    if suffix in ("weight", "bias"):
        return name_map.get_name(base), "." + suffix
    return name_map.get_name(hf_name), ""


def build_name_map(arch: str, config, hf_shapes: dict[str, tuple[int, ...]]) -> dict[str, TensorRef]:
    """Transformers name -> ``TensorRef`` for every tensor of the model (``hf_shapes`` from its state dict).

    Names of fused experts are also given split: ``<p>.experts.gate_proj`` etc. (see ``WeightSource``).
    Names with no GGUF counterpart are left out.
    """
    name_map = gguf.get_tensor_name_map(_arch_enum(arch), config.num_hidden_layers)
    refs: dict[str, TensorRef] = {}
    model_type = getattr(config, "model_type", "")
    transposed = model_type in INTERLEAVED_EXPERTS_MODEL_TYPES | TRANSPOSED_EXPERTS_MODEL_TYPES
    for hf_name, shape in hf_shapes.items():
        m = _TRANSPOSED_EXPERTS_RE.match(hf_name) if transposed else None
        if m:
            refs.update(_transposed_expert_refs(hf_name, shape, m, model_type in INTERLEAVED_EXPERTS_MODEL_TYPES))
            continue
        m = _EXPERTS_RE.match(hf_name)
        if m:
            bid, part, prefix = m["bid"], m["part"], m["prefix"]
            if part == "gate_up_proj":
                refs[hf_name] = TensorRef(hf_name, (f"blk.{bid}.ffn_gate_exps.weight", f"blk.{bid}.ffn_up_exps.weight"), shape, "concat")
                half = (shape[0], shape[1] // 2, *shape[2:])
                for p in ("gate_proj", "up_proj"):
                    refs[f"{prefix}.{p}"] = TensorRef(f"{prefix}.{p}", (f"blk.{bid}.{EXPERT_PARTS[p]}.weight",), half)
            else:
                refs[hf_name] = TensorRef(hf_name, (f"blk.{bid}.{EXPERT_PARTS[part]}.weight",), shape)
            continue
        base, suffix = _gguf_base_name(name_map, hf_name)
        if base is None:
            continue
        gguf_name = base + suffix
        transform = ""
        if arch in PERMUTED_QK_ARCHS and suffix == ".weight":
            if base.endswith(".attn_q"):
                transform = "permute_q"
            elif base.endswith(".attn_k"):
                transform = "permute_k"
        if arch in NORM_PLUS_ONE_ARCHS and base.endswith("norm") and not base.endswith("ssm_norm") and suffix == ".weight":
            transform = "minus_one"
        if arch == "qwen3next":
            special = _qwen3next_ref(hf_name, shape, base)
            if special is not None:
                refs[hf_name] = special
                continue
        alternatives: tuple[TensorRef, ...] = ()
        if base == "output":  # tied head: the file has only token_embd
            alternatives = (TensorRef(hf_name, ("token_embd.weight",), shape),)
        elif base.endswith(".attn_kv_b"):  # llama.cpp now stores kv_b_proj split for MLA absorption
            blk = base.rsplit(".", 1)[0]
            alternatives = (TensorRef(hf_name, (f"{blk}.attn_k_b.weight", f"{blk}.attn_v_b.weight"), shape, "kv_b"),)
        refs[hf_name] = TensorRef(hf_name, (gguf_name,), shape, "direct", transform, alternatives)
    return refs


def _qwen3next_ref(hf_name: str, shape: tuple[int, ...], base: str) -> TensorRef | None:
    """Qwen3-Next's gated-delta-net tensors as llama.cpp's converter writes them: ``A_log`` as ``ssm_a =
    -exp(A_log)``, ``in_proj_qkvz`` split into ``attn_qkv`` (q, k, v of all heads) and ``attn_gate`` (z)."""
    blk = base.rsplit(".", 1)[0]
    if hf_name.endswith(".A_log"):
        return TensorRef(hf_name, (base,), shape, "direct", "log_neg")
    if hf_name.endswith(".in_proj_qkvz.weight"):
        return TensorRef(hf_name, (f"{blk}.attn_qkv.weight", f"{blk}.attn_gate.weight"), shape, "qkvz")
    return None


def qkvz_row_permutation(config) -> list[int]:
    """Row ``i`` of Transformers' ``in_proj_qkvz`` (per key head: q, k, v, z) is row ``perm[i]`` of llama.cpp's
    ``attn_qkv`` rows followed by ``attn_gate``'s (q of all heads, then k, v, z)."""
    nk, dk = config.linear_num_key_heads, config.linear_key_head_dim
    dv = config.linear_num_value_heads // nk * config.linear_value_head_dim
    perm = []
    for h in range(nk):
        for start, width in ((0, dk), (nk * dk, dk), (2 * nk * dk, dv), (2 * nk * dk + nk * dv, dv)):
            perm += range(start + h * width, start + (h + 1) * width)
    return perm


def _transposed_expert_refs(hf_name: str, shape: tuple[int, ...], m: re.Match, interleaved: bool) -> dict[str, TensorRef]:
    """GPT-OSS (gate and up interleaved) and Llama 4 (halves) experts: llama.cpp stores gate, up and down as
    ``[E, out, in]`` (biases ``[E, out]``); the split names ``<p>.gate_proj``/``up_proj`` (and ``*_bias``) and
    ``<p>.down_proj_stored`` read them as stored."""
    blk, prefix, suffix = f"blk.{m['bid']}", m["prefix"], ".bias" if m["bias"] else ".weight"
    bias = m["bias"] or ""
    if m["part"] == "down_proj":
        refs = {hf_name: TensorRef(hf_name, (f"{blk}.ffn_down_exps{suffix}",), shape, "transpose" if not bias else "direct")}
        if not bias:  # as stored, [E, H, I] (kept quantized): for experts ops that declare stored_down_proj
            refs[f"{prefix}.down_proj_stored"] = TensorRef(f"{prefix}.down_proj_stored", (f"{blk}.ffn_down_exps.weight",),
                                                           (shape[0], shape[2], shape[1]))
        return refs
    gate, up = f"{blk}.ffn_gate_exps{suffix}", f"{blk}.ffn_up_exps{suffix}"
    half = (shape[0], shape[-1] // 2) if bias else (shape[0], shape[2] // 2, shape[1])
    return {
        hf_name: TensorRef(hf_name, (gate, up), shape, ("interleave" if bias else "interleave_t") if interleaved else "concat_t"),
        f"{prefix}.gate_proj{bias}": TensorRef(f"{prefix}.gate_proj{bias}", (gate,), half),
        f"{prefix}.up_proj{bias}": TensorRef(f"{prefix}.up_proj{bias}", (up,), half),
    }


def qk_row_permutation(rows: int, n_head: int) -> list[int]:
    """Row ``i`` of the Transformers q/k weight is row ``perm[i]`` of llama.cpp's permuted one.

    llama.cpp's converter reorders each head's rows from [first half, second half] of the rotary dims to
    interleaved pairs; this is the inverse (Transformers' ``reverse_permute_weights``)."""
    half = rows // n_head // 2
    perm = []
    for h in range(n_head):
        for j in range(2):
            for i in range(half):
                perm.append(h * 2 * half + i * 2 + j)
    return perm


def forward_qk_row_permutation(rows: int, n_head: int) -> list[int]:
    """The permutation llama.cpp's converter applies (for the writer): GGUF row ``g`` is HF row ``perm[g]``."""
    inverse = qk_row_permutation(rows, n_head)
    perm = [0] * rows
    for hf_row, gguf_row in enumerate(inverse):
        perm[gguf_row] = hf_row
    return perm
