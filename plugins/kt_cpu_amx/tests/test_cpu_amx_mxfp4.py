"""MXFP4 (GPT-OSS's routed experts), IQ4_NL and TQ2_0 kept as their GGUF blocks by the kernels, on the i-quants'
path: the C++ block decoder bit-exact against gguf-py (MXFP4 over every e8m0 exponent, the subnormal scales of
e < 2 and the infinities of e = 255 included), the matrices' memory equal to the GGUF bytes, and the expert op
against torch on gguf-py's dequantized weights (tolerance as test_cpu_amx_iquants.py: 3e-2 relative)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cpu_amx_helpers import rel_err
from kt_cpu_amx import repack
from kt_cpu_amx.ops import KExpertsCPU, KLinearCPU
from kt_cpu_amx.runtime import kernels
from test_cpu_amx_experts import E, H, FakeExperts, I, int8_prefill, reference, routing  # noqa: F401 (fixture)
from test_cpu_amx_iquants import IQ_TYPES, TOL, bits, gguf_values, iq_tensor

from ktcore.rule_selection import RULE_FILES_DIR
from ktcore.weights.quants import GGML_TYPES
from ktcore.weights.tensor import QuantizedTensor

TYPES = ("MXFP4", "IQ4_NL", "TQ2_0")


def test_kernels_name_the_types():
    assert tuple(kernels().iq_types())[-3:] == TYPES
    for op in (KExpertsCPU, KLinearCPU):
        for t in TYPES:
            assert t in op.ggml_types and op.ggml_type_problem(t) is None


def decode(type_name: str, raw: torch.Tensor) -> torch.Tensor:
    block = GGML_TYPES[type_name].block_size
    n = raw.numel() // GGML_TYPES[type_name].type_size
    q = torch.empty(n, block, dtype=torch.int8)
    s = torch.empty(n, block // 16)
    kernels().iq_decode_blocks(type_name, raw.data_ptr(), n, q.data_ptr(), s.data_ptr())
    return s.repeat_interleave(16, dim=1) * q.float()


def test_mxfp4_decode_every_exponent_bit_for_bit():
    """Every e8m0 byte (0 and 1: ggml's subnormal halves 2^-128, 2^-127; 255: 2^127, whose products from 2 up
    overflow to inf in gguf-py's float32 as here) with random nibbles, and every nibble under a few exponents."""
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, size=(256 * 8, 17), dtype=np.uint8)
    blocks[:, 0] = np.repeat(np.arange(256, dtype=np.uint8), 8)
    every_nibble = np.zeros((4, 17), dtype=np.uint8)
    every_nibble[:, 0] = (0, 1, 127, 254)
    every_nibble[:, 1:] = (np.arange(16, dtype=np.uint8) * 17)  # bytes 0x00, 0x11, ..., 0xFF: each nibble both halves
    raw = torch.from_numpy(np.concatenate([blocks, every_nibble]).reshape(-1).copy())
    qt = QuantizedTensor("mxfp4", "MXFP4", (raw.numel() // 17 * 32,), raw, "test")
    with np.errstate(over="ignore"):
        want = gguf_values(qt).reshape(-1, 32)
    ours = decode("MXFP4", raw)
    assert torch.isinf(want).any() and (want[:8] != 0).any() and want[:8].abs().max() < 2.0**-124
    assert torch.equal(bits(ours), bits(want))
    q = torch.empty(raw.numel() // 17, 32, dtype=torch.int8)
    s = torch.empty(raw.numel() // 17, 2)
    kernels().iq_decode_blocks("MXFP4", raw.data_ptr(), q.shape[0], q.data_ptr(), s.data_ptr())
    assert set(q.abs().unique().tolist()) == {0, 1, 2, 3, 4, 6, 8, 12}  # the doubled e2m1 values, as integers
    assert torch.equal(s[:, 0], s[:, 1])


@pytest.mark.parametrize("type_name", TYPES)
def test_block_decode_is_gguf_py_bit_for_bit(type_name):
    qt = iq_tensor(type_name, (4096 * 32,), seed=1, scale=0.3, signed=type_name != "MXFP4")
    block = GGML_TYPES[type_name].block_size
    assert torch.equal(bits(decode(type_name, qt.data)), bits(gguf_values(qt).reshape(-1, block)))


@pytest.mark.parametrize("type_name, k", [(t, k) for t in IQ_TYPES + TYPES for k in (512, 2880)
                                           if k % GGML_TYPES[t].block_size == 0])  # 2880: GPT-OSS's widths
def test_matrix_keeps_the_gguf_bytes(type_name, k):
    """Every block-decoded type (the i-quants' test file's types too) keeps exactly the GGUF blocks, at each
    width its blocks divide."""
    qt = iq_tensor(type_name, (3, 40, k), seed=2)
    mats = repack.pack_matrices(qt)
    assert len(mats) == 3
    for e, pm in enumerate(mats):
        assert pm.iq_type == type_name and pm.bits == 0
        assert pm.nbytes == qt.data.numel() // 3  # the blocks, and nothing else
        assert torch.equal(bits(repack.unpack(pm)), bits(gguf_values(qt)[e]))


def expert_tensors(type_name: str, seed: int) -> dict:
    return {"gate_proj": iq_tensor(type_name, (E, I, H), seed), "up_proj": iq_tensor(type_name, (E, I, H), seed + 1),
            "down_proj": iq_tensor(type_name, (E, H, I), seed + 2)}


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("tokens", (1, 5, 64))
def test_experts_match_torch_on_dequantized_weights(isa, type_name, tokens):
    weights = expert_tensors(type_name, 10)
    op = KExpertsCPU(FakeExperts())
    op.load(weights)
    assert op.ggml_types_loaded == {n: type_name for n in weights}
    assert op.layer.expert_nbytes * E == sum(w.data.numel() for w in weights.values())  # the GGUF bytes
    x, idx, w = routing(tokens, seed=tokens)
    y = op(x, idx, w)
    ref = reference({n: QuantizedTensor(n, "F32", q.shape, gguf_values(q).reshape(-1).view(torch.uint8), "deq")
                     for n, q in weights.items()}, x, idx, w)
    assert rel_err(y, ref) < TOL, rel_err(y, ref)


@pytest.mark.parametrize("tokens", (1, 5, 64))
def test_linear_at_gpt_oss_width(isa, tokens):
    """KLinearCPU on MXFP4 rows of 2880 (GPT-OSS's hidden size: 90 blocks of 32, not a multiple of 256), 48 rows."""
    import torch.nn.functional as F
    from torch import nn

    qt = iq_tensor("MXFP4", (48, 2880), seed=5)
    op = KLinearCPU(nn.Linear(2880, 48, bias=False, device="meta"))
    op.load({"weight": qt})
    assert op.weight.iq_type == "MXFP4" and op.weight.nbytes == qt.data.numel()
    x = torch.randn(tokens, 2880, generator=torch.Generator().manual_seed(tokens))
    assert rel_err(op(x), F.linear(x, gguf_values(qt))) < TOL


@pytest.mark.parametrize("type_name", TYPES)
def test_int8_prefill_matches_integer_path(int8_prefill, type_name):
    """The int8 prefill kernel (AMX-INT8 tiles or AVX512-VNNI) decodes the same blocks to the same integers: the
    two paths differ only in float summation order."""
    weights = expert_tensors(type_name, 20)
    isa, amx_expert_rows = int8_prefill
    op = KExpertsCPU(FakeExperts(), isa=isa)
    op.load(weights)
    x, idx, w = routing(40, seed=7)
    amx_expert_rows(1)
    y_tiles = op(x, idx, w)
    amx_expert_rows(10**9)
    y_dots = op(x, idx, w)
    assert rel_err(y_tiles, y_dots) < 1e-5


# GPT-OSS: its MXFP4 routed experts through KExpertsGptOssCPU (biases, clamped SwiGLU), the weights kept as blocks.
# The op takes each activation's int8 residual too, so it meets the fp32 bound of test_families_new.py
# (1e-4 of the largest reference logit; measured 2e-5) where the model's other ops are torch's.
FP32_REL_TOL = 1e-4


def _gpt_oss_gguf(tmp_path):
    from ktcore.testing import tiny_model
    from ktcore.weights.gguf_writer import write_dequantized_copy, write_gguf

    path = write_gguf(tiny_model("gpt_oss"), tmp_path / "gpt_oss-mxfp4.gguf", qtypes={r"_exps\.weight": "MXFP4", "default": "Q8_0"})
    return path, write_dequantized_copy(path, tmp_path / "gpt_oss-mxfp4-f32.gguf")


@pytest.mark.parametrize("tokens", (1, 5, 64))
def test_gpt_oss_experts_op_matches_torch_op(tokens, tmp_path):
    from kt_cpu_amx.gpt_oss import KExpertsGptOssCPU

    from ktcore.builtin.experts_gpt_oss import KExpertsGptOssTorch
    from ktcore.testing import tiny_model
    from ktcore.weights import open_source

    path, _ = _gpt_oss_gguf(tmp_path)
    source = open_source(path)
    module = tiny_model("gpt_oss").model.layers[1].mlp.experts
    prefix = "model.layers.1.mlp.experts."
    weights = {n: source.get(prefix + n) for n in ("gate_proj", "up_proj", "down_proj", "down_proj_stored", "gate_proj_bias",
                                                   "up_proj_bias", "down_proj_bias")}
    assert weights["down_proj_stored"].ggml_type == "MXFP4" and weights["down_proj_stored"].shape == (8, 256, 256)
    ours, theirs = KExpertsGptOssCPU(module), KExpertsGptOssTorch(module, dtype=torch.float32)
    ours.load(weights)
    theirs.load(weights)
    assert ours.nbytes == sum(source.gguf_tensor(f"blk.1.ffn_{p}_exps.weight").data.nbytes for p in ("gate", "up", "down"))
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 256, generator=g)
    idx = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(tokens)])
    w = torch.softmax(torch.randn(tokens, 2, generator=g), -1)
    assert rel_err(ours(x, idx, w), theirs(x, idx, w)) < 1e-4


def test_gpt_oss_mxfp4_gguf_matches_transformers(tmp_path):
    """The tiny GPT-OSS GGUF with MXFP4 experts through the shipped cpu rule file, its linears on torch (so the
    experts alone differ from Transformers: KLinearCPU's int8 activations are outside this bound): the experts
    hold the file's MXFP4 bytes and the logits (prefill and greedy decode) equal Transformers' on the weights
    gguf-py dequantizes."""
    import yaml
    from kt_cpu_amx.gpt_oss import KExpertsGptOssCPU

    from ktcore.inject import load_model
    from ktcore.registry import get_registry
    from ktcore.testing import tiny_model
    from ktcore.weights import open_source

    path, f32_copy = _gpt_oss_gguf(tmp_path)
    rules = yaml.safe_load((RULE_FILES_DIR / "gpt_oss-cpu.yaml").read_text())
    for rule in rules:
        if rule["replace"]["kwargs"]["op"] == "KLinearCPU":
            rule["replace"]["kwargs"]["op"] = "KLinearTorch"
    rule_file = tmp_path / "gpt_oss-cpu-torch-linears.yaml"
    rule_file.write_text(yaml.safe_dump(rules))
    # what `kt rules check` asks before loading: the stored MXFP4 down_proj (not its F32 transpose) is checked
    from ktcore.inject import build_meta_model, inject, weight_type_problems
    from ktcore.rule_selection import layered

    meta = build_meta_model(tiny_model("gpt_oss").config)
    report = inject(meta, layered([rule_file], "gpt_oss", get_registry()), get_registry(), build_ops=False)
    assert weight_type_problems(meta, open_source(path), report) == []
    experts = meta.get_submodule("model.layers.0.mlp.experts")
    assert "down_proj_stored" in experts.weight_names() and "down_proj" not in experts.weight_names()
    reference = tiny_model("gpt_oss")
    plain = open_source(f32_copy)
    reference.load_state_dict({n: plain.get(n).dequantize() for n in reference.state_dict()})
    model, _ = load_model(path, rules=rule_file, dtype=torch.float32, registry=get_registry(), progress=False)
    ops = [m for m in model.modules() if isinstance(m, KExpertsGptOssCPU)]
    assert len(ops) == 2
    source = open_source(path)
    for layer, op in enumerate(ops):
        assert set(op.ggml_types_loaded.values()) == {"MXFP4"}
        assert op.nbytes == sum(source.gguf_tensor(f"blk.{layer}.ffn_{p}_exps.weight").data.nbytes for p in ("gate", "up", "down"))
    ids = torch.randint(3, 512, (1, 20), generator=torch.Generator().manual_seed(5))
    gen = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    with torch.no_grad():
        want, got = reference(ids).logits, model(ids).logits
        assert (got - want).abs().max() <= FP32_REL_TOL * want.abs().max()
        want, got = reference.generate(ids, **gen), model.generate(ids, **gen)
    assert torch.equal(got.sequences, want.sequences)
    for g, e in zip(got.logits, want.logits):
        assert (g - e).abs().max() <= FP32_REL_TOL * e.abs().max()


def test_gpt_oss_from_transformers_weights():
    """From an in-memory Transformers model (StateDictSource offers down_proj_stored as the transpose of
    down_proj): float weights quantized online to int8, so the logits within test_cpu_amx_models.py's 2e-2
    (measured 4e-3; a wrong layout would be O(1))."""
    from ktcore.inject import load_model
    from ktcore.registry import get_registry
    from ktcore.testing import tiny_model
    from ktcore.weights.state_dict import StateDictSource

    reference = tiny_model("gpt_oss")
    source = StateDictSource(reference)
    stored = source.get("model.layers.0.mlp.experts.down_proj_stored").dequantize()
    assert torch.equal(stored, reference.model.layers[0].mlp.experts.down_proj.detach().transpose(1, 2))
    model, _ = load_model(source, rules=RULE_FILES_DIR / "gpt_oss-cpu.yaml", dtype=torch.float32, registry=get_registry(),
                          progress=False)
    assert sum(type(m.prefill_op).__name__ == "KExpertsGptOssCPU" for m in model.modules() if hasattr(m, "prefill_op")) == 2
    ids = torch.randint(3, 512, (1, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want, got = reference(ids).logits, model(ids).logits
    assert float((got - want).norm() / want.norm()) < 2e-2
