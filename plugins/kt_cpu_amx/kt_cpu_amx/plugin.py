"""The ``ktcore`` entry point of kt-cpu-amx: its backends of ``KLinearCPU``, ``KExpertsCPU`` and ``KExpertsGptOssCPU``, which the
shipped rule files' ``cpu`` (and ``gpu-cpu``) layouts name, so installing it speeds up every model."""

from ktcore.hookspecs import hookimpl


@hookimpl
def register_linear_ops(register):
    from .ops import KLinearCPU

    register(KLinearCPU)


@hookimpl
def register_experts_ops(register):
    from .gpt_oss import KExpertsGptOssCPU
    from .ops import KExpertsCPU

    register(KExpertsCPU)
    register(KExpertsGptOssCPU)
