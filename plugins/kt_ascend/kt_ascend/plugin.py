"""The ``ktcore`` entry point of kt-ascend: its ops and its rule files."""

from __future__ import annotations

from pathlib import Path

from ktcore.hookspecs import hookimpl

from ._env import _import_torch_npu
from .attention import KAttentionAscend
from .experts import KExpertsAscend
from .linear import KLinearAscend

RULE_DIR = Path(__file__).parent / "rule_files"

# torch.device("npu") parses only after torch_npu has registered the device name, and rule files name
# that device: import it now when it is installed (a failure is kept and reported by available()).
_import_torch_npu()


@hookimpl
def register_linear_ops(register):
    register(KLinearAscend)


@hookimpl
def register_experts_ops(register):
    register(KExpertsAscend)


@hookimpl
def register_attention_ops(register):
    register(KAttentionAscend)


@hookimpl
def register_rule_dirs(register):
    register(RULE_DIR)
