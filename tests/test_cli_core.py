"""``kt``: the dispatcher, ``kt plugins`` and ``kt rules check``/``list``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import ktcore.registry as registry_module
from core_test_helpers import seeded_model, tiny_llama_config
from ktcore.cli import main

RULES = r"""
- match: {name: "^model\\.layers\\.\\d+\\.mlp\\.(gate|up)_proj$", class: linear}
  replace: {class: KLinear, kwargs: {prefill_op: KLinearTest, generate_op: KLinearTestB}}
- match: {name: "^lm_head$"}
  replace: {class: default, device: cpu}
"""


@pytest.fixture
def use_registry(monkeypatch, registry):
    """Make the test registry the process-wide one the CLI uses."""
    monkeypatch.setattr(registry_module, "_REGISTRY", registry)
    return registry


@pytest.fixture
def config_dir(tmp_path):
    directory = tmp_path / "tiny-llama"
    tiny_llama_config().save_pretrained(directory)
    return directory


def test_help_teaches_with_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "kt rules check my-rules.yaml --model" in out
    assert "plugins" in out and "rules" in out
    with pytest.raises(SystemExit):
        main(["rules", "check", "--help"])
    out = capsys.readouterr().out
    assert "--any-device" in out and "kt rules check --model qwen3_moe" in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: kt" in capsys.readouterr().out


def test_plugins_lists_ops_and_why_they_cannot_run(use_registry, capsys):
    use_registry.problems.append("plugin 'broken' (kt-broken 1.0) failed to import: ImportError: no libfoo")
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "testplugin" in out
    assert "KLinearTest" in out and "runs here on cpu" in out
    line = next(x for x in out.splitlines() if "KLinearNeverHere" in x)
    assert "CANNOT RUN HERE" in line and "FooBar instruction set" in line
    assert "problems:" in out and "no libfoo" in out

    assert main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    ops = {op["name"]: op for p in data["plugins"] for op in p["ops"]}
    assert ops["KExpertsTest"]["role"] == "experts" and ops["KExpertsTest"]["runs_on"] == ["cpu"]
    assert ops["KLinearNeverHere"]["refused"] == {"cpu": "this op needs the imaginary FooBar instruction set"}


def test_rules_check_prints_what_each_module_becomes(use_registry, config_dir, write_rules, capsys):
    path = write_rules(RULES)
    assert main(["rules", "check", str(path), "--model", str(config_dir)]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out
    row = next(x for x in out.splitlines() if x.startswith("model.layers.1.mlp.up_proj"))
    assert row.split() == ["model.layers.1.mlp.up_proj", "rules.yaml:1", "KLinear", "KLinearTest", "(testplugin)",
                           "KLinearTestB", "(testplugin)", "cpu"]
    assert any(x.split()[:3] == ["lm_head", "rules.yaml:3", "default"] for x in out.splitlines())
    assert f"rules: {path}" in out
    assert "4 module(s) replaced by wrappers, 1 kept (default)" in out

    assert main(["rules", "check", str(path), "--model", str(config_dir), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["module"] for r in rows} >= {"model.layers.0.mlp.gate_proj", "lm_head"}


def test_rules_check_errors_name_file_line_op_without_traceback(use_registry, config_dir, write_rules, capsys):
    path = write_rules(RULES.replace("generate_op: KLinearTestB", "generate_op: KLinearMarlin"))
    assert main(["rules", "check", str(path), "--model", str(config_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kt rules: error: ")
    assert f"{path}:2" in err and "KLinearMarlin" in err and "pip install kt-cuda" in err
    assert "Traceback" not in err


def test_rules_check_with_a_model_type(use_registry, write_rules, capsys):
    path = write_rules(RULES)
    assert main(["rules", "check", str(path), "--model", "llama"]) == 0  # Transformers' default llama: 32 layers
    out = capsys.readouterr().out
    assert "model.layers.31.mlp.gate_proj" in out
    assert main(["rules", "check", str(path), "--model", "no_such_family"]) == 2
    assert "no_such_family" in capsys.readouterr().err


def test_rules_check_on_a_gguf_file(use_registry, write_rules, tmp_path, capsys):
    gguf_writer = pytest.importorskip("ktcore.weights.gguf_writer", reason="the GGUF writer is not in this tree yet")
    model = seeded_model(tiny_llama_config(hidden_size=256, intermediate_size=256, num_attention_heads=4))
    gguf = tmp_path / "tiny.gguf"
    gguf_writer.write_gguf(model, gguf, {})
    assert main(["rules", "check", str(write_rules(RULES)), "--model", str(gguf)]) == 0
    assert "model.layers.1.mlp.gate_proj" in capsys.readouterr().out


def test_rules_list_shows_plugin_rule_files(use_registry, write_rules, tmp_path, capsys):
    import ktcore

    rule_dir = tmp_path / "vendor_rules"
    rule_dir.mkdir()
    (rule_dir / "llama-cpu.yaml").write_text(RULES)
    (rule_dir / "llama-gpu-cpu.yaml").write_text(RULES.replace("KLinearTestB", "KLinearMarlin"))

    class Dirs:
        @ktcore.hookimpl
        def register_rule_dirs(self, register):
            register(rule_dir)

    use_registry.add_plugin(Dirs(), "vendor")
    assert main(["rules", "list", "--model-type", "llama"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"{rule_dir / 'llama-cpu.yaml'}  usable here" in lines
    assert any(x.startswith(str(rule_dir / "llama-gpu-cpu.yaml")) and "KLinearMarlin" in x for x in lines)


def test_kt_console_script_runs():
    script = Path(sys.executable).parent / "kt"
    if not script.exists():
        pytest.skip(f"no kt console script next to {sys.executable} (ktcore not pip-installed here)")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("ktcore ")
