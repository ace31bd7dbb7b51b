"""What runs on every machine: the entry point, the backends kt-xpu registers, their available() reasons,
and the shipped rule files resolving to them when 'gpu' is an XPU."""

import importlib.metadata

import pytest
import torch

from kt_xpu import _env
from kt_xpu.experts import KExpertsXPU
from kt_xpu.linear import KLinearXPU
from ktcore.registry import OpUnavailableError, Registry
from ktcore.rule_selection import RULE_FILES_DIR
from ktcore.rules import RuleError, load_rules
from ktcore.sdk.testing import chosen_backends

OPS = {"linear": "KLinearGPU", "experts": "KExpertsGPU"}
HAS_XPU = torch.xpu.is_available()


@pytest.fixture(scope="module")
def registry():
    return Registry(builtin=True, entrypoints=True)


def test_entry_point_is_declared():
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="ktcore")}
    assert eps["xpu"].value == "kt_xpu.plugin" and eps["xpu"].dist.name == "kt-xpu"


def test_registry_finds_the_plugin_and_its_backends(registry):
    info = registry.plugins["xpu"]
    assert info.distribution.startswith("kt-xpu ")
    assert {(b.role, b.op, b.devices) for b in info.backends} == {(r, n, ("xpu",)) for r, n in OPS.items()}
    assert info.aliases == {"KLinearXPU": "KLinearGPU", "KExpertsXPU": "KExpertsGPU"}  # the old names still work
    assert registry.get("experts", "KExpertsXPU", backend="kt_xpu") is KExpertsXPU
    assert info.rule_dirs == []  # the shipped rules/ tree serves every vendor


@pytest.mark.skipif(HAS_XPU, reason="this machine has an XPU")
def test_without_an_xpu_the_ops_say_so():
    reason = KLinearXPU.available()
    assert reason.startswith("torch has no XPU support (torch.xpu.is_available() is False")
    if torch.version.xpu is None:
        assert reason.endswith("; this torch is not an XPU build (torch.version.xpu is None))")
    assert KExpertsXPU.available("xpu:0") == reason


def test_reason_for_another_device():
    assert KLinearXPU.available("cuda") == "runs on xpu devices only, not cuda"


@pytest.mark.skipif(torch._C._dispatch_has_kernel_for_dispatch_key(_env.INT4_MM, "XPU"), reason="this torch has the XPU int4 kernels")
def test_missing_int4_kernels_are_named():
    assert _env.int4_kernels_missing() == (
        "this torch has no XPU kernel for aten::_weight_int4pack_mm_with_scales_and_zeros, "
        "aten::_convert_weight_to_int4pack (torch >= 2.7 XPU builds have them)"
    )


def test_pinned_to_the_cpu_the_backend_names_its_device(registry):
    with pytest.raises(OpUnavailableError, match="xpu: runs on xpu, not on 'cpu'"):
        registry.resolve("experts", "KExpertsGPU", "cpu", backend="xpu")


@pytest.mark.parametrize("path", sorted(RULE_FILES_DIR.glob("*-gpu*.yaml")), ids=lambda p: p.name)
def test_shipped_accelerator_layouts_resolve_to_xpu(path, registry):
    """With 'gpu' an XPU (checked by name: this machine may have none), the linears and accelerator experts
    are kt-xpu's backends, attention is ktcore's SDPA, and every rule matches a module of the family."""
    chosen = chosen_backends(path, registry, check_devices=False, gpu="xpu")
    assert chosen["KLinearGPU"] == "xpu" and chosen.get("KAttentionSDPA", "torch") == "torch"
    assert chosen.get("KExpertsGPU", "xpu") == "xpu"


@pytest.mark.skipif(HAS_XPU, reason="this machine has an XPU")
def test_gpu_rule_files_are_rejected_here_with_the_file_line_and_device(registry):
    path = RULE_FILES_DIR / "qwen3_moe-gpu.yaml"
    with pytest.raises(RuleError) as err:
        load_rules(path, registry, gpu="xpu")
    first = err.value.issues[0]
    assert first.file == str(path) and first.line > 0
    assert "device 'xpu' is not present: torch.xpu.is_available() is False" in str(err.value)
