"""Fixtures of the kt_cpu_amx tests: a small unpinned pool, and each ISA path this machine has."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("KT_CPU_THREADS", "2")
os.environ.setdefault("KT_CPU_PIN", "0")  # CI machines are shared: do not pin

from kt_cpu_amx import runtime  # noqa: E402


@pytest.fixture(params=runtime.ISA_ORDER)
def isa(request, monkeypatch):
    """Each ISA path; skipped where this CPU lacks it (the reason says which feature)."""
    why = runtime.unavailable_reason(request.param)
    if why:
        pytest.skip(f"{request.param}: {why}")
    monkeypatch.setenv("KT_CPU_ISA", request.param)
    return request.param
