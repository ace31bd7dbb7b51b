"""The public SDK: plugins import only ``ktcore.sdk`` / ``ktcore.hookspecs`` / ``ktcore`` (an import-linter
contract over the first-party plugins installed here), and ``ktcore.sdk.testing.check_op`` catches an op
that disagrees with its role's torch reference."""

from __future__ import annotations

import importlib.util
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ktcore
from ktcore.sdk import KLinearTorch
from ktcore.sdk.testing import check_op, quantized_moe_weights, quantized_sample

PLUGINS = ("kt_cpu_amx", "kt_cuda", "kt_rocm", "kt_xpu", "kt_ascend")
PUBLIC = {"ktcore.sdk", "ktcore.hookspecs"}


def test_plugins_import_only_public_names(tmp_path):
    installed = [p for p in PLUGINS if importlib.util.find_spec(p) is not None]
    if not installed:
        pytest.skip("no first-party plugin is installed")
    internal = sorted(f"ktcore.{m.name}" for m in pkgutil.iter_modules(ktcore.__path__) if f"ktcore.{m.name}" not in PUBLIC)
    config = tmp_path / "importlinter.ini"
    config.write_text(
        "[importlinter]\n"
        f"root_packages =\n    ktcore\n" + "".join(f"    {p}\n" for p in installed) +
        "[importlinter:contract:sdk]\n"
        "name = Plugins import ktcore only through ktcore.sdk, ktcore.hookspecs and ktcore itself\n"
        "type = forbidden\n"
        "source_modules =\n" + "".join(f"    {p}\n" for p in installed) +
        "forbidden_modules =\n" + "".join(f"    {m}\n" for m in internal) +
        "allow_indirect_imports = true\n"
    )
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--config", str(config), "--no-cache"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout


def meta_linear(n_in=512, n_out=256):
    with torch.device("meta"):
        return torch.nn.Linear(n_in, n_out, bias=False)


def test_check_op_accepts_a_faithful_op_and_rejects_a_wrong_one():
    weights = {"weight": quantized_sample("Q4_K", (256, 512), seed=3)}
    x = torch.randn(3, 512)

    class KLinearHalf(KLinearTorch):  # same result in float16 compute: within the default tolerance
        name = "KLinearHalf"

    assert check_op(KLinearHalf, meta_linear(), weights, x, dtype="float16") < 1e-2

    class KLinearNegated(KLinearTorch):  # a bug: the sign of the output flipped
        name = "KLinearNegated"

        def forward(self, x):
            return super().forward(x) * -1

    with pytest.raises(AssertionError, match="KLinearNegated .*relative error 2 > 0.01 against KLinearTorch"):
        check_op(KLinearNegated, meta_linear(), weights, x)


def test_check_op_runs_an_experts_op_against_the_torch_experts():
    from ktcore.testing import tiny_model

    experts = tiny_model("qwen3_moe").model.layers[0].mlp.experts
    with torch.device("meta"):
        module = type(experts)(experts.config if hasattr(experts, "config") else tiny_model("qwen3_moe").config)
    weights = quantized_moe_weights(module.num_experts, module.hidden_dim, module.intermediate_dim, "Q8_0")
    hidden = torch.randn(5, module.hidden_dim)
    index = torch.randint(0, module.num_experts, (5, 2))
    from ktcore.sdk import KExpertsTorch

    assert check_op(KExpertsTorch, module, weights, hidden, index, torch.full((5, 2), 0.5)) < 1e-6
