"""The built-in torch ops against the Transformers modules they replace, on the tiny models' weights."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from transformers import DeepseekV2Config, DeepseekV3Config, DynamicCache

from ktcore.builtin import KAttentionMLA, KAttentionSDPA, KExpertsTorch, KLinearTorch, KRoPETorch
from ktcore.registry import Registry
from ktcore.testing import YARN_ROPE, tiny_config, tiny_model
from ktcore.weights.tensor import QuantizedTensor

torch.set_num_threads(2)

GQA_FAMILIES = ("llama", "qwen3", "gemma3", "qwen2_moe", "qwen3_moe", "mixtral")
MOE_FAMILIES = ("qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3")


def as_qt(name: str, tensor: torch.Tensor) -> QuantizedTensor:
    """A float tensor as the F32/BF16 ``QuantizedTensor`` a weight source would hand out."""
    ggml = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[tensor.dtype]
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return QuantizedTensor(name=name, ggml_type=ggml, shape=tuple(tensor.shape), data=data, source="test")


def cache_kwarg(module) -> str:
    """Transformers renamed the attention modules' ``past_key_values`` argument to ``cache``."""
    return "cache" if "cache" in inspect.signature(type(module).forward).parameters else "past_key_values"


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(family, dtype=torch.float32):
        if (family, dtype) not in cache:
            cache[family, dtype] = tiny_model(family, seed=0, dtype=dtype)
        return cache[family, dtype]

    return get


def test_registry_lists_the_builtin_ops():
    registry = Registry(entrypoints=False)
    names = {"linear": "KLinearTorch", "experts": "KExpertsTorch", "rope": "KRoPETorch"}
    for role, name in names.items():
        assert registry.get(role, name).plugin == "torch"
    assert {"KAttentionSDPA", "KAttentionMLA"} <= set(registry.ops("attention"))


# -- linear ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_nn_linear(bias):
    torch.manual_seed(0)
    ref = torch.nn.Linear(256, 96, bias=bias)
    op = KLinearTorch(ref, "cpu")
    op.load({"weight": as_qt("w", ref.weight), **({"bias": as_qt("b", ref.bias)} if bias else {})})
    x = torch.randn(2, 5, 256)
    torch.testing.assert_close(op(x), ref(x), rtol=0, atol=1e-6)


def test_linear_dtype_option_and_output_dtype():
    torch.manual_seed(0)
    ref = torch.nn.Linear(256, 64)
    op = KLinearTorch(ref, "cpu", dtype="bfloat16")
    op.load({"weight": as_qt("w", ref.weight), "bias": as_qt("b", ref.bias)})
    assert op.weight.dtype == torch.bfloat16
    x = torch.randn(3, 256)
    y = op(x)
    assert y.dtype == torch.float32
    # bf16 weights and inputs: relative error around bf16's 2^-8
    assert (y - ref(x)).abs().max() < 0.02 * ref(x).abs().max()


def test_linear_shape_mismatch_names_the_tensor():
    op = KLinearTorch(torch.nn.Linear(256, 64, bias=False), "cpu")
    with pytest.raises(ValueError, match=r"'blk.0.attn_q.weight'.*\(64, 128\).*\(64, 256\)"):
        op.load({"weight": as_qt("blk.0.attn_q.weight", torch.zeros(64, 128))})


def quantized(name: str, tensor: torch.Tensor, qtype: str) -> tuple[QuantizedTensor, torch.Tensor]:
    """``tensor`` quantized (ktcore's quantizer: gguf-py has none for K-quants) as a ``QuantizedTensor``,
    with gguf-py's dequantization of it as the reference."""
    from gguf import GGMLQuantizationType, quants

    from ktcore.weights.quantize import quantize

    kind = GGMLQuantizationType[qtype]
    raw = quantize(tensor.float().numpy(), qtype)
    data = torch.from_numpy(raw.copy()).reshape(-1)
    reference = torch.from_numpy(quants.dequantize(raw, kind)).reshape(tensor.shape)
    return QuantizedTensor(name=name, ggml_type=qtype, shape=tuple(tensor.shape), data=data, source="test"), reference


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "Q6_K"])
def test_linear_over_quantized_weight_matches_its_dequantization(qtype):
    torch.manual_seed(0)
    w = torch.randn(64, 512) / 16
    qt, w_ref = quantized("blk.0.ffn_up.weight", w, qtype)
    op = KLinearTorch(torch.nn.Linear(512, 64, bias=False), "cpu")
    op.load({"weight": qt})
    x = torch.randn(3, 512)
    torch.testing.assert_close(op(x), x @ w_ref.T, rtol=1e-5, atol=1e-5)
    assert (w_ref - w).abs().max() > 0  # really quantized


# -- experts ---------------------------------------------------------------------------------------------


def experts_op(experts, **kwargs) -> KExpertsTorch:
    op = KExpertsTorch(experts, "cpu", **kwargs)
    gate, up = experts.gate_up_proj.detach().chunk(2, dim=1)
    op.load({"gate_proj": as_qt("gate", gate), "up_proj": as_qt("up", up), "down_proj": as_qt("down", experts.down_proj)})
    return op


def routing(tokens: int, num_experts: int, top_k: int, seed: int):
    """Random routing with, on purpose, one token sent twice to one expert and experts nobody uses."""
    g = torch.Generator().manual_seed(seed)
    used = torch.randperm(num_experts, generator=g)[: max(2, num_experts // 2)]  # the others get no token
    index = used[torch.randint(len(used), (tokens, top_k), generator=g)]
    index[0, :] = used[0]  # token 0 routed to the same expert in every slot
    weights = torch.rand(tokens, top_k, generator=g)
    return index, weights, set(range(num_experts)) - set(used.tolist())


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("tokens", [1, 3, 17])
def test_experts_match_transformers(models, family, tokens):
    model = models(family)
    layer = model.model.layers[-1].mlp
    experts = layer.experts
    op = experts_op(experts)
    top_k = model.config.num_experts_per_tok
    index, weights, idle = routing(tokens, experts.num_experts, top_k, seed=tokens)
    assert idle, "the routing must leave some experts without tokens"
    x = torch.randn(tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = experts(x, index, weights)
        got = op(x, index, weights)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_experts_skip_indices_outside_the_table(models):
    """Transformers marks experts held elsewhere with index == num_experts: they contribute nothing."""
    experts = models("mixtral").model.layers[0].mlp.experts
    op = experts_op(experts)
    index = torch.tensor([[0, experts.num_experts], [experts.num_experts, 5], [2, 2]])
    weights = torch.rand(3, 2)
    x = torch.randn(3, experts.hidden_dim)
    outside = index == experts.num_experts
    with torch.no_grad():
        # reference: the same routing with those slots sent to expert 0 at weight 0
        expected = experts(x, index.masked_fill(outside, 0), weights.masked_fill(outside, 0.0))
        torch.testing.assert_close(op(x, index, weights), expected, rtol=1e-5, atol=1e-5)


def test_experts_bf16(models):
    model = models("qwen3_moe", torch.bfloat16)
    experts = model.model.layers[0].mlp.experts
    op = experts_op(experts)
    assert op.dtype == torch.bfloat16
    index, weights, _ = routing(17, experts.num_experts, 2, seed=3)
    x = torch.randn(17, experts.hidden_dim).to(torch.bfloat16)
    with torch.no_grad():
        expected, got = experts(x, index, weights).float(), op(x, index, weights).float()
    # same bf16 products; only accumulation order differs
    assert (got - expected).abs().max() <= 0.02 * expected.abs().max()


def test_experts_over_quantized_weights(models):
    experts = models("qwen3_moe").model.layers[0].mlp.experts
    gate, up = experts.gate_up_proj.detach().chunk(2, dim=1)
    tensors = {"gate_proj": gate, "up_proj": up, "down_proj": experts.down_proj.detach()}
    loaded, reference = {}, {}
    for name, t in tensors.items():
        loaded[name], reference[name] = quantized(name, t, "Q4_K")
    op = KExpertsTorch(experts, "cpu")
    op.load(loaded)
    index, weights, _ = routing(17, experts.num_experts, 2, seed=5)
    x = torch.randn(17, experts.hidden_dim)
    expected = torch.zeros_like(x)
    for t in range(17):
        for k in range(2):
            e = int(index[t, k])
            h = F.silu(x[t] @ reference["gate_proj"][e].T) * (x[t] @ reference["up_proj"][e].T)
            expected[t] += weights[t, k] * (h @ reference["down_proj"][e].T)
    with torch.no_grad():
        torch.testing.assert_close(op(x, index, weights), expected, rtol=1e-4, atol=1e-4)


def test_experts_load_checks_shapes(models):
    experts = models("mixtral").model.layers[0].mlp.experts
    op = KExpertsTorch(experts, "cpu")
    E, I, H = experts.num_experts, experts.intermediate_dim, experts.hidden_dim
    bad = {"gate_proj": as_qt("blk.0.ffn_gate_exps.weight", torch.zeros(E, I, H + 1)),
           "up_proj": as_qt("u", torch.zeros(E, I, H)), "down_proj": as_qt("d", torch.zeros(E, H, I))}
    with pytest.raises(ValueError, match="ffn_gate_exps"):
        op.load(bad)


# -- rope ------------------------------------------------------------------------------------------------


def rope_cases():
    for family in ("llama", "qwen3", "mixtral", "deepseek_v2", "deepseek_v3"):
        yield family, None
    yield "gemma3", "sliding_attention"
    yield "gemma3", "full_attention"


def _assert_same(got, expected):
    if isinstance(expected, tuple):
        for g, e in zip(got, expected):
            assert g.dtype == e.dtype and g.shape == e.shape
            assert torch.equal(g, e)
    else:
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert torch.equal(got, expected)


@pytest.mark.parametrize("family,layer_type", list(rope_cases()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_tables_equal_transformers(models, family, layer_type, dtype):
    rotary = models(family).model.rotary_emb
    op = KRoPETorch(rotary, "cpu", table_positions=16)  # small table: forces growth on demand
    positions = torch.tensor([[0, 1, 2, 15, 16, 17, 100, 255, 300]])
    x = torch.zeros(1, dtype=dtype)
    args = (layer_type,) if layer_type else ()
    with torch.no_grad():
        _assert_same(op(x, positions, *args), rotary(x, positions, *args))


@pytest.mark.parametrize("mla_cls", [DeepseekV2Config, DeepseekV3Config])
def test_yarn_rope_tables_equal_transformers(mla_cls):
    """YaRN with mscale != mscale_all_dim, so the cos/sin scaling (attention_factor) is not 1."""
    from transformers import AutoModelForCausalLM

    family = "deepseek_v2" if mla_cls is DeepseekV2Config else "deepseek_v3"
    config = tiny_config(family)
    config.rope_parameters = dict(YARN_ROPE, mscale=1.0, mscale_all_dim=0.8)
    rotary = type(AutoModelForCausalLM.from_config(config).model.rotary_emb)(config)
    op = KRoPETorch(rotary, "cpu")
    assert op.attention_scaling[None] != 1.0
    positions = torch.arange(0, 400, 7)[None]
    x = torch.zeros(1)
    with torch.no_grad():
        _assert_same(op(x, positions), rotary(x, positions))


def test_rope_rejects_length_dependent_types():
    config = tiny_config("llama")
    config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with pytest.raises(ValueError, match="dynamic"):
        KRoPETorch(LlamaRotaryEmbedding(config), "cpu")


# -- attention -------------------------------------------------------------------------------------------


def bool_mask(q_len: int, kv_len: int, window: int | None) -> torch.Tensor:
    """Causal (and sliding-window: ``q - k < window``) mask as Transformers builds it, ``[1, 1, q, kv]``."""
    q = torch.arange(kv_len - q_len, kv_len)[:, None]
    k = torch.arange(kv_len)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= q - k < window
    return allowed[None, None]


def run_steps(attn_fn, rotary, config, hidden, layer_type, sliding: bool, prefill: int, use_mask: bool, layer: int = 0):
    """Prefill ``prefill`` tokens, a second prefill chunk of 3 (queries after cached keys), then decode the
    rest one at a time, through a fresh DynamicCache. Masks: causal ``[B, 1, q, kv]`` sized by the layer's
    cache; for a sliding layer, Transformers' own sliding-window mask function (its cache keeps only the
    window). ``use_mask=False`` gives no mask to the first prefill, as Transformers does when plain causal
    attention suffices."""
    from transformers.masking_utils import create_sliding_window_causal_mask

    assert not sliding or layer == 0, "Transformers sizes sliding masks by the first sliding layer's cache"
    cache = DynamicCache(config=config)
    outs = []
    steps = [(0, prefill), (prefill, prefill + 3)] + [(t, t + 1) for t in range(prefill + 3, hidden.shape[1])]
    for start, end in steps:
        positions = torch.arange(start, end)[None].expand(hidden.shape[0], -1)
        pe = rotary(hidden, positions, *((layer_type,) if layer_type else ()))
        chunk = hidden[:, start:end]
        mask = None
        if sliding and (use_mask or start > 0):
            mask = create_sliding_window_causal_mask(config, chunk, None, cache, positions, allow_is_causal_skip=False)
        elif use_mask or start > 0:
            mask = bool_mask(end - start, end, None).expand(hidden.shape[0], -1, -1, -1)
        outs.append(attn_fn(chunk, pe, mask, cache)[0])
    return torch.cat(outs, dim=1)


def attention_pair(model, layer: int, op_cls):
    attn = model.model.layers[layer].self_attn
    op = op_cls(attn, "cpu")
    kw = cache_kwarg(attn)

    def hf(h, pe, mask, cache):
        return attn(hidden_states=h, position_embeddings=pe, attention_mask=mask, **{kw: cache})

    def ours(h, pe, mask, cache):
        return op(h, position_embeddings=pe, attention_mask=mask, cache=cache)

    return attn, hf, ours


def gqa_cases():
    for family in GQA_FAMILIES:
        yield family, 0, True
    yield "llama", 1, False  # no mask for the first prefill: the op attends causally itself
    yield "gemma3", 2, True  # gemma3's full-attention layer (0 and 1 slide)


@pytest.mark.parametrize("family,layer,use_mask", list(gqa_cases()))
def test_sdpa_attention_prefill_and_decode_match_transformers(models, family, layer, use_mask):
    model = models(family)
    attn, hf, ours = attention_pair(model, layer, KAttentionSDPA)
    layer_type = model.config.layer_types[layer] if family == "gemma3" else None
    sliding = getattr(attn, "sliding_window", None) is not None
    if family == "gemma3":
        assert sliding == (layer_type == "sliding_attention")
    hidden = torch.randn(2, 18, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = run_steps(hf, model.model.rotary_emb, model.config, hidden, layer_type, sliding, 12, use_mask, layer)
        got = run_steps(ours, model.model.rotary_emb, model.config, hidden, layer_type, sliding, 12, use_mask, layer)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_sdpa_attention_sliding_window_matters(models):
    """The gemma3 sliding layer's output changes when the window is dropped: the test above saw it."""
    model = models("gemma3")
    _, hf, _ = attention_pair(model, 0, KAttentionSDPA)
    hidden = torch.randn(1, 12, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    pe = model.model.rotary_emb(hidden, torch.arange(12)[None], "sliding_attention")
    with torch.no_grad():
        windowed = hf(hidden, pe, bool_mask(12, 12, 8), None)[0]
        full = hf(hidden, pe, bool_mask(12, 12, None), None)[0]
    assert (windowed - full)[:, 8:].abs().max() > 1e-3


def test_sdpa_attention_softcapping_matches_eager(models):
    """Soft-capped logits (Gemma 2 style) take the explicit path; reference: the same math written out."""
    model = models("qwen3")
    attn = model.model.layers[0].self_attn
    op = KAttentionSDPA(attn, "cpu")
    op.softcap = 5.0
    hidden = torch.randn(1, 9, model.config.hidden_size)
    pe = model.model.rotary_emb(hidden, torch.arange(9)[None])
    with torch.no_grad():
        got = op(hidden, pe, None)[0]
        q = attn.q_norm(attn.q_proj(hidden).view(1, 9, -1, 64)).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(hidden).view(1, 9, -1, 64)).transpose(1, 2)
        v = attn.v_proj(hidden).view(1, 9, -1, 64).transpose(1, 2)
        cos, sin = pe
        from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        s = torch.tanh(q @ k.transpose(2, 3) * attn.scaling / 5.0) * 5.0
        s = s.masked_fill(~bool_mask(9, 9, None), float("-inf"))
        ref = attn.o_proj((s.softmax(-1) @ v).transpose(1, 2).reshape(1, 9, -1))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def mla_model(family: str, yarn_mscales: tuple[float, float] | None):
    if yarn_mscales is None:
        return tiny_model(family)
    from transformers import AutoModelForCausalLM

    config = tiny_config(family)
    config.rope_parameters = dict(YARN_ROPE, mscale=yarn_mscales[0], mscale_all_dim=yarn_mscales[1])
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(tiny_model(family).state_dict())
    return model.eval()


@pytest.mark.parametrize(
    "family,yarn", [("deepseek_v2", None), ("deepseek_v2", (0.707, 0.707)), ("deepseek_v3", None), ("deepseek_v3", (1.0, 0.8))]
)
@pytest.mark.parametrize("use_mask", [True, False])
def test_mla_absorbed_matches_transformers(family, yarn, use_mask):
    model = mla_model(family, yarn)
    if family == "deepseek_v3" and yarn is None:
        assert model.config.rope_parameters["rope_type"] == "yarn"  # the shipped tiny V3 is YaRN already
    attn, hf, ours = attention_pair(model, 1, KAttentionMLA)
    if model.config.rope_parameters.get("rope_type") == "yarn":
        assert attn.scaling != attn.qk_head_dim**-0.5  # the mscale really enters the scores
    hidden = torch.randn(2, 18, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = run_steps(hf, model.model.rotary_emb, model.config, hidden, None, False, 12, use_mask, 1)
        got = run_steps(ours, model.model.rotary_emb, model.config, hidden, None, False, 12, use_mask, 1)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_mla_cache_holds_only_latents(models):
    model = models("deepseek_v3")
    _, _, ours = attention_pair(model, 1, KAttentionMLA)
    cache = DynamicCache(config=model.config)
    hidden = torch.randn(1, 6, model.config.hidden_size)
    pe = model.model.rotary_emb(hidden, torch.arange(6)[None])
    with torch.no_grad():
        ours(hidden, pe, None, cache)
    layer = cache.layers[1]
    assert tuple(layer.keys.shape) == (1, 1, 6, model.config.kv_lora_rank)
    assert tuple(layer.values.shape) == (1, 1, 6, model.config.qk_rope_head_dim)


def test_mla_query_chunks_agree(models):
    model = models("deepseek_v2")
    attn = model.model.layers[1].self_attn
    whole, chunked = KAttentionMLA(attn, "cpu"), KAttentionMLA(attn, "cpu", query_chunk=4)
    hidden = torch.randn(1, 11, model.config.hidden_size)
    pe = model.model.rotary_emb(hidden, torch.arange(11)[None])
    with torch.no_grad():
        torch.testing.assert_close(chunked(hidden, pe, None)[0], whole(hidden, pe, None)[0], rtol=1e-6, atol=1e-6)


def test_sdpa_attention_without_enable_gqa(models, monkeypatch):
    """torch < 2.5 has no ``enable_gqa``: the op repeats the key/value heads instead, same result."""
    import ktcore.builtin.attention as attention

    monkeypatch.setattr(attention, "SDPA_HAS_GQA", False)
    model = models("mixtral")
    _, hf, ours = attention_pair(model, 0, KAttentionSDPA)
    hidden = torch.randn(1, 16, model.config.hidden_size, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = run_steps(hf, model.model.rotary_emb, model.config, hidden, None, False, 12, True)
        got = run_steps(ours, model.model.rotary_emb, model.config, hidden, None, False, 12, True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_mla_absorbs_a_plain_kv_b_proj_of_another_dtype(models):
    """kv_b_proj left a plain fp32 nn.Linear (no rule replaced it) while the op computes in bf16."""
    model = models("deepseek_v3")
    attn = model.model.layers[0].self_attn
    op = KAttentionMLA(attn, "cpu", dtype="bfloat16")
    op.post_load()
    w = attn.kv_b_proj.weight.detach().view(model.config.num_attention_heads, -1, model.config.kv_lora_rank)
    assert op.w_k.dtype == torch.bfloat16
    torch.testing.assert_close(op.w_k.float(), w[:, : model.config.qk_nope_head_dim].to(torch.bfloat16).float())
    torch.testing.assert_close(op.w_v.float(), w[:, model.config.qk_nope_head_dim :].to(torch.bfloat16).float())
