"""What runs on every machine: the entry point, the registered ops, their available() reasons and the
shipped rule files (validated by name and matched against each family's tiny model)."""

import importlib.metadata
from types import SimpleNamespace

import pytest
import torch

from kt_rocm import _env
from kt_rocm.ops import KAttentionROCm, KExpertsROCm, KLinearROCm
from kt_rocm.plugin import RULE_DIR
from ktcore.inject import build_meta_model, inject
from ktcore.registry import OpUnavailableError, Registry
from ktcore.rules import RuleError, load_rules
from ktcore.testing import tiny_config

OPS = {"linear": "KLinearROCm", "experts": "KExpertsROCm", "attention": "KAttentionROCm"}
IS_ROCM = torch.version.hip is not None


@pytest.fixture(scope="module")
def registry():
    return Registry(builtin=True, entrypoints=True)


def test_entry_point_is_declared():
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="ktcore")}
    assert eps["rocm"].value == "kt_rocm.plugin" and eps["rocm"].dist.name == "kt-rocm"


def test_registry_finds_the_plugin_its_ops_and_rule_dir(registry):
    info = registry.plugins["rocm"]
    assert info.distribution.startswith("kt-rocm ")
    assert {(op.role, op.name) for op in info.ops} == set(OPS.items())
    for role, name in OPS.items():
        assert registry.get(role, name).devices == ("cuda",)
    assert RULE_DIR in info.rule_dirs and sorted(RULE_DIR.glob("*.yaml"))


@pytest.mark.skipif(IS_ROCM, reason="this torch is a ROCm build")
def test_on_a_cuda_or_cpu_torch_the_ops_say_it_is_not_rocm():
    expected = "this torch is not a ROCm build (torch.version.hip is None)"
    assert KLinearROCm.available() == KExpertsROCm.available("cuda:0") == KAttentionROCm.available("cuda") == expected


def test_reason_for_another_device():
    assert KLinearROCm.available("xpu") == "runs on cuda devices (ROCm builds of torch name AMD GPUs 'cuda'), not xpu"


def test_reasons_on_a_rocm_torch(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.4.0", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert KLinearROCm.available() == "no AMD GPU is visible to this ROCm build of torch (torch.cuda.is_available() is False)"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_env.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    props = SimpleNamespace(name="AMD Radeon Pro W6800", gcnArchName="gfx1030")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    assert KLinearROCm.available() == (
        "AMD Radeon Pro W6800 (gfx1030) is not a Triton AMD target (gfx90a, gfx94x, gfx95x, gfx11xx, gfx12xx)"
    )
    props.name, props.gcnArchName = "AMD Instinct MI300X", "gfx942:sramecc+:xnack-"
    assert KLinearROCm.available("cuda:0") is None


def test_resolving_for_the_cpu_names_the_op_and_its_devices(registry):
    with pytest.raises(OpUnavailableError, match="op 'KLinearROCm' \\(plugin 'rocm'\\) runs on cuda, not on 'cpu'"):
        registry.resolve("linear", "KLinearROCm", "cpu")


def rule_files():
    return sorted(RULE_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", rule_files(), ids=lambda p: p.name)
def test_rule_files_validate_by_name_and_cover_their_family(path, registry):
    rules = load_rules(path, registry, check_devices=False)
    assert {"KLinearROCm", "KAttentionROCm"} <= rules.op_names()
    family = path.name.rsplit("-gpu", 1)[0]
    report = inject(build_meta_model(tiny_config(family)), rules, registry)  # a rule matching nothing raises
    assert len(report) > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_rule_files_are_rejected_here_with_the_file_line_and_device(registry):
    path = rule_files()[0]
    with pytest.raises(RuleError) as err:
        load_rules(path, registry)
    first = err.value.issues[0]
    assert first.file == str(path) and first.line > 0
    assert "device 'cuda' is not present: torch.cuda.is_available() is False" in str(err.value)
