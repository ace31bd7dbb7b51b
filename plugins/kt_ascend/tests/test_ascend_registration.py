"""What runs on every machine: the entry point, the backends kt-ascend registers and their available()
reasons. On a machine without torch_npu the reasons say so (and the device name 'npu' does not parse)."""

import importlib.metadata
import importlib.util
import pytest
import torch

import kt_ascend._env as env
from kt_ascend.experts import KExpertsAscend
from kt_ascend.linear import KLinearAscend
from kt_ascend.attention import KAttentionAscend
from ktcore.registry import Registry

OPS = {"linear": "KLinearGPU", "experts": "KExpertsGPU", "attention": "KAttentionSDPA"}
HAS_TORCH_NPU = importlib.util.find_spec("torch_npu") is not None


@pytest.fixture(scope="module")
def registry():
    return Registry(builtin=True, entrypoints=True)


def test_entry_point_is_declared():
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="ktcore")}
    assert eps["ascend"].value == "kt_ascend.plugin"
    assert eps["ascend"].dist.name == "kt-ascend"


def test_registry_finds_the_plugin_and_its_backends(registry):
    info = registry.plugins["ascend"]
    assert info.distribution.startswith("kt-ascend ")
    assert {(b.role, b.op, b.devices) for b in info.backends} == {(r, n, ("npu",)) for r, n in OPS.items()}
    assert info.aliases == {"KLinearAscend": "KLinearGPU", "KExpertsAscend": "KExpertsGPU",
                            "KAttentionAscend": "KAttentionSDPA"}  # the old names still work
    for role, name in OPS.items():
        assert registry.get(role, name, backend="kt-ascend").plugin == "ascend"
    # on an NPU its fused attention is preferred over the torch SDPA backend
    (ascend,) = [b for b in registry.backends("attention", "KAttentionSDPA") if b.plugin == "ascend"]
    assert ascend.cls is KAttentionAscend and ascend.preference > 0
    assert info.rule_dirs == []  # the shipped rules/ tree serves every vendor


@pytest.mark.skipif(HAS_TORCH_NPU, reason="torch_npu is installed here")
def test_without_torch_npu_the_ops_say_so(registry):
    expected = "torch_npu is not installed (pip install torch-npu, on a machine with Huawei's CANN toolkit)"
    assert KLinearAscend.available() == expected
    assert KExpertsAscend.available("npu:0") == expected


def test_reasons_for_another_device_and_for_a_missing_npu(monkeypatch):
    assert KLinearAscend.available("cuda:0") == "runs on npu devices only, not cuda"
    monkeypatch.setattr(env, "_import_torch_npu", lambda: (object(), None))
    monkeypatch.delattr("torch.npu", raising=False)
    assert KLinearAscend.available("npu") == "torch_npu is installed but no Ascend NPU is visible (torch.npu.is_available() is False)"


def test_a_broken_torch_npu_is_reported(monkeypatch):
    monkeypatch.setattr(env, "_import_torch_npu", lambda: (None, "torch_npu failed to import: OSError: libascendcl.so"))
    assert KExpertsAscend.available() == "torch_npu failed to import: OSError: libascendcl.so"
