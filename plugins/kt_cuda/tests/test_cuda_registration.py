"""Registration: entry point, the backends and their ops and roles, availability reasons. Runs everywhere."""

import importlib.metadata

import pytest
import torch

import kt_cuda.plugin as plugin
from kt_cuda._env import cuda_unavailable_reason
from ktcore.registry import Registry


@pytest.fixture
def registry():
    return Registry(builtin=False, entrypoints=False, plugins={"cuda": plugin})


def test_ops_and_roles(registry):
    assert set(registry.ops("linear")) == {"KLinearGPU", "KLinearFP8"}
    assert set(registry.ops("experts")) == {"KExpertsGPU"}
    # its Triton attention: ops of their own, and the preferred CUDA backends of ktcore's attention ops
    assert set(registry.ops("attention")) == {"KMLAAttention", "KAttentionFlashGQA", "KAttentionMLA", "KAttentionSDPA"}
    for backends in (registry.backends(role, op) for role in ("linear", "experts", "attention") for op in registry.ops(role)):
        assert all(b.plugin == "cuda" and b.devices == ("cuda",) for b in backends)
    assert registry.rule_dirs() == []  # the shipped rules/ tree serves every vendor


def test_available_says_why(registry):
    for cls in registry.ops().values():
        assert cls.available("cpu") == "runs on cuda devices only, not cpu"
        reason = cls.available("cuda")
        if not torch.cuda.is_available():
            assert reason == "CUDA is not available"
        elif cls.name != "KLinearFP8":
            assert reason == cuda_unavailable_reason()


def test_resolve_on_a_machine_without_cuda(registry):
    if torch.cuda.is_available():
        assert registry.resolve("linear", "KLinearGPU", "cuda").plugin == "cuda"
    else:
        with pytest.raises(Exception, match="KLinearGPU"):
            registry.resolve("linear", "KLinearGPU", "cuda")


def test_works_without_triton():
    """With Triton absent the plugin still imports and registers; its ops say why they cannot run."""
    import subprocess
    import sys

    code = (
        "import sys, torch; sys.modules['triton'] = None\n"
        "import kt_cuda.plugin as p\n"
        "from ktcore.registry import Registry\n"
        "r = Registry(builtin=False, entrypoints=False, plugins={'cuda': p})\n"
        "print(r.ops('linear')['KLinearGPU'].available('cuda'))\n"
        "seen = []; p.register_dequantizers(lambda *a: seen.append(a)); assert seen == []\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    expected = "Triton is not installed (pip install triton)" if torch.cuda.is_available() else "CUDA is not available"
    assert out == expected


def test_entry_point():
    try:
        dist = importlib.metadata.distribution("kt-cuda")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("kt-cuda is not installed (pip install -e plugins/kt_cuda)")
    eps = [ep for ep in dist.entry_points if ep.group == "ktcore"]
    assert [(ep.name, ep.value) for ep in eps] == [("cuda", "kt_cuda.plugin")]
    assert "cuda" in Registry().plugins
