"""The low-bit GGML types (i-quants, ternary, MXFP4): bit-exact against gguf-py on edge cases, written by
ktcore's writer, and a GGUF mixing them across tensors (as Unsloth's dynamic quants do) through a model
forward against plain Transformers on the file's gguf-py-dequantized weights."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from ktcore.inject import RULE_FILES_DIR, load_model
from ktcore.registry import Registry
from ktcore.testing import tiny_model
from ktcore.weights import open_source
from ktcore.weights.dequant import dequantize_raw
from ktcore.weights.dequant_lowbit import LOWBIT_DEQUANTIZERS, random_lowbit_blocks
from ktcore.weights.gguf_writer import encode, write_dequantized_copy, write_gguf
from ktcore.weights.quants import GGML_TYPES

torch.set_num_threads(2)

# Unsloth-style mix: routed experts at 1-3 bits, attention higher, every new type on some tensor
MIXED = {
    r"blk\.0\.ffn_gate_exps": "IQ1_S", r"blk\.1\.ffn_gate_exps": "IQ1_M",
    r"blk\.0\.ffn_up_exps": "IQ2_XXS", r"blk\.1\.ffn_up_exps": "IQ2_XS",
    r"blk\.0\.ffn_down_exps": "IQ3_XXS", r"blk\.1\.ffn_down_exps": "IQ2_S",
    r"blk\.0\.attn_q\.": "IQ3_S", r"blk\.1\.attn_q\.": "IQ4_NL", r"attn_k\.": "TQ1_0", r"blk\.0\.attn_v\.": "TQ2_0",
    r"attn_output": "MXFP4", r"token_embd": "Q4_K", r"output\.weight": "Q6_K", "default": "IQ4_XS",
}


def bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def ours(raw: np.ndarray, type_name: str) -> np.ndarray:
    n = raw.size // GGML_TYPES[type_name].type_size * GGML_TYPES[type_name].block_size
    return dequantize_raw(torch.from_numpy(raw.reshape(-1).copy()), type_name, (n,)).numpy()


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_mxfp4_every_exponent_byte():
    """e8m0 bytes 0..255 (0 and 1 take ggml's subnormal branch, 255 overflows the largest values to inf)."""
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, size=(256, 17), dtype=np.uint8)
    blocks[:, 0] = np.arange(256)
    expected = gguf_dequantize(blocks.reshape(-1), GGMLQuantizationType.MXFP4)
    np.testing.assert_array_equal(bits(ours(blocks, "MXFP4")), bits(expected))


@pytest.mark.parametrize("type_name", sorted(LOWBIT_DEQUANTIZERS))
def test_random_blocks_bit_exact_and_finite(type_name):
    """Positive and negative block scales; every byte pattern elsewhere."""
    blocks = random_lowbit_blocks(np.random.default_rng(11), type_name, 200, scale=0.5, signed=True)
    expected = gguf_dequantize(blocks.reshape(-1), GGMLQuantizationType[type_name])
    got = ours(blocks, type_name)
    assert np.isfinite(got).all() and np.abs(got).max() > 0
    np.testing.assert_array_equal(bits(got), bits(expected))


@pytest.mark.parametrize("type_name", ["TQ1_0", "TQ2_0", "MXFP4"])
def test_writer_quantizes_with_gguf_py(type_name):
    """Types gguf-py can quantize are quantized (not random): decoded close to the input, ours == gguf-py."""
    rng = np.random.default_rng(5)
    values = rng.standard_normal((4, 512)).astype(np.float32)
    if type_name.startswith("TQ"):
        values = np.sign(values) * (np.abs(values) > 0.5) * 0.3  # ternary data is represented exactly
    raw = encode(values, type_name, "w")
    decoded = gguf_dequantize(raw, GGMLQuantizationType[type_name])
    np.testing.assert_array_equal(bits(ours(raw, type_name)), bits(decoded.reshape(-1)))
    tol = 1e-3 if type_name.startswith("TQ") else 0.35 * np.abs(values).max()  # e2m1 steps reach 1/6 of the block max
    assert np.abs(decoded - values).max() <= tol


@pytest.mark.parametrize("type_name", ["IQ2_XXS", "IQ1_M", "IQ4_XS"])
def test_writer_random_blocks_match_the_tensor_scale(type_name):
    values = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32) * 0.03
    raw = encode(values, type_name, "blk.0.ffn_up_exps.weight")
    assert raw.shape == (8, 512 // 256 * GGML_TYPES[type_name].type_size)
    assert np.array_equal(raw, encode(values, type_name, "blk.0.ffn_up_exps.weight"))  # seeded by the name
    std = ours(raw, type_name).std()
    assert 0.8 * 0.03 <= std <= 1.25 * 0.03


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed")
    path = write_gguf(tiny_model("qwen3_moe", seed=0), d / "qwen3_moe-mixed.gguf", qtypes=MIXED)
    return path, write_dequantized_copy(path, d / "qwen3_moe-mixed-f32.gguf")


def test_mixed_gguf_keeps_every_type_quantized(mixed):
    source = open_source(mixed[0])
    types = {}
    for name in source.gguf_names():
        qt = source.gguf_tensor(name)
        types[name] = qt.ggml_type
        info = GGML_TYPES[qt.ggml_type]
        assert qt.data.dtype == torch.uint8 and qt.data.numel() == info.nbytes(int(np.prod(qt.shape))), name
    assert set(types.values()) >= set(LOWBIT_DEQUANTIZERS) | {"IQ4_NL", "IQ4_XS", "Q4_K", "Q6_K"}
    assert types["blk.1.ffn_gate_exps.weight"] == "IQ1_M" and types["blk.0.attn_output.weight"] == "MXFP4"
    gate = source.get("model.layers.0.mlp.experts.gate_up_proj")
    assert gate.ggml_type in ("IQ1_S", "F32")  # fused only when gate and up share a type


def test_mixed_gguf_forward_and_greedy_decode_match_transformers(mixed):
    """ktcore loads the mixed file (the shipped cpu rule file on ktcore's torch backends: the kernels of an
    installed plugin would add their own activation rounding) and computes what plain Transformers computes
    with the weights gguf-py dequantizes from the same file."""
    path, f32_copy = mixed
    reference = tiny_model("qwen3_moe", seed=0)
    plain = open_source(f32_copy)
    reference.load_state_dict({n: plain.get(n).dequantize() for n in reference.state_dict()})
    model, _ = load_model(path, rules=RULE_FILES_DIR / "qwen3_moe-cpu.yaml", dtype=torch.float32, progress=False,
                          registry=Registry(entrypoints=False))
    ids = torch.randint(3, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = reference(ids).logits, model(ids).logits
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
        gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids, **gen), reference.generate(ids, **gen))
