"""KMLAAttention and its Triton kernels (``kt_cuda.triton_mla``).

Two tiers:
- ``interpreter``: tiny shapes in Triton's CPU interpreter (the test sets ``TRITON_INTERPRET=1`` for its
  kernel calls): kernel against an fp32 torch reference (decode with and without key splits, odd lengths,
  lengths off the key block, B > 1, prefill after cached keys, bool and additive masks), the op against
  ktcore's ``KAttentionMLA``, and tiny DeepSeek-V2/V3 models whose attention runs through the op against
  plain Transformers (logits, greedy decoding with a dynamic and a static cache). Needs Triton installed
  (not CUDA); skips with that reason otherwise.
- ``cuda``: the same at DeepSeek's sizes (H = 16 / 128, r = 512, rope = 64, T up to 4k), the tiny models
  loaded through ktcore's injection with the op on the GPU, and a decode step captured in a CUDA graph.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from kt_cuda._env import cuda_unavailable_reason

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA_REASON = cuda_unavailable_reason()

needs_cuda = pytest.mark.skipif(CUDA_REASON is not None, reason=f"needs an NVIDIA GPU: {CUDA_REASON}")


def interpreter_ready() -> bool:
    """Triton's interpreter can run kernels in this process: ``TRITON_INTERPRET=1`` was set before Triton's
    language module was imported (its library functions, ``tl.zeros``, ``tl.max``..., are decorated then)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


@pytest.fixture
def interpreter():
    """Runs the kernels on CPU tensors in Triton's interpreter (in this process when it was started with
    ``TRITON_INTERPRET=1``, else through ``test_interpreter_tier``'s subprocess)."""
    if not HAS_TRITON:
        pytest.skip("Triton is not installed (pip install triton): its interpreter runs these kernels on the CPU")
    if not interpreter_ready():
        pytest.skip("needs TRITON_INTERPRET=1 set before Triton is imported: test_interpreter_tier runs it so")


def test_interpreter_tier():
    """The interpreter tests of this file and test_cuda_attention_gqa.py in a subprocess started with
    ``TRITON_INTERPRET=1`` (Triton decorates its library for the interpreter only when imported so)."""
    if not HAS_TRITON:
        pytest.skip("Triton is not installed (pip install triton): its interpreter runs these kernels on the CPU")
    if interpreter_ready():
        pytest.skip("this process runs the interpreter tests itself")
    if torch.cuda.is_available():
        # the tier exists for CPU-only CI; on a GPU the same kernels run compiled in the tests below (and
        # Triton 3.6's interpreter, shipped with torch 2.11, trips over NumPy >= 2.4 there)
        pytest.skip("CUDA is available: the kernels are tested compiled on the GPU instead of interpreted")
    here = Path(__file__).parent
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "interpreted",
           str(here / "test_cuda_mla.py"), str(here / "test_cuda_attention_gqa.py")]
    proc = subprocess.run(cmd, cwd=here, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 36 and "skipped" not in proc.stdout, proc.stdout[-2000:]


def reference_attention(q, k, v, scale, q_rope=None, k_rope=None, mask=None):
    """fp32 attention, key/value heads repeated for their query heads, causal with the queries last."""
    B, H, S, _ = q.shape
    T = k.shape[2]
    group = H // k.shape[1]
    k, v = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    scores = q.float() @ k.transpose(-1, -2)
    if q_rope is not None:
        scores = scores + q_rope.float() @ k_rope.float().repeat_interleave(group, 1).transpose(-1, -2)
    scores = scores * scale
    causal = torch.arange(T, device=q.device)[None, :] <= torch.arange(S, device=q.device)[:, None] + (T - S)
    scores = scores.masked_fill(~causal, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    return scores.softmax(-1) @ v


def mla_inputs(B, H, S, T, r, rope, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S, r, generator=g)
    qr = torch.randn(B, H, S, rope, generator=g)
    # the cache is a prefix view of a longer buffer, as ktcore's and Transformers' static caches hand it out
    latent = torch.randn(B, 1, T + 5, r, generator=g)[:, :, :T]
    kr = torch.randn(B, 1, T + 5, rope, generator=g)[:, :, :T]
    return [t.to(device=device, dtype=dtype) for t in (q, qr, latent, kr)]


def check_latent(B, H, S, T, r, rope, dtype, device, splits=None, mask=None, tol=None):
    from kt_cuda.triton_mla import latent_attention

    q, qr, latent, kr = mla_inputs(B, H, S, T, r, rope, dtype, device)
    scale = (r // 4 + rope) ** -0.5
    got = latent_attention(q, qr, latent, kr, scale=scale, mask=mask, num_splits=splits)
    expected = reference_attention(q, latent, latent, scale, qr, kr, mask)
    assert got.shape == (B, H, S, r) and got.dtype == dtype
    tol = tol or {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}[dtype]
    err = (got.float() - expected).abs().max().item()
    assert err <= tol * expected.abs().max().item(), f"max |err| {err:.3g}"
    return got


def padded_mask(B, S, T, device, dtype=torch.bool, keep_from=(0, 3)):
    """Bottom-right causal mask where batch row ``b`` also hides its first ``keep_from[b]`` keys (left padding)."""
    allowed = torch.arange(T)[None, :] <= torch.arange(S)[:, None] + (T - S)
    masks = []
    for b in range(B):
        m = allowed.clone()
        m[:, : keep_from[b % len(keep_from)]] = False
        masks.append(m)
    mask = torch.stack(masks)[:, None].to(device)
    if dtype != torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


# -- kernel, interpreter -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,splits", [(1, None), (37, None), (37, 3), (70, 4), (45, 64)])
def test_decode_matches_reference_interpreted(interpreter, dtype, T, splits):
    """One query per sequence: odd lengths, a length off the 32-key block, forced splits (3 splits of 37
    keys leave a short last split; 64 requested on 45 keys is capped at the number of key blocks)."""
    check_latent(2, 16, 1, T, 64, 16, dtype, "cpu", splits=splits)


@pytest.mark.parametrize("S,T", [(9, 9), (5, 29), (33, 33)])
def test_prefill_matches_reference_interpreted(interpreter, S, T):
    """Causal in latent space, square and after cached keys; 33 queries x 4 heads span several row blocks."""
    check_latent(2, 4, S, T, 64, 16, torch.float32, "cpu")


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("S,splits", [(1, 2), (6, None)])
def test_masks_interpreted(interpreter, mask_dtype, S, splits):
    """Left padding in one batch row: bool masks and Transformers' additive masks (finfo.min) agree with
    the reference, and the padding really changes the result."""
    T = 40
    mask = padded_mask(2, S, T, "cpu", mask_dtype, keep_from=(0, 7))
    got = check_latent(2, 4, S, T, 64, 16, torch.float32, "cpu", splits=splits, mask=mask)
    unmasked = check_latent(2, 4, S, T, 64, 16, torch.float32, "cpu", splits=splits)
    torch.testing.assert_close(got[0], unmasked[0])
    assert (got[1] - unmasked[1]).abs().max() > 1e-3


def test_fully_masked_rows_give_zeros_not_nans_interpreted(interpreter):
    from kt_cuda.triton_mla import latent_attention

    q, qr, latent, kr = mla_inputs(1, 4, 1, 20, 64, 16, torch.float32, "cpu")
    mask = torch.zeros(1, 1, 1, 20, dtype=torch.bool)
    for splits in (1, 3):
        out = latent_attention(q, qr, latent, kr, scale=0.1, mask=mask, num_splits=splits)
        assert torch.equal(out, torch.zeros_like(out))


def test_bad_inputs_are_named_interpreted(interpreter):
    from kt_cuda.triton_mla import flash_attention, latent_attention

    q, qr, latent, kr = mla_inputs(1, 4, 3, 2, 64, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="3 queries but only 2 keys"):
        latent_attention(q, qr, latent, kr, scale=0.1)
    q, qr, latent, kr = mla_inputs(1, 4, 1, 8, 64, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="latent must be"):
        latent_attention(q, qr, latent.expand(1, 2, 8, 64), kr, scale=0.1)
    with pytest.raises(ValueError, match="share one dtype"):
        latent_attention(q, qr.half(), latent, kr, scale=0.1)
    with pytest.raises(ValueError, match="not a multiple"):
        flash_attention(q[:, :3], latent.expand(1, 2, 8, 64), scale=0.1)
    with pytest.raises(ValueError, match="mask of shape"):
        latent_attention(q, qr, latent, kr, scale=0.1, mask=torch.ones(1, 1, 1, 9, dtype=torch.bool))


# -- the op ----------------------------------------------------------------------------------------------------


def run_steps(attn_fn, model, hidden, prefill, use_mask):
    """Prefill, a 3-token chunk after it, then single tokens, through one DynamicCache, with bool causal
    masks as Transformers' SDPA path builds them; with ``use_mask`` False only the chunk after cached keys
    gets one (Transformers skips a mask for the first prefill and for single tokens)."""
    cache = DynamicCache(config=model.config)
    outs = []
    steps = [(0, prefill), (prefill, prefill + 3)] + [(t, t + 1) for t in range(prefill + 3, hidden.shape[1])]
    for start, end in steps:
        positions = torch.arange(start, end, device=hidden.device)[None].expand(hidden.shape[0], -1)
        pe = model.model.rotary_emb(hidden, positions)
        mask = None
        if use_mask or (start > 0 and end - start > 1):
            allowed = torch.arange(end, device=hidden.device)[None, :] <= torch.arange(start, end, device=hidden.device)[:, None]
            mask = allowed[None, None].expand(hidden.shape[0], -1, -1, -1)
        outs.append(attn_fn(hidden[:, start:end], pe, mask, cache)[0])
    return torch.cat(outs, dim=1)


def op_pair(model, layer, device, **kwargs):
    from ktcore.builtin import KAttentionMLA
    from kt_cuda.ops.attention import KMLAAttention

    attn = model.model.layers[layer].self_attn
    core, ours = KAttentionMLA(attn, device), KMLAAttention(attn, device, **kwargs)
    core.post_load()
    ours.post_load()

    def wrap(op):
        return lambda h, pe, mask, cache: op(h, position_embeddings=pe, attention_mask=mask, cache=cache)

    return wrap(core), wrap(ours)


@pytest.mark.parametrize("family,use_mask", [("deepseek_v2", True), ("deepseek_v3", False)])
def test_op_matches_core_mla_interpreted(interpreter, family, use_mask):
    from ktcore.testing import tiny_model

    model = tiny_model(family)
    core, ours = op_pair(model, 1, "cpu", decode_splits=2)
    hidden = torch.randn(2, 13, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = run_steps(core, model, hidden, 8, use_mask)
        got = run_steps(ours, model, hidden, 8, use_mask)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_expanded_prefill_matches_core_op(family):
    """``prefill: expanded`` (per-head keys/values from the cached latents, SDPA; pure torch, so it runs
    here without Triton) against the core op over prefill, a chunk after cached keys and, through the
    core op's route, decode steps. Run with ``decode`` patched to the core's absorbed torch path."""
    from ktcore.builtin import KAttentionMLA
    from ktcore.testing import tiny_model
    from kt_cuda.ops.attention import KMLAAttention

    class Expanded(KMLAAttention):
        def _latent_attention(self, *args):  # decode through the core's torch path: no Triton needed here
            return KAttentionMLA._latent_attention(self, *args)

    model = tiny_model(family)
    attn = model.model.layers[1].self_attn
    core, ours = KAttentionMLA(attn, "cpu"), Expanded(attn, "cpu", prefill="expanded")
    core.post_load()
    ours.post_load()
    calls = []
    original = ours._attend_expanded
    ours._attend_expanded = lambda *a: calls.append(a[0].shape[2]) or original(*a)

    def wrap(op):
        return lambda h, pe, mask, cache: op(h, position_embeddings=pe, attention_mask=mask, cache=cache)

    hidden = torch.randn(2, 13, model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for use_mask in (True, False):
            calls.clear()
            expected = run_steps(wrap(core), model, hidden, 8, use_mask)
            got = run_steps(wrap(ours), model, hidden, 8, use_mask)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
            assert calls == [8, 3]  # the two prefill calls, not the decode steps


def test_auto_prefill_expands_below_its_size_cap(monkeypatch):
    """``prefill: auto`` (default) expands the cached latents for SDPA while the per-head keys and values
    fit ``EXPANDED_MAX_BYTES``; past it (long caches) it stays in latent space; decode never expands."""
    import kt_cuda.ops.attention as attention
    from ktcore.testing import tiny_model

    op = attention.KMLAAttention(tiny_model("deepseek_v2").model.layers[0].self_attn, "cpu")
    op.post_load()
    assert op.prefill == "auto"
    heads, r = op.num_heads, op.kv_lora_rank
    q = torch.zeros(1, heads, 4, 1)
    latent = torch.zeros(1, 1, 100, r)
    width = op.w_k.shape[1] + op.qk_rope_head_dim + op.v_head_dim
    need = heads * 100 * width * op.dtype.itemsize
    monkeypatch.setattr(attention, "EXPANDED_MAX_BYTES", need)
    assert op._expands(q, latent) and not op._expands(q[:, :, :1], latent)
    monkeypatch.setattr(attention, "EXPANDED_MAX_BYTES", need - 1)
    assert not op._expands(q, latent)
    op.prefill = "expanded"
    assert op._expands(q, latent)


def test_prepare_capture_runs_the_decode_kernels_interpreted(interpreter, monkeypatch):
    """Before a CUDA graph capture the op runs its decode kernels once at the cache's full length, with and
    without a mask, so that nothing compiles under capture; the GQA op its masked decode kernel."""
    import kt_cuda.triton_mla as triton_mla
    from ktcore.testing import tiny_model
    from kt_cuda.ops.attention import KAttentionFlashGQA, KMLAAttention

    seen = []
    real = triton_mla.flash_attention

    def spy(q, k, v=None, **kw):
        seen.append((tuple(q.shape), tuple(k.shape), kw["mask"] is not None))
        return real(q, k, v, **kw)

    monkeypatch.setattr(triton_mla, "flash_attention", spy)
    config = tiny_model("deepseek_v3").config
    KMLAAttention(tiny_model("deepseek_v3").model.layers[0].self_attn, "cpu").prepare_capture(40)
    heads, r = config.num_attention_heads, config.kv_lora_rank
    assert seen == [((1, heads, 1, r), (1, 1, 40, r), False), ((1, heads, 1, r), (1, 1, 40, r), True)]
    seen.clear()
    KAttentionFlashGQA(tiny_model("llama").model.layers[0].self_attn, "cpu").prepare_capture(24)
    assert seen == [((1, 4, 1, 64), (1, 2, 24, 64), True)]


def test_op_options_are_checked():
    from ktcore.testing import tiny_model
    from kt_cuda.ops.attention import KMLAAttention

    attn = tiny_model("deepseek_v2").model.layers[0].self_attn
    with pytest.raises(ValueError, match="prefill must be one of auto, triton, torch, expanded"):
        KMLAAttention(attn, "cpu", prefill="flash")
    with pytest.raises(ValueError, match="decode_splits must be >= 1"):
        KMLAAttention(attn, "cpu", decode_splits=0)
    assert KMLAAttention.graph_capturable is True
    assert KMLAAttention.available("cpu") == "runs on cuda devices only, not cpu"


def with_op_attention(model, device, **kwargs):
    """``model`` with every layer's attention replaced by KMLAAttention built from it (weights absorbed)."""
    from kt_cuda.ops.attention import KMLAAttention

    for layer in model.model.layers:
        op = KMLAAttention(layer.self_attn, device, **kwargs)
        op.post_load()
        layer.self_attn = op
    return model


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_tiny_model_matches_transformers_interpreted(interpreter, family):
    """Whole tiny model, attention through the op in the interpreter: prompt logits, then greedy decoding
    with Transformers' static cache (prefill without a mask over more slots than queries, decode over the
    whole buffer with a mask hiding the unfilled tail). The GPU test below also decodes with a dynamic cache."""
    from ktcore.testing import tiny_model

    reference = tiny_model(family)
    ours = with_op_attention(tiny_model(family), "cpu")
    ids = torch.randint(3, 512, (1, 8), generator=torch.Generator().manual_seed(0))
    gen = dict(max_new_tokens=2, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    with torch.no_grad():
        expected, got = reference(ids).logits, ours(ids).logits
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
        ref_out = reference.generate(ids, **gen)
        out = ours.generate(ids, cache_implementation="static", **gen)
    assert torch.equal(out.sequences, ref_out.sequences)
    for g, e in zip(out.logits, ref_out.logits):
        assert (g - e).abs().max() <= 1e-4 * e.abs().max()


def test_shipped_deepseek_rules_use_the_op(tmp_path):
    """The shipped DeepSeek gpu and gpu-cpu files name KAttentionMLA, whose most preferred CUDA backend is
    KMLAAttention (checked by device type: no GPU needed); ktcore's torch op stays the backend elsewhere."""
    import kt_cuda.plugin as plugin
    from kt_cuda.ops.attention import KMLAAttention
    from ktcore.inject import RULE_FILES_DIR, build_meta_model, inject
    from ktcore.registry import Registry
    from ktcore.rules import load_rules
    from ktcore.testing import tiny_config

    registry = Registry(entrypoints=False, plugins={"cuda": plugin})
    for family in ("deepseek_v2", "deepseek_v3"):
        for layout in ("gpu-cpu", "gpu"):
            rules = load_rules(RULE_FILES_DIR / f"{family}-{layout}.yaml", registry, check_devices=False, gpu="cuda")
            model = build_meta_model(tiny_config(family))
            inject(model, rules, registry, build_ops=False)
            layers = tiny_config(family).num_hidden_layers
            assert [model.model.layers[i].self_attn.generate_op_cls for i in range(layers)] == [KMLAAttention] * layers
    assert registry.resolution("attention", "KAttentionMLA", "cpu").chosen.plugin == "torch"


# -- GPU: DeepSeek sizes ----------------------------------------------------------------------------------------


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@needs_cuda
@pytest.mark.parametrize(
    "dtype,B,H,T",
    [(BF16, 1, 128, 1), (BF16, 1, 128, 1023), (BF16, 2, 16, 4097), (BF16, 2, 128, 333), (FP16, 1, 128, 1023),
     (FP32, 2, 128, 333), (FP32, 1, 16, 16385)],
)
def test_decode_deepseek_sizes(dtype, B, H, T):
    check_latent(B, H, 1, T, 512, 64, dtype, "cuda")


@needs_cuda
@pytest.mark.parametrize(
    "dtype,B,H,S,T", [(BF16, 1, 16, 300, 300), (BF16, 2, 128, 64, 1001), (BF16, 1, 128, 257, 257), (FP32, 1, 16, 300, 300)]
)
def test_prefill_deepseek_sizes(dtype, B, H, S, T):
    check_latent(B, H, S, T, 512, 64, dtype, "cuda")


@needs_cuda
@pytest.mark.parametrize("S", [1, 17])
def test_masked_deepseek_sizes(S):
    mask = padded_mask(2, S, 777, "cuda", torch.bool, keep_from=(0, 100))
    check_latent(2, 128, S, 777, 512, 64, torch.bfloat16, "cuda", mask=mask)


@needs_cuda
def test_decode_replays_in_a_cuda_graph():
    """A decode call over a static latent cache is captured once and replayed after the cache and the
    query change: the replay equals an eager call on the new values."""
    from kt_cuda.triton_mla import latent_attention

    q, qr, latent, kr = mla_inputs(1, 128, 1, 2048, 512, 64, torch.bfloat16, "cuda")
    mask = torch.ones(1, 1, 1, 2048, dtype=torch.bool, device="cuda")
    mask[..., 1500:] = False  # the unfilled tail of a static cache
    run = lambda: latent_attention(q, qr, latent, kr, scale=0.07, mask=mask)  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for seed in (1, 2):
        new = mla_inputs(1, 128, 1, 2048, 512, 64, torch.bfloat16, "cuda", seed=seed)
        for dst, src in zip((q, qr, latent, kr), new):
            dst.copy_(src)
        mask[..., 1500 + seed] = True
        graph.replay()
        torch.testing.assert_close(out, run(), rtol=0, atol=0)


def gpu_rules(tmp_path, family):
    """ktcore's gpu-cpu rule file for ``family`` with KMLAAttention for attention (all other ops ktcore's)."""
    from cuda_test_helpers import torch_gpu_rules

    return torch_gpu_rules(tmp_path, family, KAttentionMLA="KMLAAttention")


@needs_cuda
@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_tiny_model_injected_on_gpu_matches_transformers(tmp_path, family):
    from ktcore.inject import load_model
    from ktcore.modules import KAttention
    from ktcore.registry import Registry
    from ktcore.testing import tiny_model
    from ktcore.weights.state_dict import StateDictSource

    reference = tiny_model(family)
    model, _ = load_model(StateDictSource(reference), rules=gpu_rules(tmp_path, family), dtype=torch.float32,
                          registry=Registry(), progress=False)
    attention = [m for m in model.modules() if isinstance(m, KAttention)]
    assert attention and all(m.generate_op.name == "KMLAAttention" for m in attention)
    ids = torch.randint(3, 512, (1, 20), generator=torch.Generator().manual_seed(0))
    gen = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    with torch.no_grad():
        expected = reference(ids).logits
        got = model(ids.cuda()).logits.cpu()
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
        ref_out = reference.generate(ids, **gen)
        for cache in (None, "static"):
            # disable_compile: on CUDA, Transformers would torch.compile the forward for a static cache
            # (mode reduce-overhead) around ktcore's CPU experts; this test is about the op
            static = {"cache_implementation": cache, "disable_compile": True} if cache else {}
            out = model.generate(ids.cuda(), **gen, **static)
            assert torch.equal(out.sequences.cpu(), ref_out.sequences), cache
            for g, e in zip(out.logits, ref_out.logits):
                assert (g.cpu() - e).abs().max() <= 1e-4 * e.abs().max(), cache


@needs_cuda
@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_tiny_model_bf16_on_gpu_close_to_core_op(tmp_path, family):
    """In bf16 the Triton op is as close to the fp32 model as ktcore's torch op (same weights, same GPU)."""
    from ktcore.inject import load_model
    from ktcore.registry import Registry
    from ktcore.testing import tiny_model
    from ktcore.weights.state_dict import StateDictSource

    (tmp_path / "core").mkdir()
    truth = tiny_model(family)
    ids = torch.randint(3, 512, (1, 20), generator=torch.Generator().manual_seed(1))
    errors = {}
    from cuda_test_helpers import torch_gpu_rules

    for name, rules in (("core", torch_gpu_rules(tmp_path / "core", family)), ("triton", gpu_rules(tmp_path, family))):
        model, _ = load_model(StateDictSource(tiny_model(family, dtype=torch.bfloat16)), rules=rules,
                              dtype=torch.bfloat16, registry=Registry(), progress=False)
        with torch.no_grad():
            errors[name] = (model(ids.cuda()).logits.float().cpu() - truth(ids).logits).abs()
    assert errors["triton"].max() <= 1.5 * errors["core"].max()
    assert errors["triton"].mean() <= 1.25 * errors["core"].mean()
