"""Tiny random MoE models as vLLM and ktcore both read them: a GGUF written by ktcore's own writer (routed
experts in Q8_0, which kt-cpu-amx computes on as stored; the rest F32) and a Hugging Face directory (config,
tokenizer, safetensors) whose every tensor is the GGUF's value, dequantized, in the original checkpoint layout
(one tensor per expert and projection), for vLLM's loader."""

from __future__ import annotations

import re
from pathlib import Path

import torch

EXPERT_TYPE = "Q8_0"
_FUSED_EXPERTS = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)$")


# vLLM's CPU MLA kernels take only DeepSeek's real latent widths (kv_lora_rank 512 + rope 64 = 576; head_dim is
# the rope width), its CPU router wants the expert groups set (one group: DeepSeek-V2-Lite's greedy routing), and
# its model reads the routing fields DeepSeek-V2's config.json carries
VLLM_CPU_CONFIG = {"deepseek_v2": dict(kv_lora_rank=512, qk_rope_head_dim=64, head_dim=64, n_group=1, topk_group=1,
                                       scoring_func="softmax", moe_layer_freq=1)}


def write_tiny_checkpoint(family: str, out_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """``(gguf path, Hugging Face directory)`` of ``ktcore.testing.tiny_model(family, seed)`` (as vLLM's CPU
    kernels take it) under ``out_dir``."""
    from safetensors.torch import save_file

    from ktcore.testing import tiny_model
    from ktcore.weights import open_source
    from ktcore.weights.gguf_writer import write_gguf

    out = Path(out_dir)
    hf_dir = out / f"{family}-hf"
    hf_dir.mkdir(parents=True, exist_ok=True)
    model = tiny_model(family, seed, **VLLM_CPU_CONFIG.get(family, {}))
    gguf = Path(write_gguf(model, out / f"{family}.gguf", qtypes={r"_exps\.": EXPERT_TYPE, "default": "F32"}))
    source = open_source(gguf)
    tensors = {}
    for name in model.state_dict():
        fused = _FUSED_EXPERTS.match(name)
        if fused is None:
            tensors[name] = source.get(name).dequantize(torch.float32).contiguous()
            continue
        prefix, kind = fused.groups()
        for proj in (("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",)):
            stacked = source.get(f"{prefix}.{proj}").dequantize(torch.float32)
            for e in range(stacked.shape[0]):
                tensors[f"{prefix}.{e}.{proj}.weight"] = stacked[e].contiguous()
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(hf_dir)
    source.tokenizer().save_pretrained(hf_dir)
    return gguf, hf_dir
