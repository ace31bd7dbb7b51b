"""The ``ktcore`` entry point of kt-ascend: its backends for Ascend NPUs (device type ``npu``) of
``KLinearGPU``, ``KExpertsGPU`` and ``KAttentionSDPA``."""

from __future__ import annotations

from ktcore.hookspecs import hookimpl

from ._env import _import_torch_npu
from .attention import KAttentionAscend
from .experts import KExpertsAscend
from .linear import KLinearAscend

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

