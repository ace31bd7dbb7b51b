"""KAttentionAscend on the CPU with ``ReferenceAttentionKernels`` (the documented semantics of
npu_fusion_attention / npu_incre_flash_attention / npu_rotary_mul in torch) against the Transformers
attention module: prefill, a second prefill chunk after cached keys, then decode steps, with and without
the model's mask. Tolerance: the kernels run in float16 (the model in float32), 5e-3 of the output scale."""

import inspect

import pytest
import torch
from transformers import DynamicCache, LlamaConfig
from transformers.masking_utils import create_causal_mask

from kt_ascend.attention import KAttentionAscend, ReferenceAttentionKernels, masked_positions
from ktcore.testing import tiny_config, tiny_model

torch.set_num_threads(2)


def llama_128():
    """A llama layer with head size 128: the size npu_rotary_mul is used for."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config = LlamaConfig(**{**config.to_dict(), "head_dim": 128, "num_attention_heads": 2, "num_key_value_heads": 1})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def run_steps(call, model, hidden, prefill, use_mask):
    config = model.config
    cache = DynamicCache(config=config)
    outs = []
    steps = [(0, prefill), (prefill, prefill + 3)] + [(t, t + 1) for t in range(prefill + 3, hidden.shape[1])]
    for start, end in steps:
        positions = torch.arange(start, end)[None].expand(hidden.shape[0], -1)
        pe = model.model.rotary_emb(hidden, positions)
        chunk = hidden[:, start:end]
        mask = None
        if use_mask or start > 0:
            mask = create_causal_mask(config, chunk, None, cache, positions, allow_is_causal_skip=False)
        outs.append(call(chunk, pe, mask, cache)[0])
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("family,use_mask", [("qwen3", False), ("qwen3", True), ("qwen2_moe", True), ("llama128", False)])
def test_attention_matches_transformers(family, use_mask):
    model = llama_128() if family == "llama128" else tiny_model(family, seed=0)
    attn = model.model.layers[0].self_attn
    kw = "cache" if "cache" in inspect.signature(type(attn).forward).parameters else "past_key_values"
    op = KAttentionAscend(attn, "cpu")
    calls = []

    class Recorded(ReferenceAttentionKernels):
        @classmethod
        def fusion_attention(cls, *args, **kwargs):
            calls.append("fusion_attention")
            return super().fusion_attention(*args, **kwargs)

        @classmethod
        def incre_flash_attention(cls, *args, **kwargs):
            calls.append("incre_flash_attention")
            return super().incre_flash_attention(*args, **kwargs)

        @staticmethod
        def rotary_mul(*args):
            calls.append("rotary_mul")
            return ReferenceAttentionKernels.rotary_mul(*args)

    op.kernels = Recorded
    hidden = torch.randn(2, 10, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = run_steps(lambda h, pe, m, c: attn(hidden_states=h, position_embeddings=pe, attention_mask=m, **{kw: c}), model, hidden, 5, use_mask)
        got = run_steps(lambda h, pe, m, c: op(h, position_embeddings=pe, attention_mask=m, cache=c), model, hidden, 5, use_mask)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=5e-3 * float(expected.abs().max()))
    assert "fusion_attention" in calls and "incre_flash_attention" in calls
    assert ("rotary_mul" in calls) == (family == "llama128")


def test_mask_polarity():
    allowed = torch.tensor([[True, False]])
    assert masked_positions(allowed).tolist() == [[False, True]]
    additive = torch.tensor([[0.0, torch.finfo(torch.float32).min]])
    assert masked_positions(additive).tolist() == [[False, True]]
    assert masked_positions(None) is None
