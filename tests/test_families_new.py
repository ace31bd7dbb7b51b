"""The families added for the models people run today (``NEW_FAMILIES``): as ``test_families.py`` does for the
first eight (the tiny Transformers model against the same weights through ktcore's shipped rule files, fp32,
greedy tokens identical), plus the GGUF round trip through ktcore's writer: the file holds every tensor
exactly, its metadata gives back the config, and the model loaded from it equals Transformers.

Tolerance: fp32 logits within ``1e-4 * max |reference logit|`` (the GQA families run the same kernels as
Transformers; measured 0 or within a few ulps)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ktcore.inject import RULE_FILES_DIR, build_meta_model, inject, load_model
from ktcore.modules import KAttention, KExperts, KLinear, KRoPE
from ktcore.registry import Registry
from ktcore.rules import load_rules
from ktcore.testing import MODEL_TYPES, NEW_FAMILIES, tiny_config, tiny_model
from ktcore.weights import open_source
from ktcore.weights.gguf_writer import write_gguf
from ktcore.weights.state_dict import StateDictSource

torch.set_num_threads(2)

FP32_REL_TOL = 1e-4
MOE = {"glm4_moe", "minimax_m2", "gpt_oss", "kimi_k2", "deepseek_v32", "qwen3_next", "llama4"}
# attention left to Transformers' own modules (linear attention with its recurrent state; gated full attention)
TRANSFORMERS_ATTENTION = {"qwen3_next", "llama4"}
# gguf-py (llama.cpp's tensor and key names) has no DeepSeek-V3.2 architecture (its indexer tensors)
GGUF_FAMILIES = tuple(f for f in NEW_FAMILIES if f != "deepseek_v32")
BUILTIN_OPS = {"KLinearTorch", "KExpertsTorch", "KExpertsGptOssTorch", "KAttentionSDPA", "KAttentionMLA", "KRoPETorch"}
# every shipped (family, layout): MoE families also have the all-accelerator layout "gpu"
LAYOUTS = [(f, layout) for f in NEW_FAMILIES for layout in ("cpu", "gpu-cpu", "gpu") if layout != "gpu" or f in MOE]
GEN = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0)


@pytest.fixture(scope="module")
def registry():
    return Registry(entrypoints=False)


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("families_new")


def rule_file(family: str, layout: str = "cpu"):
    return RULE_FILES_DIR / f"{MODEL_TYPES[family]}-{layout}.yaml"


def prompt(seed: int = 0, length: int = 20) -> torch.Tensor:
    return torch.randint(3, 512, (1, length), generator=torch.Generator().manual_seed(seed))


def assert_same_greedy(model, reference, ids, **kwargs):
    with torch.no_grad():
        want = reference.generate(ids, **GEN)
        got = model.generate(ids, **GEN, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    for step, (g, e) in enumerate(zip(got.logits, want.logits)):
        assert (g - e).abs().max() <= FP32_REL_TOL * e.abs().max(), f"decode step {step}"


def assert_same_logits(model, reference, ids):
    with torch.no_grad():
        want, got = reference(ids).logits, model(ids).logits
    assert (got - want).abs().max() <= FP32_REL_TOL * want.abs().max()


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_tiny_model_is_informative(family):
    model = tiny_model(family)
    assert model.config.model_type == MODEL_TYPES[family]
    for name, m in model.named_modules():
        # kimi_k2's 384 experts (and its shared expert) are 32 wide to stay small: F32 and 32-blocks only
        if isinstance(m, nn.Linear) and m.out_features > 1 and family != "kimi_k2":
            assert m.in_features % 256 == 0, name
    with torch.no_grad():
        logits = model(prompt()).logits[0]
    assert logits.std() > 0.5 and logits.argmax(-1).unique().numel() >= 10


def _transformers_runs(family: str) -> None:
    # Llama 4's text model fails inside Transformers 5.17 itself (its masking passes block_sequence_ids to
    # create_chunked_causal_mask, which does not take it; seen on the H200 host); 5.24 runs it
    import transformers
    from packaging.version import Version

    if family == "llama4" and Version(transformers.__version__) < Version("5.24"):
        pytest.skip(f"Transformers {transformers.__version__} cannot run Llama 4's text model (needs >= 5.24)")


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_family_fp32_logits_and_greedy_decode_match(family, registry):
    _transformers_runs(family)
    reference = tiny_model(family)
    model, report = load_model(StateDictSource(reference), rules=rule_file(family), dtype=torch.float32,
                               registry=registry, progress=False)
    wrappers = [m for m in model.modules() if isinstance(m, (KLinear, KAttention, KExperts, KRoPE))]
    n_attention = 0 if family in TRANSFORMERS_ATTENTION else model.config.num_hidden_layers
    assert sum(isinstance(m, KAttention) for m in wrappers) == n_attention
    assert any(isinstance(m, KExperts) for m in wrappers) == (family in MOE)
    assert all({op.name for op in m.ops()} <= BUILTIN_OPS for m in wrappers)
    assert [n for n, m in model.named_modules() if type(m) is nn.Linear and m.out_features > 1] == []
    ids = prompt()
    assert_same_logits(model, reference, ids)
    assert_same_greedy(model, reference, ids)
    assert_same_greedy(model, reference, prompt(2), cache_implementation="static")


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_family_chunked_prefill_with_ktcore_cache(family, registry):
    """ktcore's generator cache, prefill in chunks, then single tokens (the first families' test, as is)."""
    import test_families

    test_families.test_family_chunked_prefill_with_ktcore_cache_matches(family, registry)


@pytest.mark.parametrize("family,layout", LAYOUTS)
def test_shipped_rule_file_validates_and_matches(family, layout, registry):
    rules = load_rules(rule_file(family, layout), registry, check_devices=(layout == "cpu"))
    # the files name role ops; on the built-in plugin alone each resolves to its torch backend
    assert {op.name for r in rules for op in (r.options.get("prefill_op"), r.options.get("generate_op")) if op} <= BUILTIN_OPS
    model = build_meta_model(tiny_config(family))
    inject(model, rules, registry)  # raises on a rule that matches nothing
    experts = [m for name, m in model.named_modules() if name.endswith(".experts")]
    assert bool(experts) == (family in MOE)
    for m in experts:
        assert isinstance(m, KExperts) and m.generate_device.type == ("cuda" if layout == "gpu" else "cpu")
        assert (m.out_device == torch.device("cuda")) == (layout == "gpu-cpu")
    if layout != "cpu":
        assert model.lm_head.prefill_device.type == "cuda"
        assert model._ktcore_placements["model.embed_tokens"].type == "cuda"


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_gguf_roundtrip_and_loaded_model_equal_transformers(family, gguf_dir, registry):
    reference = tiny_model(family)
    path = write_gguf(reference, gguf_dir / f"{family}.gguf")
    source = open_source(path)
    assert source.missing() == []
    for name, expected in reference.state_dict().items():
        got = source.get(name).dequantize()
        if name.endswith("A_log") or (family == "qwen3_next" and name.endswith("norm.weight") and "linear_attn" not in name):
            # stored as -exp(A_log) and as 1 + w (llama.cpp's forms): back within float32 rounding
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1.2e-7)
        else:
            assert torch.equal(got, expected), name
    got_cfg, want_cfg = source.config().to_dict(), reference.config.to_dict()
    ignore = {"_name_or_path", "transformers_version", "dtype", "architectures", "model_type"}
    assert {k: (want_cfg.get(k), got_cfg.get(k)) for k in set(want_cfg) & set(got_cfg)
            if k not in ignore and want_cfg[k] != got_cfg[k]} == {}
    model, _ = load_model(path, rules=rule_file(family), dtype=torch.float32, registry=registry, progress=False)
    ids = prompt(4)
    assert_same_logits(model, reference, ids)
    assert_same_greedy(model, reference, ids)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the gpu-cpu layout puts attention on the GPU")
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_family_gpu_cpu_layout_matches(family, registry):
    reference = tiny_model(family)
    model, _ = load_model(StateDictSource(reference), rules=rule_file(family, "gpu-cpu"), dtype=torch.float32,
                          registry=registry, progress=False)
    ids = prompt()
    with torch.no_grad():
        expected = reference(ids).logits
        got = model(ids.cuda()).logits.cpu()
        assert (got - expected).abs().max() <= FP32_REL_TOL * expected.abs().max()
        gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids.cuda(), **gen).cpu(), reference.generate(ids, **gen))


@pytest.mark.parametrize("family", [f for f in GGUF_FAMILIES if f in MOE])
def test_config_from_plain_metadata_without_ktcore_extras(family, gguf_dir):
    """The keys llama.cpp writes alone (no ktcore extras) give the dimensions, routing and rotary fraction."""
    from ktcore.weights.gguf_config import EXTRAS_KEY, config_from_metadata

    reference = tiny_model(family)
    source = open_source(write_gguf(reference, gguf_dir / f"{family}-plain.gguf"))
    meta = {k: v for k, v in source.metadata.items() if k != EXTRAS_KEY}
    got, want = config_from_metadata(meta, source.gguf_names(), source.path), reference.config
    assert got.model_type == want.model_type
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "num_experts_per_tok", "n_routed_experts", "num_local_experts", "n_shared_experts",
                "first_k_dense_replace", "routed_scaling_factor", "norm_topk_prob", "attention_bias", "use_qk_norm"):
        if hasattr(want, key):
            assert getattr(got, key) == getattr(want, key), key
    assert got.rope_parameters.get("partial_rotary_factor") == want.rope_parameters.get("partial_rotary_factor")


def test_gpt_oss_mxfp4_experts_stay_quantized_and_match(gguf_dir, registry):
    """GPT-OSS as its GGUFs ship: MXFP4 routed experts (gguf-py's quantizer), Q8_0 elsewhere. The experts op
    reads them as stored (MXFP4, llama.cpp's [E, out, in]); the model equals Transformers on the weights
    gguf-py dequantizes from the same file."""
    from ktcore.weights.gguf_writer import write_dequantized_copy

    path = write_gguf(tiny_model("gpt_oss"), gguf_dir / "gpt_oss-mxfp4.gguf", qtypes={r"_exps\.weight": "MXFP4", "default": "Q8_0"})
    source = open_source(path)
    gate = source.get("model.layers.1.mlp.experts.gate_proj")
    assert gate.ggml_type == "MXFP4" and gate.shape == (8, 256, 256)
    assert source.gguf_tensor("blk.1.ffn_down_exps.weight").ggml_type == "MXFP4"
    assert source.gguf_tensor("blk.1.ffn_down_exps.bias").ggml_type == "F32"
    reference = tiny_model("gpt_oss")
    plain = open_source(write_dequantized_copy(path, gguf_dir / "gpt_oss-mxfp4-f32.gguf"))
    reference.load_state_dict({n: plain.get(n).dequantize() for n in reference.state_dict()})
    model, _ = load_model(path, rules=rule_file("gpt_oss"), dtype=torch.float32, registry=registry, progress=False)
    ids = prompt(5)
    assert_same_logits(model, reference, ids)
    assert_same_greedy(model, reference, ids)


def _kimi_gguf(path):
    """The tiny Kimi-K2 as llama.cpp writes it: deepseek2 arch, 384 experts, ``tokenizer.ggml.pre = kimi-k2``, its
    BPE as tokens + merges (the writer's byte-level vocabulary)."""
    import gguf

    written = gguf.GGUFReader(write_gguf(tiny_model("kimi_k2"), str(path) + ".written"))
    w = gguf.GGUFWriter(str(path), "deepseek2")
    for key, field in written.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "tokenizer.ggml.pre"):
            continue
        kind = field.types[0]
        w.add_key_value(key, field.contents(), kind, sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    w.add_tokenizer_pre("kimi-k2")
    for t in written.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


KIMI_TEXT = ("Kimi说：我们在2025年发布了K2模型，price 1234567 USD! 中文English混合 I'll  don't\n\n"
             "  カタカナとひらがな 한국어 テスト123 数字9876543210")


def test_kimi_k2_tokenizer_from_gguf_metadata_splits_as_kimi(gguf_dir, tmp_path, monkeypatch):
    """The tokenizer of a ``kimi-k2`` file splits text with Kimi's own pattern (tokenization_kimi.py, as the
    ``regex`` module runs it: Han runs apart, digits in threes), not GPT-2's; every token lies inside one piece,
    mixed CJK / English / digits text round-trips, and the tokenizer cache gives the same tokenizer back."""
    import regex
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from ktcore.weights.gguf_tokenizer import PRE_TOKENIZER_PATTERNS

    monkeypatch.setenv("KTCORE_CACHE", str(tmp_path))
    path = _kimi_gguf(gguf_dir / "kimi.gguf")
    tok = open_source(path).tokenizer()
    pieces = regex.findall(PRE_TOKENIZER_PATTERNS["kimi-k2"], KIMI_TEXT, flags=regex.V1)
    assert pieces[:8] == ["Kimi", "说", "：", "我们在", "202", "5", "年发布了", "K"]  # the facts, spelled out
    byte_char = bytes_to_unicode()
    as_bytes = ["".join(byte_char[b] for b in p.encode()) for p in pieces]
    assert [p for p, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(KIMI_TEXT)] == as_bytes
    tokens = tok.tokenize(KIMI_TEXT)
    assert len(tokens) < len(KIMI_TEXT.encode())  # merges applied
    joined, at = "".join(tokens), 0
    bounds = {at := at + len(p) for p in as_bytes}
    ends, at = set(), 0
    for t in tokens:
        at += len(t)
        ends.add(at)
    assert bounds <= ends and joined == "".join(as_bytes)  # no token crosses a piece boundary
    ids = tok(KIMI_TEXT)["input_ids"]
    assert tok.decode(ids) == KIMI_TEXT
    assert any((tmp_path / "tokenizers").iterdir())
    again = open_source(path).tokenizer()  # from the cache
    assert again(KIMI_TEXT)["input_ids"] == ids
    gpt2 = open_source(write_gguf(tiny_model("kimi_k2"), gguf_dir / "kimi-gpt2.gguf")).tokenizer()
    gpt2_pieces = [p for p, _ in gpt2.backend_tokenizer.pre_tokenizer.pre_tokenize_str(KIMI_TEXT)]
    assert "".join(gpt2_pieces) == "".join(as_bytes) and gpt2_pieces != as_bytes  # GPT-2's split is another


def test_kimi_k2_gguf_loads_and_equals_transformers(gguf_dir, registry):
    """The same file's config (deepseek_v3 at 384 routed experts, 8 active) comes from the metadata alone, and the
    model it loads equals Transformers."""
    path = gguf_dir / "kimi-model.gguf"
    if not path.exists():
        _kimi_gguf(path)
    source = open_source(path)
    config = source.config()
    assert config.model_type == "deepseek_v3" and config.n_routed_experts == 384 and config.num_experts_per_tok == 8
    model, _ = load_model(path, rules=rule_file("kimi_k2"), dtype=torch.float32, registry=registry, progress=False)
    reference = tiny_model("kimi_k2")
    ids = prompt(10)
    assert_same_logits(model, reference, ids)
    assert_same_greedy(model, reference, ids)


@pytest.mark.parametrize("family,experts_type", [("glm4_moe", "IQ2_XXS"), ("gpt_oss", "MXFP4"), ("kimi_k2", "TQ2_0"), ("llama4", "IQ1_M"),
                                                 ("qwen3_next", "IQ3_S")])
def test_synthetic_family_gguf_loads_and_runs(family, experts_type, gguf_dir, registry):
    """The streamed random-weights writer (what ``gguf_writer --family`` writes at real widths for the GPU
    benches) makes files the loader takes: here at the tiny widths, through the cpu rule file."""
    from ktcore.testing import real_width_config
    from ktcore.weights.gguf_writer import write_synthetic_family_gguf

    assert real_width_config(family, layers=3).num_hidden_layers == 3
    path = write_synthetic_family_gguf(gguf_dir / f"{family}-synthetic.gguf", tiny_config(family),
                                       {r"_exps\.": experts_type, "default": "Q8_0"})
    source = open_source(path)
    assert source.missing() == []
    assert source.gguf_tensor("blk.1.ffn_up_exps.weight").ggml_type == experts_type
    model, _ = load_model(path, rules=rule_file(family), dtype=torch.float32, registry=registry, progress=False)
    with torch.no_grad():
        assert torch.isfinite(model(prompt(7)).logits).all()


@pytest.mark.parametrize("family,layout", [(f, layout) for f, layout in LAYOUTS if layout != "cpu"])
def test_gpu_rule_file_logic_on_the_cpu(family, layout, registry):
    """The gpu-cpu and gpu rule files with their device ``gpu`` read as ``cpu``: what they build (KMoE blocks,
    experts wrappers handing their output over, placements) computes what Transformers computes, on a machine
    without a GPU."""
    rules = load_rules(rule_file(family, layout), registry, gpu="cpu")
    reference = tiny_model(family)
    model, _ = load_model(StateDictSource(reference), rules=rules, dtype=torch.float32, registry=registry, progress=False)
    ids = prompt(8)
    assert_same_logits(model, reference, ids)
    assert_same_greedy(model, reference, ids)


def _llamacpp_constants(family: str):
    """The tiny model, with the values llama.cpp fixes where the tiny config differs: Llama 4's 8192-token
    chunks and temperature floor (llama.cpp hard-codes them), and YaRN's integer correction range (llama.cpp
    always truncates; GPT-OSS's config says truncate=False, which only Transformers and ktcore follow)."""
    from transformers import AutoModelForCausalLM

    model = tiny_model(family)
    config = tiny_config(family)
    if family == "llama4":
        config.attention_chunk_size, config.floor_scale = 8192, 8192
    elif family == "gpt_oss":
        config.rope_parameters = dict(config.rope_parameters, truncate=True)
    else:
        return model
    adjusted = AutoModelForCausalLM.from_config(config)
    adjusted.load_state_dict(model.state_dict())
    return adjusted.eval()


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_llamacpp_computes_the_written_file_as_transformers(family, gguf_dir):
    """llama.cpp (llama-cpp-python) reads each file ktcore's writer makes as the model it is: its logits equal
    Transformers' within its activation rounding (measured 1.8e-4 to 4.2e-4 of the largest logit)."""
    import numpy as np

    llama_cpp = pytest.importorskip("llama_cpp")
    model = _llamacpp_constants(family)
    path = write_gguf(model, gguf_dir / f"{family}-llamacpp.gguf")
    ids = prompt(9, 12)
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids[0].tolist())
    got = torch.from_numpy(np.array(llm.scores[: ids.shape[1]], dtype=np.float32))
    with torch.no_grad():
        want = model(ids).logits[0]
    assert (got - want).abs().max() <= 2e-3 * want.abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))
