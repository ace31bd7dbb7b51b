"""kt-cuda's int4 autotuning keeps its choices on disk: a fresh process (a new ``TuneCache``) takes the stored
choice without timing again. Needs a CUDA GPU (Triton's interpreter does not tune)."""

from __future__ import annotations

import json

import pytest
import torch

from kt_cuda import int4
from kt_cuda._env import cuda_unavailable_reason

pytestmark = pytest.mark.skipif(cuda_unavailable_reason() is not None,
                                reason=f"autotuning times kernels on a CUDA GPU: {cuda_unavailable_reason()}")


def test_tuned_config_is_stored_and_reused_by_a_new_process(tmp_path, monkeypatch):
    from kt_cuda import triton_int4

    monkeypatch.setenv("KTCORE_CACHE", str(tmp_path))
    monkeypatch.setenv("KT_CUDA_AUTOTUNE", "1")
    monkeypatch.setattr(triton_int4, "_TUNE_CACHES", {})
    w = int4.quantize(torch.randn(4096, 2048), 32, symmetric=False).to("cuda")
    x = torch.randn(1, 2048, device="cuda", dtype=torch.float16)
    chosen = triton_int4.tuned_config(x, w, None)
    assert chosen in triton_int4.candidates(1, 32)
    (path,) = (tmp_path / "autotune").glob("kt-cuda-int4-*.json")
    assert torch.cuda.get_device_name().replace(" ", "_") in path.name
    assert list(json.loads(path.read_text()).values()) == [chosen.__dict__]

    monkeypatch.setattr(triton_int4, "_TUNE_CACHES", {})  # what a new process starts with
    timed = []
    real_launch = triton_int4._launch
    monkeypatch.setattr(triton_int4, "_launch", lambda *a: timed.append(a[-1]) or real_launch(*a))
    assert triton_int4.tuned_config(x, w, None) == chosen
    assert timed == []  # read from disk, nothing timed
    torch.testing.assert_close(triton_int4.int4_matmul(x, w), real_launch(x, w, None, chosen))
