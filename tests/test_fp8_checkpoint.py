"""Native FP8 checkpoints (DeepSeek-V3/R1 layout: e4m3 weights, 128x128 ``weight_scale_inv`` block scales).

References are independent of ``ktcore.weights.fp8``: e4m3 bytes decoded from their bits in float64, block
scales indexed element by element, the product rounded once to float32 (what an IEEE float32 multiply of
the two exact operands gives); the model reference is plain Transformers over those values, read from the
files with ``safetensors`` itself.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ktcore.builtin.experts import KExpertsTorch
from ktcore.builtin.experts_fp8 import KExpertsFP8
from ktcore.cli.model_options import model_args, open_model
from ktcore.registry import Registry
from ktcore.rule_selection import parse_rule_file_name, rule_variant, select_rule_file
from ktcore.testing import tiny_config
from ktcore.weights import QuantizedTensor, WeightError, open_source
from ktcore.weights.fp8 import row_scaled_to, row_scales
from ktcore.weights.fp8_writer import write_fp8_checkpoint
from ktcore.weights.state_dict import StateDictSource

torch.set_num_threads(2)
PROMPT = [1, 17, 250, 33, 401, 7, 99, 12, 64, 300]
NEW_TOKENS = 8


def e4m3_reference(raw: torch.Tensor) -> torch.Tensor:
    """float64 values of e4m3fn bytes, from the bits (sign, 4 exponent bits with bias 7, 3 mantissa bits)."""
    b = raw.to(torch.int64)
    sign = torch.where(b >> 7 == 1, -1.0, 1.0).double()
    exp, man = (b >> 3) & 0xF, (b & 7).double()
    normal = torch.pow(2.0, (exp - 7).double()) * (1 + man / 8)
    subnormal = 2.0 ** -6 * man / 8
    value = sign * torch.where(exp > 0, normal, subnormal)
    return torch.where((exp == 15) & (b & 7 == 7), float("nan"), value)


def dequant_reference(raw: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``[..., N, K]`` e4m3 bytes times their block scales, element by element, rounded once to float32."""
    q = e4m3_reference(raw)
    n, k = q.shape[-2:]
    rows = torch.arange(n) // 128
    cols = torch.arange(k) // 128
    s = scale.double()[..., rows[:, None], cols[None, :]]
    return (q * s).float()


def random_fp8(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    raw[(raw & 0x7F) == 0x7F] = 0x3C  # no NaN codes (quantizers never write them)
    blocks = (*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128))
    scale = torch.rand(blocks, generator=g) * 1e-3 + 1e-5
    return raw, scale


# -- the format --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(300, 260), (2, 256, 384)])
def test_dequantize_is_exact(shape):
    raw, scale = random_fp8(shape)
    qt = QuantizedTensor("w", "F8_E4M3", shape, raw.reshape(-1), "test", scale)
    expected = dequant_reference(raw, scale)
    got = qt.dequantize()
    assert got.dtype == torch.float32 and got.shape == shape
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
    assert torch.equal(qt.dequantize(torch.bfloat16), expected.to(torch.bfloat16))
    # the per-call conversion of KExpertsFP8 gives the same values
    q = raw.view(torch.float8_e4m3fn)
    for e in range(shape[0] if len(shape) == 3 else 1):
        q_e, s_e, x_e = (q[e], scale[e], expected[e]) if len(shape) == 3 else (q, scale, expected)
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.equal(row_scaled_to(q_e, row_scales(s_e, q_e.shape[0]), dtype), x_e.to(dtype))


def test_every_code_decodes_as_its_bits_say():
    raw = torch.arange(256, dtype=torch.uint8).reshape(2, 128)
    qt = QuantizedTensor("codes", "F8_E4M3", (2, 128), raw.reshape(-1), "test", torch.ones(1, 1))
    expected = e4m3_reference(raw).float()
    got = qt.dequantize()
    nan = expected.isnan()
    assert nan.sum() == 2 and torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan], expected[~nan])
    assert got.abs().nan_to_num().max() == 448


def test_fp8_weight_without_scales_is_refused():
    qt = QuantizedTensor("blk.weight", "F8_E4M3", (4, 128), torch.zeros(512, dtype=torch.uint8), "x.safetensors")
    with pytest.raises(WeightError, match="blk.weight.*blk.weight_scale_inv"):
        qt.dequantize()


# -- checkpoint folders ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_fp8_checkpoint(tmp_path_factory.mktemp("fp8") / "tiny-ds3-fp8")


def reference_model(folder, bf16_experts: bool = False):
    """Plain Transformers (fp32) over the files' values dequantized by the reference above; ``bf16_experts``:
    routed experts' weights rounded to bfloat16 once (what ``keep: bf16`` holds)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    files = load_file(str(folder / "model.safetensors"))
    values = {}
    for name, t in files.items():
        if name.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            values[name] = dequant_reference(t.view(torch.uint8), files[name + "_scale_inv"])
        else:
            values[name] = t.float()
    config = AutoConfig.from_pretrained(folder)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    for name in model.state_dict():
        if name.endswith(".experts.gate_up_proj") or name.endswith(".experts.down_proj"):
            prefix = name.rsplit(".", 1)[0]
            parts = ("gate_proj", "up_proj") if name.endswith("gate_up_proj") else ("down_proj",)
            per_expert = [torch.cat([values[f"{prefix}.{e}.{p}.weight"] for p in parts])
                          for e in range(config.n_routed_experts)]
            fused = torch.stack(per_expert)
            state[name] = fused.to(torch.bfloat16).float() if bf16_experts else fused
        else:
            state[name] = values[name]
    model.load_state_dict(state, strict=True)
    return model.eval()


def greedy(model, ids):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True, output_logits=True)
    return out.sequences[0].tolist(), torch.stack(out.logits)


def open_cli(folder, tmp_path, keep=None, layout="cpu"):
    rules = None
    if keep is not None:
        path = tmp_path / f"keep-{keep}.yaml"
        path.write_text('- extends: default\n- match:\n    name: "^model\\\\.layers\\\\.\\\\d+\\\\.mlp\\\\.experts$"\n'
                        '  replace:\n    class: KExperts\n    device: cpu\n'
                        f'    kwargs:\n      op: KExpertsFP8\n      op_kwargs:\n        keep: {keep}\n'
                        '  recursive: false\n')
        rules = str(path)
    return open_model(model_args(str(folder), quiet=True, layout=layout, rules=rules, threads=2),
                      registry=Registry(entrypoints=False))


@pytest.mark.parametrize("keep", ["fp8", "bf16"])
def test_cli_load_greedy_equals_transformers_on_dequantized_weights(folder, tmp_path, keep):
    loaded = open_cli(folder, tmp_path, keep=keep if keep == "fp8" else None)  # bf16: the shipped default
    assert any(f.endswith("deepseek_v3-fp8-cpu.yaml") for f in loaded.rule_files)
    experts = [m for m in loaded.model.modules() if isinstance(m, KExpertsFP8)]
    assert experts and all(op.keep == keep for op in experts)
    assert loaded.tokenizer.encode("hello") == [77, 74, 81, 81, 84]  # the folder's tokenizer: one token per letter
    reference = reference_model(folder, bf16_experts=keep == "bf16")
    ref_tokens, ref_logits = greedy(reference, PROMPT)
    tokens, logits = greedy(loaded.model, PROMPT)
    assert tokens == ref_tokens
    # absorbed MLA reorders the attention products (tests/test_families.py: fp32 within 1e-4 * scale)
    assert (logits - ref_logits).abs().max() <= 1e-4 * ref_logits.abs().max()


def test_keep_fp8_and_bf16_experts_against_torch_experts(folder):
    source = open_source(folder)
    config = source.config()
    prefix = "model.layers.1.mlp.experts"
    weights = {p: source.get(f"{prefix}.{p}") for p in ("gate_proj", "up_proj", "down_proj")}
    from ktcore.inject import build_meta_model

    module = build_meta_model(config).model.layers[1].mlp.experts
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, config.hidden_size, generator=g)
    idx = torch.randint(0, config.n_routed_experts, (5, 2), generator=g)
    w = torch.rand(5, 2, generator=g)
    outputs = {}
    for keep in ("fp8", "bf16"):
        for dtype in (torch.float32, torch.bfloat16):
            op = KExpertsFP8(module, "cpu", dtype=dtype, keep=keep)
            op.load(weights)
            outputs[keep, dtype] = op(x, idx, w)
            n_weights = sum(qt.data.numel() for qt in weights.values())  # one byte each in the file
            n_scales = sum(qt.scale.numel() for qt in weights.values())
            assert op.kept_bytes() == (2 * n_weights if keep == "bf16" else n_weights + 4 * n_scales)
            assert op.kept_bytes() == sum(KExpertsFP8.estimated_bytes(qt, dtype, {"keep": keep}) for qt in weights.values())
    dense = {p: QuantizedTensor(p, "F32", qt.shape, qt.dequantize().reshape(-1).view(torch.uint8)) for p, qt in weights.items()}
    for dtype in (torch.float32, torch.bfloat16):
        torch_op = KExpertsTorch(module, "cpu", dtype=dtype)
        torch_op.load(dense)
        # keep fp8 computes on the dequantized values in the compute dtype: the torch op's result exactly
        assert torch.equal(outputs["fp8", dtype], torch_op(x, idx, w))
    assert torch.equal(outputs["bf16", torch.bfloat16], outputs["fp8", torch.bfloat16])


def test_sharded_checkpoint_reads_like_one_file(folder, tmp_path):
    sharded = write_fp8_checkpoint(tmp_path / "sharded", shards=3)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    one, three = open_source(folder), open_source(sharded)
    assert list(one.names()) == list(three.names()) and not three.missing()
    for name in ("model.layers.1.mlp.experts.gate_up_proj", "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
                 "lm_head.weight"):
        assert torch.equal(one.get(name).dequantize(), three.get(name).dequantize())
    shard = sorted(set(index["weight_map"].values()))[1]
    (sharded / shard).unlink()
    with pytest.raises(WeightError, match=f"shard {shard}.*missing"):
        open_source(sharded)


@pytest.mark.parametrize("field, value", [("quant_method", "gptq"), ("fmt", "e5m2"), ("weight_block_size", [64, 64]),
                                          ("activation_scheme", "static")])
def test_unsupported_quantization_config_is_refused_naming_the_field(folder, tmp_path, field, value):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").symlink_to(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"][field] = value
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightError, match=f"quantization_config.{field} = {value!r}".replace("[", r"\[")):
        open_source(bad)


def test_missing_block_scales_name_the_tensor(folder, tmp_path):
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    bad = tmp_path / "noscale"
    bad.mkdir()
    save_file(tensors, str(bad / "model.safetensors"))
    (bad / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(WeightError, match="'model.layers.0.self_attn.o_proj.weight' has no block scales"):
        open_source(bad).get("model.layers.0.self_attn.o_proj.weight")


def test_rule_selection_picks_the_fp8_files(folder):
    registry = Registry(entrypoints=False)
    assert rule_variant(open_source(folder)) == "fp8"
    assert rule_variant(StateDictSource({}, config=tiny_config("deepseek_v3"))) is None
    for layout in ("cpu", "gpu-cpu"):
        chosen = select_rule_file("deepseek_v3", registry, layout, check_devices=False, gpu="cuda", variant="fp8")
        assert chosen.name == f"deepseek_v3-fp8-{layout}.yaml"
        assert parse_rule_file_name(chosen.name) == ("deepseek_v3", "fp8", layout)
    assert select_rule_file("deepseek_v3", registry, "cpu").name == "deepseek_v3-cpu.yaml"
    # a family without fp8 files keeps its own (the weights still dequantize exactly)
    assert select_rule_file("qwen3_moe", registry, "cpu", variant="fp8").name == "qwen3_moe-cpu.yaml"


# -- GPU ---------------------------------------------------------------------------------------------------------


def test_klinear_fp8_on_checkpoint_weights_equals_torch_reference(folder):
    if not torch.cuda.is_available():
        pytest.skip("KLinearFP8 needs a CUDA GPU (compute capability 8.9+)")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("KLinearFP8 needs compute capability 8.9+")
    from kt_cuda import fp8 as cuda_fp8
    from kt_cuda.ops import KLinearFP8

    source = open_source(folder)
    for name in ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "model.layers.1.mlp.shared_experts.down_proj.weight"):
        qt = source.get(name)
        N, K = qt.shape
        with torch.device("meta"):
            module = torch.nn.Linear(K, N, bias=False)
        op = KLinearFP8(module, "cuda")
        op.load({"weight": qt})
        x = torch.randn(7, K, generator=torch.Generator().manual_seed(2)).cuda()
        out = op(x).double()
        # the reference: the same quantized activations (1x128 groups) times the exactly dequantized weight
        xq, xs = cuda_fp8.quantize_activation(x)
        ref = cuda_fp8.dequantize_activation(xq, xs).double() @ qt.dequantize(torch.float32, "cuda").double().T
        assert ((out - ref).norm() / ref.norm()).item() < 1e-3, name
