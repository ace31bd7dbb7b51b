"""Breaks the contract on purpose: a hook name no ktcore hookspec defines (``register_linear_opz``)."""

import ktcore
from ktcore.sdk import KLinearTorch


class KLinearTypo(KLinearTorch):
    name = "KLinearTypo"


@ktcore.hookimpl
def register_linear_opz(register):
    register(KLinearTypo)
