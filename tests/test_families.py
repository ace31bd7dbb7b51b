"""Every family: the tiny Transformers model against the same weights loaded through ktcore with the shipped
rule files, and the shipped rule files themselves.

Tolerances (logits of a 20-token prompt, ``scale = max |reference logit|``):
- fp32: ``max |injected - reference| <= 1e-4 * scale`` (measured: 0 for the GQA families, whose ops run the
  same kernels as Transformers; ~1e-6 * scale for DeepSeek, whose absorbed MLA reorders the products);
- bf16: ``max |diff| <= 3e-2 * scale`` and ``mean |diff| <= 3e-3 * scale`` (absorbed MLA and expert
  accumulation round differently in bf16; measured up to 1.5e-2 * scale on DeepSeek-V3), and, against the
  fp32 model, an error at most 1.5x (max) / 1.25x (mean) Transformers' own bf16 error (measured <= 1.1x).
Greedy decoding with a cache (HF ``generate`` on the injected model) must give the same tokens as the
plain model, with per-step logits within the fp32 tolerance.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ktcore.inject import RULE_FILES_DIR, build_meta_model, inject, load_model
from ktcore.modules import KAttention, KExperts, KLinear, KRoPE
from ktcore.registry import Registry
from ktcore.rules import load_rules
from ktcore.testing import FAMILIES, MODEL_TYPES, tiny_config, tiny_model
from ktcore.weights.state_dict import StateDictSource

torch.set_num_threads(2)

PROMPT_LEN = 20
FP32_REL_TOL = 1e-4
BF16_MAX_REL_TOL = 3e-2
BF16_MEAN_REL_TOL = 3e-3
BF16_VS_HF_MAX = 1.5  # our bf16 error (vs the fp32 model) at most this times Transformers' own bf16 error
BF16_VS_HF_MEAN = 1.25
MOE = ("qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3")
BUILTIN_OPS = {"KLinearTorch", "KExpertsTorch", "KAttentionSDPA", "KAttentionMLA", "KRoPETorch"}


@pytest.fixture(scope="module")
def registry():
    # only ktcore's own plugin: the shipped core rule files must run on it alone
    return Registry(entrypoints=False)


def prompt(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, tiny_config("llama").vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(seed))


def rule_file(family: str, layout: str = "cpu"):
    return RULE_FILES_DIR / f"{MODEL_TYPES[family]}-{layout}.yaml"


def load_injected(family: str, dtype: torch.dtype, registry):
    reference = tiny_model(family, seed=0, dtype=dtype)
    model, report = load_model(StateDictSource(reference), rules=rule_file(family), dtype=dtype,
                               registry=registry, progress=False)
    return reference, model, report


def assert_fully_injected(model: nn.Module, family: str) -> None:
    """Every linear, attention, experts and rotary module runs through a wrapper and a built-in op."""
    wrappers = [m for m in model.modules() if isinstance(m, (KLinear, KAttention, KExperts, KRoPE))]
    kinds = {type(m) for m in wrappers}
    assert {KLinear, KAttention, KRoPE} <= kinds
    assert (KExperts in kinds) == (family in MOE)
    for m in wrappers:
        assert {op.name for op in m.ops()} <= BUILTIN_OPS
    plain_linears = [
        name for name, m in model.named_modules()
        if type(m) is nn.Linear  # a wrapper's ops hold tensors, never an nn.Linear
    ]
    assert plain_linears == [], f"linears left unreplaced: {plain_linears}"
    n_layers = model.config.num_hidden_layers
    assert sum(isinstance(m, KAttention) for m in wrappers) == n_layers


# -- the tiny models themselves ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_is_informative_and_quantizable(family):
    model = tiny_model(family)
    assert model.config.model_type == MODEL_TYPES[family]
    assert 2 <= model.config.num_hidden_layers <= 3
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            assert m.in_features % 256 == 0, name
    for name, p in model.named_parameters():
        if name.endswith(("gate_up_proj", "down_proj")) and p.dim() == 3:
            assert p.shape[-1] % 256 == 0, name
    with torch.no_grad():
        logits = model(prompt()).logits[0]
    assert logits.std() > 0.5, "logits nearly constant: weights too small"
    assert logits.argmax(-1).unique().numel() >= PROMPT_LEN // 2, "every position predicts the same token"
    if family in MOE:
        assert model.config.num_experts_per_tok == 2


def test_tiny_model_is_seeded():
    a, b, c = tiny_model("mixtral", seed=0), tiny_model("mixtral", seed=0), tiny_model("mixtral", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["lm_head.weight"], sc["lm_head.weight"])


def test_tiny_deepseek_configs_cover_mla_variants():
    v2, v3 = tiny_config("deepseek_v2"), tiny_config("deepseek_v3")
    assert v2.q_lora_rank is None and v3.q_lora_rank == 256
    assert v2.kv_lora_rank == v3.kv_lora_rank == 256
    assert v3.rope_parameters["rope_type"] == "yarn" and v3.n_group > 1 and v3.topk_group > 1
    for cfg in (v2, v3):
        assert cfg.first_k_dense_replace == 1 and cfg.n_shared_experts >= 1


# -- injected vs plain ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_family_fp32_logits_and_greedy_decode_match(family, registry):
    reference, model, report = load_injected(family, torch.float32, registry)
    assert report.rule_files == [str(rule_file(family))]
    assert_fully_injected(model, family)
    ids = prompt()
    with torch.no_grad():
        expected = reference(ids).logits
        got = model(ids).logits
    scale = expected.abs().max()
    diff = (got - expected).abs().max()
    assert diff <= FP32_REL_TOL * scale, f"{family}: max |diff| {diff:.3g} > {FP32_REL_TOL} * {scale:.3g}"

    gen = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    with torch.no_grad():
        ref_out = reference.generate(ids, **gen)
        our_out = model.generate(ids, **gen)
    assert torch.equal(our_out.sequences, ref_out.sequences)
    for step, (g, e) in enumerate(zip(our_out.logits, ref_out.logits)):
        assert (g - e).abs().max() <= FP32_REL_TOL * e.abs().max(), f"{family}: decode step {step}"


@pytest.mark.parametrize("family", FAMILIES)
def test_family_static_cache_greedy_decode_matches(family, registry):
    """With Transformers' static cache the prefill gets no mask and more key slots than queries (the
    empty rest of the buffer): the ops must attend to the filled slots only, as Transformers does."""
    reference, model, _ = load_injected(family, torch.float32, registry)
    ids = prompt(2)
    gen = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    with torch.no_grad():
        ref_out = reference.generate(ids, **gen)
        our_out = model.generate(ids, cache_implementation="static", **gen)
    assert torch.equal(our_out.sequences, ref_out.sequences)
    for step, (g, e) in enumerate(zip(our_out.logits, ref_out.logits)):
        assert (g - e).abs().max() <= FP32_REL_TOL * e.abs().max(), f"{family}: decode step {step}"


@pytest.mark.parametrize("family", FAMILIES)
def test_family_chunked_prefill_with_ktcore_cache_matches(family, registry):
    """ktcore's generator cache (preallocated, prefix views), prefill in chunks of 10 (longer than gemma3's
    window of 8), then single tokens: the logits of every position equal one full forward of the plain model."""
    from ktcore.generate import forward_step, new_cache

    reference, model, _ = load_injected(family, torch.float32, registry)
    ids = torch.randint(3, 512, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(ids).logits
    cache = new_cache(model, 64)
    spans = [(0, 10), (10, 20)] + [(t, t + 1) for t in range(20, 24)]
    got = torch.cat([forward_step(model, ids[:, a:b], cache, logits_to_keep=0) for a, b in spans], dim=1)
    assert (got - expected).abs().max() <= FP32_REL_TOL * expected.abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_family_bf16_logits_match(family, registry):
    """In bf16 the injected model is as accurate as plain Transformers in bf16: both measured against the
    fp32 model with the same weights."""
    reference, model, _ = load_injected(family, torch.bfloat16, registry)
    truth = tiny_model(family, seed=0, dtype=torch.float32)
    ids = prompt(1)
    with torch.no_grad():
        exact = truth(ids).logits
        expected = reference(ids).logits.float()
        got = model(ids).logits.float()
    scale = exact.abs().max()
    hf_error, our_error = (expected - exact).abs(), (got - exact).abs()
    assert our_error.max() <= BF16_VS_HF_MAX * hf_error.max(), f"{family}: {our_error.max():.3g} vs HF's {hf_error.max():.3g}"
    assert our_error.mean() <= BF16_VS_HF_MEAN * hf_error.mean(), f"{family}: {our_error.mean():.3g} vs HF's {hf_error.mean():.3g}"
    diff = (got - expected).abs()
    assert diff.max() <= BF16_MAX_REL_TOL * scale, f"{family}: max |diff| {diff.max():.3g} vs scale {scale:.3g}"
    assert diff.mean() <= BF16_MEAN_REL_TOL * scale, f"{family}: mean |diff| {diff.mean():.3g} vs scale {scale:.3g}"


# -- the shipped rule files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["cpu", "gpu-cpu"])
@pytest.mark.parametrize("family", FAMILIES)
def test_shipped_rule_file_validates_and_matches(family, layout, registry):
    """Each shipped file loads, names only built-in ops, and every rule matches a module of the family
    (inject raises on a rule that matches nothing); checked without the devices for gpu-cpu."""
    path = rule_file(family, layout)
    rules = load_rules(path, registry, check_devices=(layout == "cpu"))
    # the files name role ops; on the built-in plugin alone each resolves to its torch backend
    assert {op.name for r in rules for op in (r.options.get("prefill_op"), r.options.get("generate_op")) if op} <= BUILTIN_OPS
    model = build_meta_model(tiny_config(family))
    report = inject(model, rules, registry)
    by_module = {row.module: row for row in report.rows}
    n = model.config.num_hidden_layers
    for i in range(n):
        attn = by_module[f"model.layers.{i}.self_attn"]
        assert attn.prefill_op == ("KAttentionMLA" if family.startswith("deepseek") else "KAttentionSDPA")
    experts = [m for name, m in model.named_modules() if name.endswith("mlp.experts")]
    assert bool(experts) == (family in MOE)
    for m in experts:
        assert isinstance(m, KExperts)
        assert m.prefill_device.type == "cpu" and m.generate_device.type == "cpu"
        if layout == "gpu-cpu":
            assert m.out_device == torch.device("cuda")
    if layout == "gpu-cpu":
        assert model.lm_head.prefill_device.type == "cuda"
        assert model.model.layers[0].self_attn.prefill_device.type == "cuda"
        placements = model._ktcore_placements
        assert placements["model.embed_tokens"].type == "cuda"
        if experts:
            assert placements[f"model.layers.{n - 1}.mlp.experts"].type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the gpu-cpu layout puts attention on the GPU")
@pytest.mark.parametrize("family", FAMILIES)
def test_family_gpu_cpu_layout_matches(family, registry):
    """Attention, linears and rotary on the GPU, routed experts on the CPU: same logits (fp32 tolerance;
    measured <= 1.3e-6 * scale on an H200 against the CPU model) and the same greedy tokens."""
    reference = tiny_model(family, seed=0)
    model, _ = load_model(StateDictSource(reference), rules=rule_file(family, "gpu-cpu"), dtype=torch.float32,
                          registry=registry, progress=False)
    for name, m in model.named_modules():
        if isinstance(m, KExperts):
            assert all(op.device.type == "cpu" for op in m.ops()), name
    assert model.lm_head.prefill_op.weight.is_cuda
    ids = prompt()
    with torch.no_grad():
        expected = reference(ids).logits
        got = model(ids.cuda()).logits.cpu()
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= FP32_REL_TOL * scale
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(ids.cuda(), **gen).cpu(), reference.generate(ids, **gen))
