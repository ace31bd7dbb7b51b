"""``KExpertsGPU`` against ktcore's ``KExpertsTorch`` on the same GGUF tensors.

Tolerance: relative error 1e-2 in bfloat16 compute (both run bf16 weights/activations; the GPU op
rounds the dequantized weight tile to bf16, as KExpertsTorch's dequantized weights are).
"""

import pytest
import torch

from cuda_test_helpers import half_dtypes, rel_err
from cuda_ggml_samples import ggml_tensor


def _experts_module(E, H, I, dtype):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=2, hidden_act="silu")
    with torch.device("meta"):
        return Qwen3MoeExperts(cfg).to(dtype)


@pytest.mark.parametrize("types", [("Q4_K", "Q4_K", "Q4_K"), ("Q4_0", "Q4_1", "Q6_K"), ("Q8_0", "Q8_0", "Q4_0")])
@pytest.mark.parametrize("tokens,top_k,layout", [(1, 2, "n_major"), (37, 3, "k_major")])
def test_matches_kexperts_torch(device, types, tokens, top_k, layout):
    from ktcore.builtin.experts import KExpertsTorch
    from kt_cuda.ops import KExpertsGPU

    E, H, I = 6, 256, 512
    dtype = half_dtypes()[-1]
    module = _experts_module(E, H, I, dtype)
    gate, _ = ggml_tensor((E, I, H), types[0], seed=1, name="gate_proj")
    up, _ = ggml_tensor((E, I, H), types[1], seed=2, name="up_proj")
    down, _ = ggml_tensor((E, H, I), types[2], seed=3, name="down_proj")
    weights = {"gate_proj": gate, "up_proj": up, "down_proj": down}
    ref_op = KExpertsTorch(module, "cpu", dtype=torch.float32)
    ref_op.load(weights)
    op = KExpertsGPU(module, device, layout=layout)
    op.load(weights)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, H, generator=g)
    index = torch.stack([torch.randperm(E, generator=g)[:top_k] for _ in range(tokens)])
    index[0, -1] = E  # "expert held elsewhere": contributes nothing
    routing = torch.rand(tokens, top_k, generator=g)
    ref = ref_op(x, index, routing)
    out = op(x.to(device, dtype), index.to(device), routing.to(device))
    assert out.shape == (tokens, H) and out.dtype == dtype
    assert rel_err(out.float().cpu(), ref) < 1e-2


def test_align_pairs_covers_every_pair_once(device):
    from kt_cuda.triton_int4 import align_pairs

    index = torch.tensor([[3, 0], [3, 1], [0, 3], [5, 3]], device=device)
    pair_ids, block_expert = align_pairs(index, 6, 4)
    pair_ids, block_expert = pair_ids.cpu(), block_expert.cpu()
    valid = pair_ids[pair_ids < 8]
    assert sorted(valid.tolist()) == list(range(8))
    flat = index.reshape(-1).cpu()
    for b, e in enumerate(block_expert.tolist()):
        rows = pair_ids[b * 4:(b + 1) * 4]
        rows = rows[rows < 8]
        if e < 0:
            assert rows.numel() == 0
        else:
            assert (flat[rows] == e).all()
