"""Test tiers for the whole tree (tests/ and plugins/*/tests): markers ``slow``, ``gpu`` and ``peer``
(declared in pyproject.toml). A test that skips without an accelerator, by a vendor marker (``cuda``,
``rocm``, ``xpu``, ``npu``) or a ``skipif`` whose reason says it needs one, is marked ``gpu`` here, so
``-m gpu`` is what the GPU host must run and ``-m "not gpu"`` what a CPU machine runs for real."""

import re

import pytest

ACCELERATOR_MARKERS = ("cuda", "rocm", "xpu", "npu", "gpu")
NEEDS_ACCELERATOR = re.compile(
    r"\b(needs?|requires?|no)\b.*\b(cuda|gpus?|npu|xpu|rocm)\b|\b(cuda|gpu|npu|xpu|rocm)\b.*\b(not available|unavailable)",
    re.IGNORECASE,
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("gpu"):
            continue
        needs = any(item.get_closest_marker(m) for m in ACCELERATOR_MARKERS) or any(
            NEEDS_ACCELERATOR.search(str(m.kwargs.get("reason", ""))) for m in item.iter_markers("skipif"))
        if needs:
            item.add_marker(pytest.mark.gpu)
