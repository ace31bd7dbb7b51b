"""What runs on every machine: the entry point, the registered ops, their available() reasons and the
shipped rule files (validated by name and matched against each family's tiny model)."""

import importlib.metadata

import pytest
import torch

from kt_xpu import _env
from kt_xpu.attention import KAttentionXPU
from kt_xpu.experts import KExpertsXPU
from kt_xpu.linear import KLinearXPU
from kt_xpu.plugin import RULE_DIR
from ktcore.inject import build_meta_model, inject
from ktcore.registry import OpUnavailableError, Registry
from ktcore.rules import RuleError, load_rules
from ktcore.testing import tiny_config

OPS = {"linear": "KLinearXPU", "experts": "KExpertsXPU", "attention": "KAttentionXPU"}
HAS_XPU = torch.xpu.is_available()


@pytest.fixture(scope="module")
def registry():
    return Registry(builtin=True, entrypoints=True)


def test_entry_point_is_declared():
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="ktcore")}
    assert eps["xpu"].value == "kt_xpu.plugin" and eps["xpu"].dist.name == "kt-xpu"


def test_registry_finds_the_plugin_its_ops_and_rule_dir(registry):
    info = registry.plugins["xpu"]
    assert info.distribution.startswith("kt-xpu ")
    assert {(op.role, op.name) for op in info.ops} == set(OPS.items())
    for role, name in OPS.items():
        assert registry.get(role, name).devices == ("xpu",)
    assert RULE_DIR in info.rule_dirs and sorted(RULE_DIR.glob("*.yaml"))


@pytest.mark.skipif(HAS_XPU, reason="this machine has an XPU")
def test_without_an_xpu_the_ops_say_so():
    reason = KLinearXPU.available()
    assert reason.startswith("torch has no XPU support (torch.xpu.is_available() is False")
    if torch.version.xpu is None:
        assert reason.endswith("; this torch is not an XPU build (torch.version.xpu is None))")
    assert KExpertsXPU.available("xpu:0") == reason == KAttentionXPU.available("xpu")


def test_reason_for_another_device():
    assert KLinearXPU.available("cuda") == "runs on xpu devices only, not cuda"


@pytest.mark.skipif(torch._C._dispatch_has_kernel_for_dispatch_key(_env.INT4_MM, "XPU"), reason="this torch has the XPU int4 kernels")
def test_missing_int4_kernels_are_named():
    assert _env.int4_kernels_missing() == (
        "this torch has no XPU kernel for aten::_weight_int4pack_mm_with_scales_and_zeros, "
        "aten::_convert_weight_to_int4pack (torch >= 2.7 XPU builds have them)"
    )


def test_resolving_for_the_cpu_names_the_op_and_its_devices(registry):
    with pytest.raises(OpUnavailableError, match="op 'KExpertsXPU' \\(plugin 'xpu'\\) runs on xpu, not on 'cpu'"):
        registry.resolve("experts", "KExpertsXPU", "cpu")


def rule_files():
    return sorted(RULE_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", rule_files(), ids=lambda p: p.name)
def test_rule_files_validate_by_name_and_cover_their_family(path, registry):
    rules = load_rules(path, registry, check_devices=False)
    assert {"KLinearXPU", "KAttentionXPU"} <= rules.op_names()
    family = path.name.rsplit("-gpu", 1)[0]
    report = inject(build_meta_model(tiny_config(family)), rules, registry)  # a rule matching nothing raises
    assert len(report) > 0


@pytest.mark.skipif(HAS_XPU, reason="this machine has an XPU")
@pytest.mark.parametrize("path", rule_files()[:1], ids=lambda p: p.name)
def test_rule_files_are_rejected_here_with_the_file_line_and_device(path, registry):
    with pytest.raises(RuleError) as err:
        load_rules(path, registry)
    first = err.value.issues[0]
    assert first.file == str(path) and first.line > 0
    assert "device 'xpu' is not present: torch.xpu.is_available() is False" in str(err.value)
