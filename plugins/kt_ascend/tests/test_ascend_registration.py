"""What runs on every machine: the entry point, the registered ops, their available() reasons and the
shipped rule files. On a machine without torch_npu the reasons say so."""

import importlib.metadata
import importlib.util
from pathlib import Path

import pytest
import torch
import yaml

import kt_ascend._env as env
from kt_ascend.experts import KExpertsAscend
from kt_ascend.linear import KLinearAscend
from kt_ascend.plugin import RULE_DIR
from ktcore.registry import OpUnavailableError, Registry
from ktcore.rules import RuleError, load_rules

OPS = {"linear": "KLinearAscend", "experts": "KExpertsAscend", "attention": "KAttentionAscend"}
HAS_TORCH_NPU = importlib.util.find_spec("torch_npu") is not None


@pytest.fixture(scope="module")
def registry():
    return Registry(builtin=True, entrypoints=True)


def test_entry_point_is_declared():
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="ktcore")}
    assert eps["ascend"].value == "kt_ascend.plugin"
    assert eps["ascend"].dist.name == "kt-ascend"


def test_registry_finds_the_plugin_its_ops_and_rule_dir(registry):
    info = registry.plugins["ascend"]
    assert info.distribution.startswith("kt-ascend ")
    assert {(op.role, op.name) for op in info.ops} == set(OPS.items())
    for role, name in OPS.items():
        assert registry.get(role, name).plugin == "ascend"
        assert registry.get(role, name).devices == ("npu",)
    assert RULE_DIR in info.rule_dirs and sorted(RULE_DIR.glob("*.yaml"))


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


def test_resolving_for_the_cpu_names_the_op_and_its_devices(registry):
    with pytest.raises(OpUnavailableError, match="op 'KLinearAscend' \\(plugin 'ascend'\\) runs on npu, not on 'cpu'"):
        registry.resolve("linear", "KLinearAscend", "cpu")


def rule_files():
    return sorted(RULE_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", rule_files(), ids=lambda p: p.name)
def test_rule_files_name_only_registered_ops(path, registry):
    ops = set()
    for rule in yaml.safe_load(path.read_text()):
        kwargs = rule["replace"].get("kwargs") or {}
        ops.update(kwargs[k] for k in ("op", "prefill_op", "generate_op") if k in kwargs)
    assert ops, f"{path.name} names no op"
    known = set(registry.ops())
    assert ops <= known, f"{path.name}: unknown ops {sorted(ops - known)}"


@pytest.mark.skipif(HAS_TORCH_NPU, reason="torch_npu is installed here: the npu device name parses")
@pytest.mark.parametrize("path", rule_files(), ids=lambda p: p.name)
def test_rule_files_are_rejected_here_with_the_file_line_and_device(path, registry):
    with pytest.raises(RuleError) as err:
        load_rules(path, registry)
    first = err.value.issues[0]
    assert first.file == str(path) and first.line > 0
    assert first.field.endswith("device") and "'npu'" in first.message  # names the device it cannot parse


@pytest.mark.parametrize("path", rule_files(), ids=lambda p: p.name)
def test_rule_files_cover_their_family(path, registry, tmp_path):
    """Every rule of the file matches a module of the family's tiny model. 'npu' does not parse without
    torch_npu, so the check runs on a copy that names the built-in ops on another device type."""
    from ktcore.inject import build_meta_model, inject
    from ktcore.testing import tiny_config

    family = path.name.rsplit("-gpu", 1)[0]
    text = path.read_text().replace("device: npu", "device: xpu").replace("out_device: npu", "out_device: xpu")
    text = text.replace("KLinearAscend", "KLinearTorch").replace("KExpertsAscend", "KExpertsTorch")
    text = text.replace("KAttentionAscend", "KAttentionSDPA")
    copy = tmp_path / path.name
    copy.write_text(text)
    rules = load_rules(copy, registry, check_devices=False)
    report = inject(build_meta_model(tiny_config(family)), rules, registry)
    assert len(report) > 0


@pytest.mark.skipif(HAS_TORCH_NPU, reason="torch_npu is installed here")
def test_building_an_op_for_the_npu_without_torch_npu_says_why():
    from torch import nn

    with torch.device("meta"):
        module = nn.Linear(64, 64)
    with pytest.raises(RuntimeError, match="torch_npu is not installed"):
        KLinearAscend(module, "npu:0")
