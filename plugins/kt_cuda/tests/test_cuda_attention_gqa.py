"""KAttentionFlashGQA: grouped-query attention with masked calls in kt-cuda's Triton flash kernel.

Interpreter tier (Triton installed, no GPU needed; the tests set ``TRITON_INTERPRET=1``): the kernel against
an fp32 reference with grouped heads, a head size that is not a power of two, sliding-window and additive
masks; the op against ktcore's ``KAttentionSDPA`` on tiny Llama and Gemma 3 layers. CUDA tier: Llama-8B-like
sizes and tiny models injected on the GPU against plain Transformers.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from transformers import DynamicCache

from kt_cuda._env import cuda_unavailable_reason

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA_REASON = cuda_unavailable_reason()
needs_cuda = pytest.mark.skipif(CUDA_REASON is not None, reason=f"needs an NVIDIA GPU: {CUDA_REASON}")


@pytest.fixture
def interpreter():
    """Triton's interpreter in this process when it was started with ``TRITON_INTERPRET=1``; otherwise
    ``test_cuda_mla.py::test_interpreter_tier`` runs these tests in such a subprocess."""
    if not HAS_TRITON:
        pytest.skip("Triton is not installed (pip install triton): its interpreter runs these kernels on the CPU")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 set before Triton is imported: test_cuda_mla.py::test_interpreter_tier runs it so")
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.zeros, InterpretedFunction):
        pytest.skip("Triton was imported before TRITON_INTERPRET=1 was set: test_cuda_mla.py::test_interpreter_tier runs these")


def reference(q, k, v, scale, mask=None):
    """fp32 causal attention (queries last), key/value heads repeated, optional bool/additive mask."""
    S, T = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    scores = q.float() @ k.float().repeat_interleave(group, 1).transpose(-1, -2) * scale
    causal = torch.arange(T, device=q.device)[None, :] <= torch.arange(S, device=q.device)[:, None] + (T - S)
    scores = scores.masked_fill(~causal, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    return scores.softmax(-1) @ v.float().repeat_interleave(group, 1)


def window_mask(S, T, window, device):
    """Bool ``[1, 1, S, T]``: causal (queries last) and at most ``window`` keys back."""
    pos = torch.arange(S, device=device)[:, None] + (T - S)
    keys = torch.arange(T, device=device)[None, :]
    return ((keys <= pos) & (keys > pos - window))[None, None]


def check(B, H, KVH, S, T, D, dtype, device, mask=None, splits=None, tol=None):
    from kt_cuda.triton_mla import flash_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, S, D, generator=g).to(device, dtype)
    k = torch.randn(B, KVH, T, D, generator=g).to(device, dtype)
    v = torch.randn(B, KVH, T, D, generator=g).to(device, dtype)
    got = flash_attention(q, k, v, scale=D**-0.5, mask=mask, num_splits=splits)
    expected = reference(q, k, v, D**-0.5, mask)
    tol = tol or {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}[dtype]
    err = (got.float() - expected).abs().max().item()
    assert err <= tol * expected.abs().max().item(), f"max |err| {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("S,T,D,splits", [(1, 45, 64, None), (1, 45, 64, 3), (7, 30, 80, None), (20, 20, 64, None)])
def test_gqa_kernel_matches_reference_interpreted(interpreter, dtype, S, T, D, splits):
    check(2, 8, 2, S, T, D, dtype, "cpu", splits=splits)


@pytest.mark.parametrize("S,splits", [(1, 2), (9, None)])
def test_gqa_sliding_window_and_additive_masks_interpreted(interpreter, S, splits):
    T = 33
    mask = window_mask(S, T, 8, "cpu")
    check(1, 4, 1, S, T, 64, torch.float32, "cpu", mask=mask, splits=splits)
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    check(1, 4, 1, S, T, 64, torch.float32, "cpu", mask=additive, splits=splits)


def run_steps(fn, model, hidden, layer_type, sliding):
    """Prefill 6, a chunk of 3 after it, then 3 single tokens through a DynamicCache, with the masks
    Transformers' SDPA path gives (sliding layers: Transformers' own sliding-window mask)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    cache = DynamicCache(config=model.config)
    outs = []
    for start, end in [(0, 6), (6, 9), (9, 10), (10, 11), (11, 12)]:
        positions = torch.arange(start, end)[None]
        pe = model.model.rotary_emb(hidden, positions, *((layer_type,) if layer_type else ()))
        chunk = hidden[:, start:end]
        make = create_sliding_window_causal_mask if sliding else create_causal_mask
        mask = make(model.config, chunk, None, cache, positions, allow_is_causal_skip=False)
        outs.append(fn(chunk, pe, mask, cache)[0])
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("family,layer", [("llama", 0), ("gemma3", 0)])
def test_op_matches_sdpa_op_interpreted(interpreter, family, layer):
    """Every call through the kernel (``kernel: triton``); gemma3's layer 0 slides over a window of 8."""
    from ktcore.builtin import KAttentionSDPA
    from ktcore.testing import tiny_model
    from kt_cuda.ops.attention import KAttentionFlashGQA

    model = tiny_model(family)
    attn = model.model.layers[layer].self_attn
    core, ours = KAttentionSDPA(attn, "cpu"), KAttentionFlashGQA(attn, "cpu", kernel="triton")
    layer_type = model.config.layer_types[layer] if family == "gemma3" else None
    sliding = getattr(attn, "sliding_window", None) is not None
    hidden = torch.randn(1, 12, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    def call(op):
        return lambda h, pe, m, c: op(h, position_embeddings=pe, attention_mask=m, cache=c)

    with torch.no_grad():
        expected = run_steps(call(core), model, hidden, layer_type, sliding)
        got = run_steps(call(ours), model, hidden, layer_type, sliding)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_op_options():
    from ktcore.testing import tiny_model
    from kt_cuda.ops.attention import KAttentionFlashGQA

    attn = tiny_model("llama").model.layers[0].self_attn
    with pytest.raises(ValueError, match="kernel must be one of decode, masked, triton"):
        KAttentionFlashGQA(attn, "cpu", kernel="sdpa")
    assert KAttentionFlashGQA.graph_capturable is True
    assert KAttentionFlashGQA.available("cpu") == "runs on cuda devices only, not cpu"


# -- GPU -------------------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize(
    "dtype,S,T", [(torch.bfloat16, 1, 4097), (torch.bfloat16, 512, 2048), (torch.bfloat16, 1000, 1000), (torch.float16, 1, 4097)]
)
def test_gqa_llama_sizes(dtype, S, T):
    mask = window_mask(S, T, 4096 if T < 4096 else 1024, "cuda").expand(2, 1, S, T)
    check(2, 32, 8, S, T, 128, dtype, "cuda", mask=mask)


@needs_cuda
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_tiny_model_injected_on_gpu_matches_transformers(tmp_path, family):
    """ktcore's gpu-cpu rules with KAttentionFlashGQA (``kernel: masked``): chunked prefill through ktcore's
    cache (masked calls in Triton) and greedy decoding with a static cache (masked single tokens) give
    Transformers' logits and tokens."""
    from ktcore.generate import forward_step, new_cache
    from ktcore.inject import load_model
    from ktcore.modules import KAttention
    from ktcore.registry import Registry
    from ktcore.testing import MODEL_TYPES, tiny_model
    from ktcore.weights.state_dict import StateDictSource

    from cuda_test_helpers import torch_gpu_rules

    path = torch_gpu_rules(tmp_path, MODEL_TYPES[family], KAttentionSDPA="KAttentionFlashGQA")
    rules = tmp_path / "rules.yaml"
    rules.write_text(path.read_text().replace("op: KAttentionFlashGQA", "op: KAttentionFlashGQA\n      op_kwargs: {kernel: masked}"))
    reference = tiny_model(family)
    model, _ = load_model(StateDictSource(reference), rules=rules, dtype=torch.float32, registry=Registry(), progress=False)
    ops = [m.generate_op for m in model.modules() if isinstance(m, KAttention)]
    assert ops and all(op.name == "KAttentionFlashGQA" and op.kernel == "masked" for op in ops)
    ids = torch.randint(3, 512, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(ids).logits
        cache = new_cache(model, 64)
        spans = [(0, 10), (10, 20)] + [(t, t + 1) for t in range(20, 24)]
        got = torch.cat([forward_step(model, ids[:, a:b].cuda(), cache, logits_to_keep=0).cpu() for a, b in spans], dim=1)
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
        gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        # disable_compile: Transformers would torch.compile the forward for a static cache on CUDA
        out = model.generate(ids[:, :20].cuda(), cache_implementation="static", disable_compile=True, **gen)
        assert torch.equal(out.cpu(), reference.generate(ids[:, :20], **gen))


@pytest.mark.parametrize("kernel,expected", [("decode", [False, False, True]), ("masked", [True, False, True]),
                                             ("triton", [True, True, True])])
def test_which_calls_go_to_triton(monkeypatch, kernel, expected):
    """Calls: a masked 3-query chunk, an unmasked square prefill, a masked single token. The kernel is
    replaced by the reference (no Triton needed), recording which calls reached it."""
    import sys
    import types

    from ktcore.testing import tiny_model
    from kt_cuda.ops.attention import KAttentionFlashGQA

    seen = []

    def fake(q, k, v, *, scale, mask=None):
        seen.append(q.shape[2])
        return reference(q, k, v, scale, mask).to(q.dtype)

    monkeypatch.setitem(sys.modules, "kt_cuda.triton_mla", types.SimpleNamespace(flash_attention=fake))
    model = tiny_model("llama")
    op = KAttentionFlashGQA(model.model.layers[0].self_attn, "cpu", kernel=kernel)
    calls = []
    for S, T, masked in ((3, 7, True), (5, 5, False), (1, 9, True)):
        q, k, v = torch.randn(1, 4, S, 64), torch.randn(1, 2, T, 64), torch.randn(1, 2, T, 64)
        mask = window_mask(S, T, T, "cpu") if masked else None
        before = len(seen)
        out = op._attend(q, k, v, mask, is_causal=not masked and S > 1)
        torch.testing.assert_close(out, reference(q, k, v, op.scaling, mask), rtol=1e-5, atol=1e-5)
        calls.append(len(seen) > before)
    assert calls == expected
