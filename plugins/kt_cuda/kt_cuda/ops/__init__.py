"""The op classes this plugin registers."""

from .experts_gpu import KExpertsGPU
from .linear_fp8 import KLinearFP8
from .linear_marlin import KLinearMarlin

__all__ = ["KExpertsGPU", "KLinearFP8", "KLinearMarlin"]
