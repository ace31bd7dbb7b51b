"""Routed experts enqueued on a CUDA stream: no host-side wait, and capturable into a CUDA graph.

``StreamExperts.submit`` queues, on the current CUDA stream: the copies of the hidden states, expert ids
and weights into pinned host buffers, then a host function (``kt_moe_launch_submit``, C++, no Python, no
GIL) that starts the experts' job on the CPU pool. The caller then queues its own GPU work (the shared
experts), and ``StreamExperts.sync`` queues the host function that waits for the pool and the copy of the
output back to the GPU. The CUDA driver runs the host functions in stream order, so the GPU work between
them overlaps the CPU experts, and Python never waits.

The CUDA calls go through the driver library (``libcuda.so.1``: ``cuLaunchHostFunc``, ``cuMemcpy*Async``)
with ctypes, so the extension itself builds with a plain C++ compiler. Errors inside a host function
cannot be raised there: ``raise_host_error()`` raises the first one after the stream was synchronized.
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch

from .runtime import kernels

# Most tokens per call that take the stream path (decode batches); larger calls (prefill) use submit/sync.
STREAM_MAX_TOKENS = 16


@cache
def _driver():
    """``libcuda`` with the three entry points typed, or the reason it cannot be used (a string)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        return f"the CUDA driver library did not load ({exc})"
    lib.cuLaunchHostFunc.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.cuMemcpyDtoHAsync_v2.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]
    lib.cuMemcpyHtoDAsync_v2.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    for fn in (lib.cuLaunchHostFunc, lib.cuMemcpyDtoHAsync_v2, lib.cuMemcpyHtoDAsync_v2, lib.cuGetErrorName):
        fn.restype = ctypes.c_int
    return lib


def unavailable_reason(device: torch.device) -> str | None:
    """``None`` when experts can be enqueued on ``device``'s streams, else why not."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"stream-ordered experts need a CUDA device (got {device})"
    if torch.version.hip is not None:
        return "stream-ordered experts use the CUDA driver API, not HIP"
    lib = _driver()
    if isinstance(lib, str):
        return lib
    if not hasattr(kernels(), "moe_launch_submit_fn"):
        return "the kt_cpu_amx extension was built without host_launch.cpp (reinstall it)"
    return None


def _check(lib, status: int, what: str) -> None:
    if status != 0:
        name = ctypes.c_char_p()
        lib.cuGetErrorName(status, ctypes.byref(name))
        raise RuntimeError(f"kt_cpu_amx: {what} failed: {(name.value or b'?').decode()} ({status})")


def raise_host_error() -> None:
    """Raise the first error a host function met (call it after the stream was synchronized)."""
    if not hasattr(kernels(), "host_launch_error"):
        return
    error = kernels().host_launch_error()
    if error:
        raise RuntimeError(error)


class _Buffers:
    """Pinned host buffers, the device output buffer and the C++ job for ``T`` tokens of one layer.
    Never freed while the op lives: a captured graph holds their addresses."""

    def __init__(self, runtime, layer, T: int, K: int, hidden: int, device: torch.device):
        pinned = dict(device="cpu", pin_memory=True)
        self.x = torch.empty(T, hidden, dtype=torch.float32, **pinned)
        self.idx = torch.empty(T, K, dtype=torch.int64, **pinned)
        self.w = torch.empty(T, K, dtype=torch.float32, **pinned)
        self.out = torch.empty(T, hidden, dtype=torch.float32, **pinned)
        self.out_device = torch.empty(T, hidden, dtype=torch.float32, device=device)
        self.launch = kernels().MoeLaunch(runtime, layer, T, K, self.x.data_ptr(), self.idx.data_ptr(),
                                          self.w.data_ptr(), self.out.data_ptr())


class StreamExperts:
    """The stream-ordered path of one ``KExpertsCPU`` (its runtime and packed layer)."""

    def __init__(self, name: str, hidden_dim: int):
        self.name = name
        self.hidden_dim = hidden_dim
        self._buffers: dict[tuple[int, int, torch.device], _Buffers] = {}
        self._pending: tuple[_Buffers, torch.dtype] | None = None

    def submit(self, runtime, layer, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
               top_k_weights: torch.Tensor) -> None:
        if self._pending is not None:
            raise RuntimeError(f"{self.name}: stream submit while a previous one was not synced")
        T, K = top_k_index.shape
        if hidden_states.shape != (T, self.hidden_dim) or top_k_weights.shape != (T, K):
            raise ValueError(f"{self.name}: expected hidden [T, {self.hidden_dim}], top_k_index and top_k_weights "
                             f"[T, K]; got {tuple(hidden_states.shape)}, {tuple(top_k_index.shape)}, "
                             f"{tuple(top_k_weights.shape)}")
        device = hidden_states.device
        key = (T, K, device)
        bufs = self._buffers.get(key)
        if bufs is None:
            bufs = self._buffers[key] = _Buffers(runtime, layer, T, K, self.hidden_dim, device)
        lib = _driver()
        stream = ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)
        # the sources are new tensors of this call: the caching allocator keeps them until the stream
        # passed this point, and a graph keeps them in its pool
        for host, src in ((bufs.x, hidden_states.to(torch.float32).contiguous()),
                          (bufs.idx, top_k_index.to(torch.int64).contiguous()),
                          (bufs.w, top_k_weights.to(torch.float32).contiguous())):
            _check(lib, lib.cuMemcpyDtoHAsync_v2(host.data_ptr(), src.data_ptr(), host.nbytes, stream),
                   "copy to the host")
        _check(lib, lib.cuLaunchHostFunc(stream, kernels().moe_launch_submit_fn, bufs.launch.address),
               "launching the experts' submit")
        self._pending = (bufs, hidden_states.dtype)

    def sync(self) -> torch.Tensor:
        if self._pending is None:
            raise RuntimeError(f"{self.name}: stream sync without submit")
        bufs, dtype = self._pending
        self._pending = None
        lib = _driver()
        device = bufs.out_device.device
        stream = ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)
        _check(lib, lib.cuLaunchHostFunc(stream, kernels().moe_launch_sync_fn, bufs.launch.address),
               "launching the experts' sync")
        _check(lib, lib.cuMemcpyHtoDAsync_v2(bufs.out_device.data_ptr(), bufs.out.data_ptr(), bufs.out.nbytes,
                                             stream), "copy to the device")
        return bufs.out_device.to(dtype)

    def drop_pending(self) -> None:
        self._pending = None
