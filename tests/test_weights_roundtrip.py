"""Tiny model of every family -> GGUF (ktcore's writer) -> GGUFSource -> the same tensors and config."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from ktcore.testing import FAMILIES, tiny_model
from ktcore.weights import open_source
from ktcore.weights.gguf_source import GGUFSource
from ktcore.weights.gguf_writer import write_gguf
from ktcore.weights.quantize import quantize

torch.set_num_threads(2)

_MODELS: dict[str, torch.nn.Module] = {}


def model_of(family):
    if family not in _MODELS:
        _MODELS[family] = tiny_model(family, seed=0)
    return _MODELS[family]


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("roundtrip")


def written(gguf_dir, family, qtype):
    path = gguf_dir / f"{family}-{qtype}.gguf"
    if not path.exists():
        write_gguf(model_of(family), path, qtypes=qtype)
    return path


def is_gemma_norm(family, name):
    return family == "gemma3" and "norm" in name


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_roundtrip_is_exact(gguf_dir, family):
    model = model_of(family)
    source = open_source(written(gguf_dir, family, "F32"))
    assert isinstance(source, GGUFSource)
    assert source.missing() == []
    names = set(source.names())
    for name, expected in model.state_dict().items():
        assert name in names, name
        got = source.get(name).dequantize()
        assert got.shape == expected.shape, name
        if is_gemma_norm(family, name):
            # llama.cpp stores Gemma norm gains as 1 + w; (1 + w) - 1 is exact only to float32 rounding of 1 + w
            torch.testing.assert_close(got, expected, rtol=0, atol=1.2e-7)
        else:
            assert torch.equal(got, expected), name


@pytest.mark.parametrize("family", FAMILIES)
def test_config_from_metadata_matches_the_model_config(gguf_dir, family):
    expected = model_of(family).config.to_dict()
    got = open_source(written(gguf_dir, family, "F32")).config().to_dict()
    ignore = {"_name_or_path", "transformers_version", "dtype", "architectures"}
    diff = {k: (expected.get(k), got.get(k)) for k in set(expected) | set(got) if k not in ignore and expected.get(k) != got.get(k)}
    assert diff == {}


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "deepseek_v3", "gemma3"])
def test_config_from_plain_metadata_without_ktcore_extras(gguf_dir, family):
    """The keys llama.cpp writes alone give the dimensions (what a real GGUF from elsewhere carries)."""
    from ktcore.weights.gguf_config import EXTRAS_KEY, config_from_metadata

    source = open_source(written(gguf_dir, family, "F32"))
    meta = {k: v for k, v in source.metadata.items() if k != EXTRAS_KEY}
    config = config_from_metadata(meta, source.gguf_names(), source.path)
    expected = model_of(family).config
    assert config.model_type == expected.model_type
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                "vocab_size", "max_position_embeddings", "tie_word_embeddings", "num_experts", "num_experts_per_tok",
                "moe_intermediate_size", "n_routed_experts", "n_shared_experts", "kv_lora_rank", "q_lora_rank",
                "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "first_k_dense_replace", "routed_scaling_factor",
                "sliding_window", "head_dim"):
        if hasattr(expected, key):
            assert getattr(config, key) == getattr(expected, key), key
    assert config.rms_norm_eps == pytest.approx(expected.rms_norm_eps)


def _tolerance(qtype, expected):
    span = (expected.max() - expected.min()).item()
    return {"F16": 1e-3 * expected.abs().max().item(), "Q8_0": span / 127, "Q4_K": span / 12}[qtype]


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_K"])
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_roundtrip_within_tolerance(gguf_dir, family, qtype):
    model = model_of(family)
    source = open_source(written(gguf_dir, family, qtype))
    quantized = 0
    for name, expected in model.state_dict().items():
        qt = source.get(name)
        got = qt.dequantize()
        assert got.shape == expected.shape, name
        if qt.ggml_type == "F32":
            # routers (mlp.gate, shared_expert_gate) stay F32 as llama.cpp keeps them
            assert expected.dim() == 1 or name.endswith("gate.weight"), (name, "should be quantized")
            continue
        quantized += 1
        assert qt.ggml_type == qtype, name
        err = (got - expected).abs().max().item()
        assert err <= _tolerance(qtype, expected), (name, err)
    assert quantized > 0


def test_q8_0_bytes_equal_gguf_quantize_and_dequantize(gguf_dir):
    """The writer's bytes are gguf-py's quantization and the source reads them back bit-exactly."""
    model = model_of("qwen3")
    source = open_source(written(gguf_dir, "qwen3", "Q8_0"))
    w = model.state_dict()["model.layers.1.mlp.down_proj.weight"].numpy()
    qt = source.get("model.layers.1.mlp.down_proj.weight")
    assert np.array_equal(qt.data.numpy(), quantize(w, "Q8_0").reshape(-1))
    ref = gguf_dequantize(quantize(w, "Q8_0"), GGMLQuantizationType.Q8_0)
    assert np.array_equal(qt.dequantize().numpy(), ref)


def test_llama_qk_permutation_stays_quantized(gguf_dir):
    """q/k of llama-arch files are row-permuted on load as whole rows of blocks: type stays Q8_0 and the
    values equal the dequantized unpermuted original."""
    model = model_of("llama")
    source = open_source(written(gguf_dir, "llama", "Q8_0"))
    for proj in ("q_proj", "k_proj"):
        name = f"model.layers.0.self_attn.{proj}.weight"
        qt = source.get(name)
        assert qt.ggml_type == "Q8_0"
        w = model.state_dict()[name].numpy()
        ref = gguf_dequantize(quantize(w, "Q8_0"), GGMLQuantizationType.Q8_0)
        assert np.array_equal(qt.dequantize().numpy(), ref)
    # the stored tensor really is permuted (else this test would pass without the inverse permutation)
    stored = source.gguf_tensor("blk.0.attn_q.weight").dequantize()
    assert not torch.equal(stored, source.get("model.layers.0.self_attn.q_proj.weight").dequantize())


def test_split_experts_are_offered_quantized(gguf_dir):
    source = open_source(written(gguf_dir, "qwen3_moe", "Q4_K"))
    prefix = "model.layers.0.mlp.experts"
    gate, up, down = (source.get(f"{prefix}.{p}") for p in ("gate_proj", "up_proj", "down_proj"))
    assert {gate.ggml_type, up.ggml_type, down.ggml_type} == {"Q4_K"}
    assert gate.shape == (8, 256, 256) and down.shape == (8, 256, 256)
    fused = source.get(f"{prefix}.gate_up_proj")
    assert fused.ggml_type == "Q4_K" and fused.shape == (8, 512, 256)
    assert torch.equal(fused.dequantize(), torch.cat([gate.dequantize(), up.dequantize()], dim=1))
    # gate_proj is a view on the mapped file, not a copy
    assert np.shares_memory(gate.data.numpy(), source._readers[0].data)


@pytest.mark.parametrize("family", FAMILIES)
def test_loaded_model_logits_equal_transformers(gguf_dir, family):
    """Through the core's torch ops (its own ``<model_type>-cpu.yaml``), which compute in fp32 on
    dequantized weights: what differs from Transformers can only be the weights or the config."""
    import importlib.resources

    inject = pytest.importorskip("ktcore.inject")
    model = model_of(family)
    rules = importlib.resources.files("ktcore") / "rule_files" / f"{model.config.model_type}-cpu.yaml"
    if not rules.is_file():
        pytest.skip(f"the core ships no {rules.name} yet")
    from ktcore.registry import Registry

    loaded, _ = inject.load_model(  # ktcore's own backends only (kt-cpu-amx would back KLinearCPU/KExpertsCPU)
        str(written(gguf_dir, family, "F32")), rules=str(rules), device="cpu", dtype=torch.float32, progress=False,
        registry=Registry(entrypoints=False),
    )
    ids = torch.tensor([[1, 5, 9, 100, 42, 7, 300, 12, 77, 3, 250, 18]])
    with torch.no_grad():
        want = model(ids).logits
        got = loaded(ids).logits
    atol = 1e-4 if family != "gemma3" else 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=atol)
