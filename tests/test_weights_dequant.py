"""The torch dequantizers against gguf-py's numpy reference, bit for bit, on random blocks."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from ktcore.weights.dequant import dequantize
from ktcore.weights.dequant_lowbit import LOWBIT_DEQUANTIZERS, random_lowbit_blocks
from ktcore.weights.quants import DEQUANTIZABLE, GGML_TYPES
from ktcore.weights.source import WeightError
from ktcore.weights.tensor import QuantizedTensor

# byte offsets of the f16 scale fields inside one block of each type
F16_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "IQ4_NL": [0],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_XS": [0],
}


def random_blocks(type_name: str, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Random bytes whose f16 scale fields are finite (random scales in [-2, 2])."""
    rng = np.random.default_rng(seed)
    info = GGML_TYPES[type_name]
    if type_name == "F32":
        return rng.standard_normal(n_blocks).astype(np.float32).view(np.uint8)
    if type_name == "F16":
        return rng.standard_normal(n_blocks).astype(np.float16).view(np.uint8)
    if type_name == "BF16":
        bits = (rng.standard_normal(n_blocks).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return bits.view(np.uint8)
    if type_name in LOWBIT_DEQUANTIZERS:
        return random_lowbit_blocks(rng, type_name, n_blocks, scale=2.0, signed=True).reshape(-1)
    blocks = rng.integers(0, 256, size=(n_blocks, info.type_size), dtype=np.uint8)
    for at in F16_FIELDS[type_name]:
        scales = rng.uniform(-2, 2, size=n_blocks).astype(np.float16)
        blocks[:, at : at + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(-1)


@pytest.mark.parametrize("type_name", sorted(t for t in DEQUANTIZABLE if GGML_TYPES[t].gguf))
def test_bit_exact_with_gguf(type_name):
    info = GGML_TYPES[type_name]
    n_blocks = 96 if info.block_size > 1 else 96 * 32
    raw = random_blocks(type_name, n_blocks, seed=info.type_id)
    rows = 3
    cols = n_blocks * info.block_size // rows
    expected = gguf_dequantize(raw.reshape(rows, -1), GGMLQuantizationType[type_name])
    qt = QuantizedTensor("w", type_name, (rows, cols), torch.from_numpy(raw.copy()))
    got = dequantize(qt)
    assert got.shape == (rows, cols)
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy().view(np.uint32), expected.astype(np.float32).view(np.uint32))


def test_every_supported_type_is_in_the_table():
    wanted = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS",
              "IQ4_NL", "MXFP4", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "TQ1_0", "TQ2_0"}
    assert wanted <= DEQUANTIZABLE
    for name, info in GGML_TYPES.items():
        if not info.gguf:  # F8_E4M3: native FP8 checkpoints (tests/test_fp8_checkpoint.py)
            continue
        assert GGMLQuantizationType[name].value == info.type_id
        from gguf.constants import GGML_QUANT_SIZES

        assert GGML_QUANT_SIZES[GGMLQuantizationType[name]] == (info.block_size, info.type_size)


def test_output_dtype_and_3d_shape():
    raw = random_blocks("Q8_0", 4 * 2 * 2)
    qt = QuantizedTensor("experts", "Q8_0", (4, 2, 64), torch.from_numpy(raw.copy()))
    out = dequantize(qt, dtype=torch.bfloat16)
    assert out.shape == (4, 2, 64) and out.dtype == torch.bfloat16
    ref = gguf_dequantize(raw.reshape(8, -1), GGMLQuantizationType.Q8_0).reshape(4, 2, 64)
    torch.testing.assert_close(out, torch.from_numpy(ref).to(torch.bfloat16), rtol=0, atol=0)


def test_unsupported_type_names_tensor_type_and_file():
    qt = QuantizedTensor("blk.0.ffn_up.weight", "NVFP4", (1, 64), torch.zeros(36, dtype=torch.uint8), "model.gguf")
    with pytest.raises(WeightError, match=r"blk\.0\.ffn_up\.weight.*model\.gguf.*NVFP4.*nearest supported type: MXFP4"):
        dequantize(qt)


def test_wrong_byte_count_is_a_weight_error():
    qt = QuantizedTensor("w", "Q4_0", (2, 32), torch.zeros(18, dtype=torch.uint8), "f.gguf")
    with pytest.raises(WeightError, match="needs 36 bytes, got 18"):
        dequantize(qt)


@pytest.mark.parametrize("type_name", ["Q4_K", "Q6_K", "Q8_0", "Q4_0", "Q5_1"])
def test_quantizer_output_decodes_with_gguf_close_to_input(type_name):
    """ktcore's quantizer (own K-quant packing, gguf-py for the rest): gguf-py's reference decoder reads
    its blocks back close to the input, and our dequantizer agrees with gguf-py bit for bit."""
    from ktcore.weights.quantize import quantize

    rng = np.random.default_rng(7)
    values = rng.standard_normal((4, 512)).astype(np.float32)
    values[1] *= 10  # rows of different scales
    values[2] = np.abs(values[2])  # all-positive row (min clamps at 0)
    raw = quantize(values, type_name)
    assert raw.dtype == np.uint8 and raw.shape == (4, 512 // GGML_TYPES[type_name].block_size * GGML_TYPES[type_name].type_size)
    decoded = gguf_dequantize(raw, GGMLQuantizationType[type_name])
    bits = {"Q4_K": 4, "Q6_K": 6, "Q8_0": 8, "Q4_0": 4, "Q5_1": 5}[type_name]
    for row in range(4):
        span = values[row].max() - min(values[row].min(), 0)
        assert np.abs(decoded[row] - values[row]).max() <= 1.5 * span / (2**bits - 1), row
    ours = dequantize(QuantizedTensor("w", type_name, (4, 512), torch.from_numpy(raw.reshape(-1).copy())))
    np.testing.assert_array_equal(ours.numpy(), decoded)
