"""The i-quants Unsloth's dynamic quants use for routed experts (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS,
IQ3_S, IQ4_XS), kept as their GGUF blocks by the kernels: the C++ block decoder bit-exact against gguf-py, the
matrices' memory equal to the GGUF bytes, the expert and linear ops against torch on gguf-py's dequantized
weights, and a tiny qwen3_moe GGUF mixing the types across layers (as those quants do) through the shipped cpu
rules against plain Transformers on the file's dequantized weights.

Tolerances (relative Frobenius error): the ops 3e-2, as test_cpu_amx_experts.py (the activations rounded to int8
per block of 32, twice in an experts layer; the weights are exact); the model's logits 2e-2 and the greedy next
token at >= 90% of positions, as test_cpu_amx_models.py."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cpu_amx_helpers import rel_err
from kt_cpu_amx import repack
from kt_cpu_amx.ops import KExpertsCPU, KLinearCPU
from kt_cpu_amx.runtime import kernels
from test_cpu_amx_experts import E, H, FakeExperts, I, int8_prefill, reference, routing  # noqa: F401 (fixture)
from torch import nn

from ktcore.rule_selection import RULE_FILES_DIR
from ktcore.weights.dequant_lowbit import random_lowbit_blocks
from ktcore.weights.quants import GGML_TYPES
from ktcore.weights.tensor import QuantizedTensor

IQ_TYPES = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS")
TOL = 3e-2
LOGITS_TOL, AGREEMENT = 2e-2, 0.9


def iq_tensor(type_name: str, shape: tuple[int, ...], seed: int, scale: float = 0.05, signed: bool = False):
    info = GGML_TYPES[type_name]
    n_blocks = int(np.prod(shape)) // info.block_size
    blocks = random_lowbit_blocks(np.random.default_rng(seed), type_name, n_blocks, scale, signed=signed)
    return QuantizedTensor(f"random.{type_name}", type_name, tuple(shape), torch.from_numpy(blocks.reshape(-1).copy()),
                           "random blocks")


def gguf_values(qt: QuantizedTensor) -> torch.Tensor:
    out = gguf.quants.dequantize(qt.data.numpy(), gguf.GGMLQuantizationType[qt.ggml_type])
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(qt.shape)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def test_kernels_name_the_types():
    assert tuple(kernels().iq_types())[: len(IQ_TYPES)] == IQ_TYPES  # then MXFP4, IQ4_NL, TQ2_0 (test_cpu_amx_mxfp4.py)
    assert repack.IQ_TYPES == frozenset(IQ_TYPES)
    for op in (KExpertsCPU, KLinearCPU):
        for t in IQ_TYPES:
            assert t in op.ggml_types and op.ggml_type_problem(t) is None


@pytest.mark.parametrize("type_name", IQ_TYPES)
def test_block_decode_is_gguf_py_bit_for_bit(type_name):
    """Every super-block: int8 values times their sub-block's float scale are gguf-py's floats, bit for bit
    (negative block scales too: every bit pattern of the indices, signs and sub-scales is a valid block)."""
    n = 512
    qt = iq_tensor(type_name, (n * 256,), seed=1, scale=0.3, signed=True)
    q = torch.empty(n, 256, dtype=torch.int8)
    s = torch.empty(n, 16)
    kernels().iq_decode_blocks(type_name, qt.data.data_ptr(), n, q.data_ptr(), s.data_ptr())
    ours = s.repeat_interleave(16, dim=1) * q.float()
    assert torch.equal(bits(ours), bits(gguf_values(qt).reshape(n, 256)))


def test_unknown_table_and_type_are_named():
    with pytest.raises(ValueError, match="IQ9"):
        kernels().set_iq_table("IQ9", b"\0")
    with pytest.raises(ValueError, match="expected 16384"):
        kernels().set_iq_table("IQ1_S", b"\0" * 8)
    with pytest.raises(ValueError, match="Q4_K is not an i-quant"):
        kernels().iq_decode_blocks("Q4_K", 0, 0, 0, 0)


@pytest.mark.parametrize("type_name", IQ_TYPES)
@pytest.mark.parametrize("tokens", (1, 5, 64))
def test_experts_match_torch_on_dequantized_weights(isa, type_name, tokens):
    weights = {"gate_proj": iq_tensor(type_name, (E, I, H), 10), "up_proj": iq_tensor(type_name, (E, I, H), 11),
               "down_proj": iq_tensor(type_name, (E, H, I), 12)}
    op = KExpertsCPU(FakeExperts())
    op.load(weights)
    assert op.ggml_types_loaded == {n: type_name for n in weights}
    # the layer holds the GGUF bytes: no widened or requantized copy
    assert op.layer.expert_nbytes * E == sum(w.data.numel() for w in weights.values())
    x, idx, w = routing(tokens, seed=tokens)
    y = op(x, idx, w)
    ref = reference({n: QuantizedTensor(n, "F32", q.shape, gguf_values(q).reshape(-1).view(torch.uint8), "deq")
                     for n, q in weights.items()}, x, idx, w)
    assert rel_err(y, ref) < TOL, rel_err(y, ref)


@pytest.mark.parametrize("type_name", IQ_TYPES)
def test_int8_prefill_matches_integer_path(int8_prefill, type_name):
    """Experts with enough rows take the int8 prefill kernel (AMX-INT8 tiles or AVX512-VNNI), which decodes the
    super-blocks as groups of 16 under zero point 128: the same integers as the integer-dot path, so the two
    differ only in float summation order."""
    weights = {"gate_proj": iq_tensor(type_name, (E, I, H), 20), "up_proj": iq_tensor(type_name, (E, I, H), 21),
               "down_proj": iq_tensor(type_name, (E, H, I), 22)}
    isa, amx_expert_rows = int8_prefill
    op = KExpertsCPU(FakeExperts(), isa=isa)
    op.load(weights)
    x, idx, w = routing(40, seed=7)  # about 10 rows per expert: a partial token block of 16
    amx_expert_rows(1)
    y_tiles = op(x, idx, w)
    amx_expert_rows(10**9)
    y_dots = op(x, idx, w)
    assert rel_err(y_tiles, y_dots) < 1e-5


@pytest.mark.parametrize("type_name", ("IQ1_M", "IQ2_S", "IQ4_XS"))
@pytest.mark.parametrize("tokens", (1, 3, 64))
def test_linear_matches_torch(isa, type_name, tokens):
    """KLinearCPU on the same blocks (37 rows: not a multiple of the 4-row tile); prefill-sized calls take the
    activations' int8 residual too."""
    qt = iq_tensor(type_name, (37, 512), seed=4)
    op = KLinearCPU(nn.Linear(512, 37, bias=False, device="meta"))
    op.load({"weight": qt})
    assert op.weight.iq_type == type_name
    x = torch.randn(tokens, 512, generator=torch.Generator().manual_seed(tokens))
    assert rel_err(op(x), F.linear(x, gguf_values(qt))) < TOL


# Unsloth-style: per layer, gate and up in one type (the file's fused gate_up keeps it), down in another
MIXES = {
    "IQ1-IQ2-IQ3": {r"blk\.0\.ffn_(gate|up)_exps": "IQ1_S", r"blk\.0\.ffn_down_exps": "IQ2_XXS",
                    r"blk\.1\.ffn_(gate|up)_exps": "IQ1_M", r"blk\.1\.ffn_down_exps": "IQ3_XXS", "default": "Q8_0"},
    "IQ2-IQ3-IQ4": {r"blk\.0\.ffn_(gate|up)_exps": "IQ2_XS", r"blk\.0\.ffn_down_exps": "IQ3_S",
                    r"blk\.1\.ffn_(gate|up)_exps": "IQ2_S", r"blk\.1\.ffn_down_exps": "IQ4_XS",
                    r"attn_q\.": "IQ4_XS", "default": "Q8_0"},
}


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_mixed_iquant_gguf_matches_its_dequantized_reference(mix, tmp_path):
    from ktcore.inject import build_meta_model, inject, load_model, weight_type_problems
    from ktcore.registry import get_registry
    from ktcore.testing import tiny_model
    from ktcore.weights import open_source
    from ktcore.weights.gguf_writer import write_dequantized_copy, write_gguf

    path = write_gguf(tiny_model("qwen3_moe", seed=0), tmp_path / "mixed.gguf", qtypes=MIXES[mix])
    f32_copy = write_dequantized_copy(path, tmp_path / "mixed-f32.gguf")
    rules = RULE_FILES_DIR / "qwen3_moe-cpu.yaml"
    registry = get_registry()
    source = open_source(path)

    # what `kt rules check` asks before loading: no tensor of the file is refused by the ops the rules chose
    meta = build_meta_model(tiny_model("qwen3_moe", seed=0).config)
    from ktcore.rule_selection import layered

    report = inject(meta, layered([rules], "qwen3_moe", registry), registry, build_ops=False)
    assert weight_type_problems(meta, source, report) == []

    reference = tiny_model("qwen3_moe", seed=0)
    plain = open_source(f32_copy)
    reference.load_state_dict({n: plain.get(n).dequantize() for n in reference.state_dict()})
    model, _ = load_model(path, rules=rules, dtype=torch.float32, progress=False, registry=registry)
    ops = [m for m in model.modules() if isinstance(m, KExpertsCPU)]
    assert len(ops) == 2
    wanted = {t for p, t in MIXES[mix].items() if "exps" in p}
    assert {t for op in ops for t in op.ggml_types_loaded.values()} == wanted
    ids = torch.randint(3, 512, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = reference(ids).logits, model(ids).logits
    rel = float((got - want).norm() / want.norm())
    agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    print(f"{mix}: relative logits error {rel:.4f}, greedy agreement {agree:.3f}")
    assert rel < LOGITS_TOL and agree >= AGREEMENT, (rel, agree)
