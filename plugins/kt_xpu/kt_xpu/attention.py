"""``KAttentionXPU``: ktcore's SDPA attention on an Intel GPU.

torch runs ``scaled_dot_product_attention`` on XPU through oneDNN's fused attention, so the portable op is
the XPU attention; this class gives rule files an XPU-only name whose ``available()`` checks the XPU."""

from __future__ import annotations

from ktcore.builtin import KAttentionSDPA

from ._env import xpu_unavailable_reason


class KAttentionXPU(KAttentionSDPA):
    name = "KAttentionXPU"
    devices = ("xpu",)

    @classmethod
    def available(cls, device=None) -> str | None:
        return xpu_unavailable_reason(device)
