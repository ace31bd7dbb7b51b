"""The host functions a CUDA stream calls for stream-ordered experts (csrc/host_launch.cpp), called here
directly on the CPU: the job over the MoeLaunch's fixed buffers gives what KExpertsCPU.forward gives."""

from __future__ import annotations

import ctypes

import pytest
import torch
from test_cpu_amx_experts import FakeExperts, H, expert_weights, routing

from kt_cpu_amx.ops import KExpertsCPU
from kt_cpu_amx.runtime import get_runtime, kernels


def _launch(op, x, idx, w, out):
    return kernels().MoeLaunch(get_runtime(), op.layer, x.shape[0], idx.shape[1], x.data_ptr(), idx.data_ptr(),
                               w.data_ptr(), out.data_ptr())


@pytest.mark.parametrize("tokens", (1, 4))
def test_host_functions_run_the_experts(isa, tokens):
    op = KExpertsCPU(FakeExperts())
    op.load(expert_weights("Q4_K"))
    x, idx, w = routing(tokens, seed=tokens)
    out = torch.full((tokens, H), float("nan"))
    launch = _launch(op, x, idx, w, out)
    assert (launch.t, launch.k) == (tokens, idx.shape[1])
    launch.submit()
    launch.sync()
    assert kernels().host_launch_error() == ""
    torch.testing.assert_close(out, op(x, idx, w), rtol=0, atol=0)


def test_function_pointers_are_c_callables(isa):
    """What cuLaunchHostFunc receives: plain C functions of one void* argument."""
    op = KExpertsCPU(FakeExperts())
    op.load(expert_weights("Q8_0"))
    x, idx, w = routing(2, seed=5)
    out = torch.zeros(2, H)
    launch = _launch(op, x, idx, w, out)
    host_fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    host_fn(kernels().moe_launch_submit_fn)(launch.address)
    host_fn(kernels().moe_launch_sync_fn)(launch.address)
    torch.testing.assert_close(out, op(x, idx, w), rtol=0, atol=0)


def test_launch_checks_sizes_and_sync_without_job_is_harmless(isa):
    op = KExpertsCPU(FakeExperts())
    op.load(expert_weights("Q8_0"))
    with pytest.raises(ValueError, match="t >= 1"):
        kernels().MoeLaunch(get_runtime(), op.layer, 0, 2, 0, 0, 0, 0)
    kernels().host_launch_error()  # start clean
    x, idx, w = routing(1, seed=2)
    out = torch.zeros(1, H)
    bad = _launch(op, x, idx, w, out)
    bad.sync()  # no job in flight: returns at once, records nothing
    assert kernels().host_launch_error() == ""



def test_stream_drop_forgets_an_unsynced_submit():
    """What a failed graph capture leaves behind: KExperts.drop_pending reaches the op through stream_drop."""
    from types import SimpleNamespace

    from kt_cpu_amx.host_launch import StreamExperts

    from ktcore.modules import KExperts

    op = KExpertsCPU(FakeExperts())
    op.stream_drop()  # nothing submitted yet: a no-op
    op._stream = StreamExperts(op.name, H)
    op._stream._pending = ("buffers", torch.float32)  # as stream_submit leaves it
    wrapper = SimpleNamespace(_pending=(op, None, None, True), ops=lambda: [op])
    KExperts.drop_pending(wrapper)
    assert wrapper._pending is None and op._stream._pending is None
    with pytest.raises(RuntimeError, match="stream sync without submit"):
        op.stream_sync()
