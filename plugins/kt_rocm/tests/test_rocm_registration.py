"""What runs on every machine: the entry point, the backends kt-rocm registers, their available() reasons,
and the shipped rule files resolving to them (by device type) on the 'cuda' device type."""

import importlib.metadata
from types import SimpleNamespace

import pytest
import torch

from kt_rocm import _env
from kt_rocm.ops import KExpertsROCm, KLinearROCm
from ktcore.registry import OpUnavailableError, Registry
from ktcore.rule_selection import RULE_FILES_DIR
from ktcore.sdk.testing import chosen_backends

OPS = {"linear": "KLinearGPU", "experts": "KExpertsGPU"}
IS_ROCM = torch.version.hip is not None


@pytest.fixture(scope="module")
def registry():
    return Registry(builtin=True, entrypoints=True)


def test_entry_point_is_declared():
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="ktcore")}
    assert eps["rocm"].value == "kt_rocm.plugin" and eps["rocm"].dist.name == "kt-rocm"


def test_registry_finds_the_plugin_and_its_backends(registry):
    info = registry.plugins["rocm"]
    assert info.distribution.startswith("kt-rocm ")
    assert {(b.role, b.op, b.devices) for b in info.backends} == {(r, n, ("cuda",)) for r, n in OPS.items()}
    assert info.aliases == {"KLinearROCm": "KLinearGPU", "KExpertsROCm": "KExpertsGPU"}  # the old names still work
    assert registry.get("linear", "KLinearROCm", backend="kt-rocm") is KLinearROCm
    assert info.rule_dirs == []  # the shipped rules/ tree serves every vendor


@pytest.mark.skipif(IS_ROCM, reason="this torch is a ROCm build")
def test_on_a_cuda_or_cpu_torch_the_ops_say_it_is_not_rocm():
    expected = "this torch is not a ROCm build (torch.version.hip is None)"
    assert KLinearROCm.available() == KExpertsROCm.available("cuda:0") == expected


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


def test_pinned_to_the_cpu_the_backend_names_its_device(registry):
    with pytest.raises(OpUnavailableError, match="rocm: runs on cuda, not on 'cpu'"):
        registry.resolve("linear", "KLinearGPU", "cpu", backend="rocm")


@pytest.mark.skipif(IS_ROCM, reason="this torch is a ROCm build")
def test_on_cuda_the_choice_explains_why_rocm_was_not_taken(registry):
    explained = registry.resolution("linear", "KLinearGPU", "cuda:0").explain()
    assert "rocm: this torch is not a ROCm build" in explained


@pytest.mark.parametrize("path", sorted(RULE_FILES_DIR.glob("*-gpu*.yaml")), ids=lambda p: p.name)
def test_shipped_accelerator_layouts_resolve_to_rocm_on_a_rocm_torch(path, registry, monkeypatch):
    """As on a ROCm torch (kt-cuda's backends refuse it, kt-rocm's accept): the shipped files' linears and
    accelerator experts run on kt-rocm, attention on ktcore's SDPA (ROCm's flash attention), and every rule
    matches a module of the family."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for backends in [registry.backends(*role) for role in OPS.items()] + [registry.backends("attention", "KAttentionSDPA")]:
        for b in backends:
            if b.plugin in ("rocm", "cuda"):
                why = None if b.plugin == "rocm" else "this is a ROCm build of torch"
                monkeypatch.setattr(b.cls, "available", classmethod(lambda cls, device=None, _why=why: _why))
    chosen = chosen_backends(path, registry, gpu="cuda")
    assert chosen["KLinearGPU"] == "rocm" and chosen.get("KAttentionSDPA", "torch") == "torch"
    assert chosen.get("KExpertsGPU", "rocm") == "rocm"
