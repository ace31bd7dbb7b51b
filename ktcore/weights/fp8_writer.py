"""Write a tiny DeepSeek-V3 as a native FP8 checkpoint folder, laid out as DeepSeek-V3/R1's (for tests).

``write_fp8_checkpoint(path, seed=0, shards=1)``: ``ktcore.testing.tiny_model("deepseek_v3", seed)`` (a
Transformers ``DeepseekV3Config``, seeded random weights) with every projection of the decoder layers
(attention, dense MLP, shared and routed experts, one checkpoint tensor per expert) quantized to e4m3 in
128x128 blocks scaled by each block's amax (``fp8.quantize``) and stored with its ``weight_scale_inv``;
embeddings, norms, routers and the output head in BF16 (the router's score-correction bias in F32), as
the published checkpoints have them. ``config.json`` carries the ``quantization_config``; the tokenizer is
the tiny chat tokenizer of the test models (``ktcore.server.tiny``). ``shards > 1`` splits the tensors
over that many files named by ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from . import fp8

QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": [fp8.BLOCK, fp8.BLOCK]}
_QUANTIZED = re.compile(r"^model\.layers\.\d+\..*_proj(_with_mqa)?\.weight$")


def checkpoint_tensors(model) -> dict[str, torch.Tensor]:
    """The model's state dict under checkpoint names: fused experts split per expert, projections FP8."""
    out: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        value = value.detach().float()
        if name.endswith(".experts.gate_up_proj"):
            prefix, inter = name[: -len(".gate_up_proj")], value.shape[1] // 2
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = value[e, :inter]
                out[f"{prefix}.{e}.up_proj.weight"] = value[e, inter:]
        elif name.endswith(".experts.down_proj"):
            prefix = name[: -len(".down_proj")]
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = value[e]
        else:
            out[name] = value
    tensors: dict[str, torch.Tensor] = {}
    for name, value in out.items():
        if _QUANTIZED.match(name):
            q, scale = fp8.quantize(value)
            tensors[name], tensors[name + fp8.SCALE_SUFFIX] = q, scale
        elif name.endswith("e_score_correction_bias"):
            tensors[name] = value.contiguous()
        else:
            tensors[name] = value.to(torch.bfloat16).contiguous()
    return tensors


def write_fp8_checkpoint(path: str | Path, seed: int = 0, shards: int = 1, **config_overrides) -> Path:
    """Write the folder (created if needed) and return its path. ``config_overrides`` change the tiny config."""
    from safetensors.torch import save_file

    from ..server.tiny import tiny_chat_tokenizer
    from ..testing import tiny_model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = tiny_model("deepseek_v3", seed, **config_overrides)
    tensors = checkpoint_tensors(model)
    names = list(tensors)
    per = -(-len(names) // shards)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            chunk = {n: tensors[n] for n in names[i * per : (i + 1) * per]}
            save_file(chunk, str(path / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(chunk, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = model.config
    config.quantization_config = dict(QUANTIZATION_CONFIG)
    config.save_pretrained(path)
    tiny_chat_tokenizer(config.vocab_size).save_pretrained(path)
    return path


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1)
    args = parser.parse_args()
    print(write_fp8_checkpoint(args.path, args.seed, args.shards))
