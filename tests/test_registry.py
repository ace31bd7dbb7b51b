"""The registry: plugins, op table, and errors that name ops, plugins and the pip install that helps."""

from __future__ import annotations

import importlib.metadata
import sys

import pytest
import torch

import ktcore
from core_test_helpers import CountingExperts, CountingLinear, OpsPlugin
from ktcore.registry import (
    DuplicateOpError,
    OpUnavailableError,
    Registry,
    RegistryError,
    UnknownOpError,
    get_registry,
)


def plugin_with(**hooks):
    """A plugin object whose hooks register the given op classes: ``plugin_with(linear=[A, B])``."""

    class Plugin:
        pass

    for role, ops in hooks.items():
        def impl(register, _ops=ops):
            for op in _ops:
                register(op)

        impl.__name__ = f"register_{role}_ops"
        setattr(Plugin, impl.__name__, staticmethod(ktcore.hookimpl(impl)))
    return Plugin()


def make_op(name, role="linear", devices=("cpu",), reason=None):
    return type(name, (ktcore.Op,), {"name": name, "role": role, "devices": devices,
                                      "available": classmethod(lambda cls, device=None: reason)})


def test_ops_are_collected_per_role_with_their_plugin(registry):
    assert set(registry.ops("linear")) == {"KLinearTest", "KLinearTestB", "KLinearNeverHere", "KLinearTestAnyDevice"}
    assert registry.ops("experts") == {"KExpertsTest": CountingExperts}
    assert registry.get("linear", "KLinearTest") is CountingLinear
    assert CountingLinear.plugin == "testplugin"
    assert registry.plugins["testplugin"].ops[0] is CountingLinear


def test_unknown_op_lists_known_ones_and_closest_match(registry):
    with pytest.raises(UnknownOpError) as err:
        registry.get("linear", "KLinearTset")
    message = str(err.value)
    assert "unknown linear op 'KLinearTset'" in message
    assert "Known linear ops: KLinearNeverHere, KLinearTest, KLinearTestAnyDevice, KLinearTestB." in message
    assert "Did you mean 'KLinearTest' (plugin 'testplugin')?" in message


@pytest.mark.parametrize("name, dist", [("KLinearMarlin", "kt-cuda"), ("KExpertsCPU", "kt-cpu-amx"),
                                        ("KLinearXPU", "kt-xpu"), ("KExpertsAscend", "kt-ascend"),
                                        ("KLinearROCm", "kt-rocm")])
def test_first_party_op_not_installed_gives_pip_install(registry, name, dist):
    role = "experts" if name.startswith("KExperts") else "linear"
    with pytest.raises(UnknownOpError, match=f"pip install {dist}"):
        registry.get(role, name)


def test_misspelled_first_party_op_suggests_it_and_its_install(registry):
    with pytest.raises(UnknownOpError) as err:
        registry.get("experts", "KExpertCPU")
    message = str(err.value)
    assert "Did you mean 'KExpertsCPU' (not installed: kt-cpu-amx)?" in message
    assert "pip install kt-cpu-amx" in message


def test_op_of_another_role_is_pointed_out(registry):
    with pytest.raises(UnknownOpError, match="'KExpertsTest' is a experts op \\(plugin 'testplugin'\\)"):
        registry.get("linear", "KExpertsTest")


def test_same_name_from_two_plugins_names_both():
    first = make_op("KLinearShared")
    second = make_op("KLinearShared")
    with pytest.raises(DuplicateOpError) as err:
        Registry(builtin=False, entrypoints=False,
                 plugins={"alpha": plugin_with(linear=[first]), "beta": plugin_with(linear=[second])})
    message = str(err.value)
    assert "'KLinearShared'" in message and "plugin 'alpha'" in message and "plugin 'beta'" in message


def test_same_name_across_roles_is_also_a_duplicate():
    with pytest.raises(DuplicateOpError, match="plugin 'alpha'.*plugin 'beta'"):
        Registry(builtin=False, entrypoints=False,
                 plugins={"alpha": plugin_with(linear=[make_op("KTwice")]),
                          "beta": plugin_with(experts=[make_op("KTwice", role="experts")])})


def test_missing_device_names_device_and_plugin(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    op = make_op("KLinearGPUOnly", devices=("cuda",))
    reg = Registry(builtin=False, entrypoints=False, plugins={"gpuvendor": plugin_with(linear=[op])})
    with pytest.raises(OpUnavailableError) as err:
        reg.resolve("linear", "KLinearGPUOnly", "cuda")
    message = str(err.value)
    assert "device 'cuda'" in message and "torch.cuda.is_available() is False" in message
    assert "plugin 'gpuvendor'" in message and "kt-cuda" in message
    with pytest.raises(OpUnavailableError, match="runs on cuda, not on 'cpu'"):
        reg.resolve("linear", "KLinearGPUOnly", "cpu")


def test_available_reason_is_reported():
    op = make_op("KLinearPicky", reason="this CPU has no AMX")
    reg = Registry(builtin=False, entrypoints=False, plugins={"picky": plugin_with(linear=[op])})
    with pytest.raises(OpUnavailableError, match="'KLinearPicky' cannot run on 'cpu' here: .*picky: this CPU has no AMX"):
        reg.resolve("linear", "KLinearPicky", "cpu")


def test_bad_registrations_name_the_plugin():
    with pytest.raises(RegistryError, match="plugin 'sloppy' registered op 'KWrongRole' \\(role 'experts'\\) through the linear hook"):
        Registry(builtin=False, entrypoints=False, plugins={"sloppy": plugin_with(linear=[make_op("KWrongRole", role="experts")])})
    with pytest.raises(RegistryError, match="plugin 'sloppy'.*must subclass ktcore.Op"):
        Registry(builtin=False, entrypoints=False, plugins={"sloppy": plugin_with(linear=[torch.nn.Linear])})


def test_missing_builtin_plugin_is_tolerated_with_a_clear_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "ktcore.builtin", None)  # import of ktcore.builtin now fails
    reg = Registry(builtin=True, entrypoints=False, plugins={"testplugin": OpsPlugin()})
    assert "torch" not in reg.plugins
    assert any("ktcore.builtin" in p and "not installed" in p for p in reg.problems)
    with pytest.raises(UnknownOpError, match="Note: ktcore's built-in plugin 'torch' \\(ktcore.builtin\\) is not installed"):
        reg.get("linear", "KLinearTorch")


def test_entry_points_load_and_broken_ones_are_reported(monkeypatch, tmp_path):
    (tmp_path / "kt_fake_vendor.py").write_text(
        "import ktcore\n"
        "class KLinearFake(ktcore.Op):\n    name = 'KLinearFake'\n    role = 'linear'\n"
        "@ktcore.hookimpl\ndef register_linear_ops(register):\n    register(KLinearFake)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [importlib.metadata.EntryPoint("fake", "kt_fake_vendor", "ktcore"),
           importlib.metadata.EntryPoint("fake", "kt_fake_vendor", "ktcore"),  # seen twice on sys.path: fine
           importlib.metadata.EntryPoint("broken", "kt_no_such_module_here", "ktcore"),
           importlib.metadata.EntryPoint("fake", "kt_other_vendor", "ktcore")]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: eps if group == "ktcore" else [])
    reg = Registry(builtin=False, entrypoints=True)
    assert reg.get("linear", "KLinearFake").plugin == "fake"
    assert any("plugin 'broken'" in p and "kt_no_such_module_here" in p for p in reg.problems)
    assert any("plugin name 'fake' of kt_other_vendor is skipped" in p for p in reg.problems)
    assert len(reg.problems) == 2


def test_rule_dirs_hook(tmp_path, registry):
    class Dirs:
        @ktcore.hookimpl
        def register_rule_dirs(self, register):
            register(tmp_path)

    registry.add_plugin(Dirs(), "dirs")
    assert registry.rule_dirs() == [tmp_path]
    with pytest.raises(RegistryError, match="'dirs' is already registered"):
        registry.add_plugin(Dirs(), "dirs")


def test_get_registry_is_process_wide(monkeypatch):
    import ktcore.registry as registry_module

    monkeypatch.setattr(registry_module, "_REGISTRY", None)
    first = get_registry()
    assert get_registry() is first and ktcore.get_registry() is first


def test_catalog_matches_the_installed_first_party_plugins():
    """rules/backends.yaml (install hints) names, per first-party plugin, exactly the ops and spellings it
    registers (besides KTransformers' spellings, which ktcore declares)."""
    from ktcore.registry import catalog

    registry = Registry()
    checked = 0
    for entry in catalog():
        info = registry.plugins.get(entry["plugin"])
        if info is None:
            continue
        assert info.distribution.split(" ")[0] == entry["distribution"]
        registered = {b.op for b in info.backends} | set(info.aliases)
        assert set(entry["ops"]) - {"KLinearMarlin", "KExpertsMarlin"} == registered, entry["distribution"]
        assert {d for b in info.backends for d in b.devices} == set(entry["devices"])
        checked += 1
    if not checked:
        pytest.skip("no first-party plugin installed")


# -- backends ---------------------------------------------------------------------------------------------


def backend_op(name, devices, reason=None, preference=0, role="linear"):
    return type(name, (ktcore.Op,), {"name": "KLinearRole", "role": role, "devices": devices, "preference": preference,
                                      "available": classmethod(lambda cls, device=None: reason)})


def test_op_resolves_to_the_preferred_available_backend_and_explains_the_rest():
    fast = backend_op("FastLinear", ("cpu",), reason="this CPU has no AMX", preference=10)
    portable = backend_op("PortableLinear", ())
    reg = Registry(builtin=False, entrypoints=False,
                   plugins={"fast": plugin_with(linear=[fast]), "portable": plugin_with(linear=[portable])})
    assert [b.plugin for b in reg.backends("linear", "KLinearRole")] == ["fast", "portable"]
    resolution = reg.resolution("linear", "KLinearRole", "cpu")
    assert resolution.chosen.cls is portable and reg.resolve("linear", "KLinearRole", "cpu") is portable
    assert resolution.explain() == "KLinearRole -> portable on cpu; fast: this CPU has no AMX"
    # a pinned backend is taken or refused with its own reason, never replaced by another
    with pytest.raises(OpUnavailableError, match="fast: this CPU has no AMX"):
        reg.resolve("linear", "KLinearRole", "cpu", backend="fast")
    with pytest.raises(UnknownOpError, match="has no backend 'nosuch'; its backends here: fast, portable"):
        reg.resolve("linear", "KLinearRole", "cpu", backend="nosuch")
    # without the availability check (a rule file for another machine): the most preferred for the device type
    assert reg.resolution("linear", "KLinearRole", "cpu", check=False).chosen.cls is fast


def test_equal_preference_for_one_device_is_ambiguous_and_names_both():
    with pytest.raises(DuplicateOpError, match="plugin 'alpha'.*plugin 'beta'.*preference"):
        Registry(builtin=False, entrypoints=False,
                 plugins={"alpha": plugin_with(linear=[backend_op("A", ("cpu",))]),
                          "beta": plugin_with(linear=[backend_op("B", ("cpu", "cuda"))])})
    # distinct device types do not collide
    reg = Registry(builtin=False, entrypoints=False,
                   plugins={"alpha": plugin_with(linear=[backend_op("A", ("cpu",))]),
                            "beta": plugin_with(linear=[backend_op("B", ("cuda",))])})
    assert len(reg.backends("linear", "KLinearRole")) == 2


def test_builtin_backs_the_plugin_ops_and_ktransformers_spellings():
    reg = Registry(entrypoints=False)
    for role, op in (("linear", "KLinearCPU"), ("linear", "KLinearGPU"), ("experts", "KExpertsCPU"),
                     ("experts", "KExpertsGPU")):
        resolution = reg.resolution(role, op, "cpu")
        assert resolution.chosen.plugin == "torch" and resolution.chosen.preference < 0, resolution.explain()
    assert reg.canonical("KLinearMarlin") == "KLinearGPU" and reg.canonical("KExpertsMarlin") == "KExpertsGPU"
    assert reg.get("linear", "KLinearMarlin").name == "KLinearTorch"
    assert reg.weight_sources() and {c.__name__ for c in reg.weight_sources()} == {"GGUFSource", "SafetensorsSource"}


def test_misspelled_hook_is_a_problem_and_the_plugin_is_not_loaded():
    class Typo:
        @ktcore.hookimpl
        def register_linear_opz(self, register):
            register(make_op("KLinearTypo"))

    reg = Registry(builtin=False, entrypoints=False)
    assert reg.add_plugin(Typo(), "typo", strict=False) is None
    assert "typo" not in reg.plugins and "KLinearTypo" not in reg.ops()
    (problem,) = reg.problems
    assert "plugin 'typo'" in problem and "'register_linear_opz' (did you mean 'register_linear_ops'?)" in problem
    with pytest.raises(RegistryError, match="register_linear_opz"):  # strict (a plugin handed in by code)
        reg.add_plugin(Typo(), "typo2")


def test_raising_hook_is_isolated_and_registers_nothing():
    class Raises:
        @ktcore.hookimpl
        def register_linear_ops(self, register):
            register(make_op("KLinearHalfway"))

        @ktcore.hookimpl
        def register_experts_ops(self, register):
            raise ImportError("libvendor.so: cannot open shared object file")

    reg = Registry(builtin=False, entrypoints=False, plugins={"good": plugin_with(linear=[make_op("KLinearGood")])})
    assert reg.add_plugin(Raises(), "raises", strict=False) is None
    assert set(reg.ops()) == {"KLinearGood"}  # nothing of the failed plugin, the other one intact
    assert any("plugin 'raises'" in p and "ImportError: libvendor.so" in p for p in reg.problems)
    assert reg.add_plugin(plugin_with(linear=[make_op("KLinearLater")]), "later")  # later plugins still load


def test_weight_sources_and_dequantizers_are_collected_with_the_ops():
    class Source:
        @staticmethod
        def can_open(path):
            return False

    def fast(raw, shape, dtype):
        raise AssertionError("not called")

    class Weights:
        @ktcore.hookimpl
        def register_weight_sources(self, register):
            register(Source)

        @ktcore.hookimpl
        def register_dequantizers(self, register):
            register("Q4_K", "cuda", fast)

    reg = Registry(builtin=False, entrypoints=False, plugins={"w": Weights()})
    assert reg.weight_sources() == [Source] and reg.dequantizers() == [("Q4_K", "cuda", fast)]
