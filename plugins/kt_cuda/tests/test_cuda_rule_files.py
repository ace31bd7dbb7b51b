"""The shipped rules/ files with kt-cuda installed, checked by device type on a meta model (so it runs
everywhere): on 'cuda' the dense linears resolve to kt-cuda's KLinearGPU (int4 GEMM), attention to its
Triton backends, routed experts to the CPU (gpu-cpu) or to its fused MoE (gpu); DeepSeek's kv_b_proj stays
a dense torch linear (absorbed into the attention products)."""

import pytest
from torch import nn

import kt_cuda.plugin as plugin
from kt_cuda.ops import KExpertsGPU, KLinearMarlin
from kt_cuda.ops.attention import KAttentionFlashGQA, KMLAAttention
from ktcore.builtin import KLinearTorch
from ktcore.inject import RULE_FILES_DIR, build_meta_model, inject
from ktcore.modules import KAttention, KExperts, KLinear
from ktcore.registry import Registry
from ktcore.rules import load_rules
from ktcore.testing import tiny_config

FAMILIES = ["llama", "qwen3_moe", "deepseek_v2", "deepseek_v3"]


@pytest.fixture(scope="module")
def registry():
    return Registry(entrypoints=False, plugins={"cuda": plugin})  # ktcore's backends and kt-cuda's only


def injected(registry, family, layout):
    path = RULE_FILES_DIR / f"{tiny_config(family).model_type}-{layout}.yaml"
    model = build_meta_model(tiny_config(family))
    inject(model, load_rules(path, registry, check_devices=False, gpu="cuda"), registry, build_ops=False)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_cpu_layout_resolves_to_kt_cuda_on_cuda(family, registry):
    model = injected(registry, family, "gpu-cpu")
    linears = experts = 0
    for name, module in model.named_modules():
        if isinstance(module, KLinear):
            linears += 1
            expected = KLinearTorch if name.endswith("kv_b_proj") else KLinearMarlin
            assert module.generate_op_cls is expected and module.generate_device.type == "cuda", name
        if isinstance(module, KExperts):
            experts += 1
            assert module.generate_device.type == "cpu" and module.out_device.type == "cuda", name
        if isinstance(module, KAttention):
            assert module.generate_op_cls is (KMLAAttention if family.startswith("deepseek") else KAttentionFlashGQA)
    assert linears > 0 and (experts > 0) == (family != "llama")


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2"])
def test_gpu_layout_puts_the_experts_on_the_fused_moe(family, registry):
    model = injected(registry, family, "gpu")
    experts = [m for m in model.modules() if isinstance(m, KExperts)]
    assert experts and all(m.generate_op_cls is KExpertsGPU and m.generate_device.type == "cuda" for m in experts)
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if n.startswith("model.layers."))
