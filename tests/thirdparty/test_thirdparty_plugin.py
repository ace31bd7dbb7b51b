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
import json, sys
import torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM, LlamaConfig
from ktcore import get_registry, load_model
from ktcore.weights.state_dict import StateDictSource

registry = get_registry()  # the process-wide one: built-in plugin plus installed entry points
op = registry.get("linear", "KLinearExample")
config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
torch.manual_seed(0)
reference = AutoModelForCausalLM.from_config(config).eval()
model, report = load_model(StateDictSource(reference), sys.argv[1], progress=False)
ids = torch.tensor([[1, 5, 9, 33, 2]])
with torch.no_grad():
    diff = (model(ids).logits - reference(ids).logits).abs().max().item()
import kt_example_plugin
print(json.dumps({"plugin": op.plugin, "module": op.__module__, "calls": kt_example_plugin.KLinearExample.calls,
                  "rows": len(report.rows), "ops": sorted({r.prefill_op for r in report.rows}), "max_diff": diff,
                  "file": kt_example_plugin.__file__}))
'''

RULES = r"""
- match:
    name: "^model\\.layers\\.\\d+\\.(mlp|self_attn)\\.\\w+_proj$"
    class: linear
  replace:
    class: KLinear
    kwargs:
      op: KLinearExample
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


def test_pip_installed_plugin_op_is_selected_by_a_rule_file(tmp_path):
    python = make_venv(tmp_path / "venv")
    plugin_copy = tmp_path / "kt_example_plugin"  # build outside the source tree (no build/ or egg-info there)
    shutil.copytree(PLUGIN_DIR, plugin_copy)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    str(plugin_copy)], check=True, timeout=300)
    rules = tmp_path / "example-rules.yaml"
    rules.write_text(textwrap.dedent(RULES))
    result = subprocess.run([str(python), "-c", SCRIPT, str(rules)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["plugin"] == "example" and data["module"] == "kt_example_plugin"
    assert str(tmp_path / "venv") in data["file"]  # imported from the scratch venv's install
    assert data["ops"] == ["KLinearExample"] and data["rows"] == 2 * 7  # q,k,v,o + gate,up,down per layer
    assert data["calls"] == 2 * 7  # one prefill pass through every wrapped projection
    assert data["max_diff"] < 1e-5

    # the running interpreter does not have it: the plugin lives only in the scratch environment
    from ktcore.registry import Registry

    assert "example" not in Registry().plugins
