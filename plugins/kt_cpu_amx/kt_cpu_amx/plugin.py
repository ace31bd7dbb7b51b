"""The ``ktcore`` entry point of kt-cpu-amx: its ops and its rule files."""

from pathlib import Path

from ktcore.hookspecs import hookimpl

RULE_DIR = Path(__file__).parent / "rule_files"


@hookimpl
def register_linear_ops(register):
    from .ops import KLinearCPU

    register(KLinearCPU)


@hookimpl
def register_experts_ops(register):
    from .ops import KExpertsCPU

    register(KExpertsCPU)


@hookimpl
def register_rule_dirs(register):
    register(RULE_DIR)
