"""A third-party plugin, installed with pip into its own environment, is found through its entry point
and its op is selected by name from a rule file; no ktcore file is edited for it."""

from __future__ import annotations

import json
import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

PLUGIN_DIR = Path(__file__).parent / "kt_example_plugin"

SCRIPT = r'''
import io, json, sys
from contextlib import redirect_stdout
import torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM, LlamaConfig
from ktcore import get_registry, load_model
from ktcore.cli import main
from ktcore.weights.state_dict import StateDictSource

registry = get_registry()  # the process-wide one: built-in plugin plus installed entry points
op = registry.get("linear", "KLinearExample")
config = LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
torch.manual_seed(0)
reference = AutoModelForCausalLM.from_config(config).eval()
out = {"plugin": op.plugin, "module": op.__module__, "problems": registry.problems,
       "loaded": sorted(registry.plugins)}
for rules in sys.argv[1:]:
    op.calls = 0
    model, report = load_model(StateDictSource(reference), rules, progress=False)
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    with torch.no_grad():
        expected = reference(ids).logits
        rel = ((model(ids).logits - expected).norm() / expected.norm()).item()
    out[rules] = {"calls": op.calls, "rel": rel, "files": report.rule_files,
                  "rows": [[r.module, r.rule, r.generate_op, r.generate_backend] for r in report.rows]}
text = io.StringIO()
with redirect_stdout(text):
    main(["plugins"])
out["kt_plugins"] = text.getvalue()
import kt_example_plugin
out["file"] = kt_example_plugin.__file__
print(json.dumps(out))
'''

# the plugin's own op, named in a rule file of its own
RULES = r"""
- match:
    name: "^model\\.layers\\.\\d+\\.(mlp|self_attn)\\.\\w+_proj$"
    class: linear
  replace:
    class: KLinear
    kwargs:
      op: KLinearExample
"""

# one rule over the shipped default: the MLP projections on the plugin's backend of KLinearCPU, pinned
LAYERED = r"""
- extends: default
- match:
    name: "^model\\.layers\\.\\d+\\.mlp\\.\\w+_proj$"
  replace:
    class: KLinear
    kwargs:
      op: KLinearCPU
      backend: kt-example-plugin
"""


def make_venv(path: Path) -> Path:
    """A scratch venv that sees the running interpreter's packages (ktcore, torch, pip, setuptools).

    ``--system-site-packages`` only reaches the *base* interpreter's packages when the running one is itself
    a venv, so a .pth file also adds the running interpreter's site directories (processing their own .pth
    files, e.g. ktcore's editable-install finder)."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(path)], check=True)
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(path), "platbase": str(path)}))
    parents = [p for p in site.getsitepackages() + [site.getusersitepackages()] if Path(p).is_dir()]
    purelib.joinpath("_parent_site.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in parents)
    )
    return path / "bin" / "python"


def test_pip_installed_plugin_is_loaded_checked_and_selected(tmp_path):
    python = make_venv(tmp_path / "venv")
    plugin_copy = tmp_path / "kt_example_plugin"  # build outside the source tree (no build/ or egg-info there)
    shutil.copytree(PLUGIN_DIR, plugin_copy)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    str(plugin_copy)], check=True, timeout=300)
    own, layered = tmp_path / "example-rules.yaml", tmp_path / "one-rule.yaml"
    own.write_text(textwrap.dedent(RULES))
    layered.write_text(textwrap.dedent(LAYERED))
    result = subprocess.run([str(python), "-c", SCRIPT, str(own), str(layered)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["plugin"] == "example" and data["module"] == "kt_example_plugin"
    assert str(tmp_path / "venv") in data["file"]  # imported from the scratch venv's install

    # the contract: the misspelled hook and the raising hook are reported, those plugins are not loaded,
    # the example plugin (same distribution) and every other plugin are
    assert "example" in data["loaded"] and "torch" in data["loaded"]
    assert "example_typo" not in data["loaded"] and "example_raises" not in data["loaded"]
    typo = next(p for p in data["problems"] if "example_typo" in p)
    assert "'register_linear_opz' (did you mean 'register_linear_ops'?)" in typo
    raises = next(p for p in data["problems"] if "example_raises" in p)
    assert "OSError: libexample_vendor.so" in raises
    assert "problems:" in data["kt_plugins"] and "register_linear_opz" in data["kt_plugins"]
    assert "libexample_vendor.so" in data["kt_plugins"]

    # its own op from its own rule file (modules no rule names stay Transformers modules)
    run = data[str(own)]
    assert {r[2] for r in run["rows"]} == {"KLinearExample"} and len(run["rows"]) == 2 * 7  # q,k,v,o + gate,up,down
    assert run["calls"] == 2 * 7 and run["rel"] < 1e-5  # one prefill pass through every wrapped projection

    # one rule extending the shipped default: it decides the MLP projections (pinned to the plugin's backend
    # of KLinearCPU), the shipped llama-cpu.yaml decides the rest, each row naming its file and line
    run = data[str(layered)]
    assert run["files"] == [str(layered), run["files"][1]] and run["files"][1].endswith("llama-cpu.yaml")
    rows = {r[0]: r for r in run["rows"]}
    assert rows["model.layers.1.mlp.up_proj"][1:] == [f"{layered}:3", "KLinearCPU", "example"]
    q = rows["model.layers.1.self_attn.q_proj"]
    assert q[1].startswith(run["files"][1] + ":") and q[2] == "KLinearCPU" and q[3] != "example"
    assert rows["model.layers.0.self_attn"][1].startswith(run["files"][1] + ":")
    assert run["calls"] == 2 * 3
    assert run["rel"] < 5e-2  # the other linears on the installed CPU backend (kt-cpu-amx rounds activations)

    # the running interpreter does not have it: the plugin lives only in the scratch environment
    from ktcore.registry import Registry

    assert "example" not in Registry().plugins
