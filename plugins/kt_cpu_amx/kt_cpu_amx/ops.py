"""The ops: ``KLinearCPU`` (linear role) and ``KExpertsCPU`` (experts role)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ktcore.sdk import Op, check_shape, gated_experts_dims

from . import fusion, repack
from .runtime import DECODE_ROWS, get_runtime, select_isa, share_cores, torch_decode_threads, unavailable_reason


def _cpu_reason(name: str, device) -> str | None:
    if device is not None and torch.device(device).type != "cpu":
        return f"{name} runs on the CPU only (asked for {device})"
    why = unavailable_reason()
    if why:
        return why
    try:  # a KT_CPU_ISA that this CPU cannot run is reported here, not at the first forward
        select_isa()
    except (ValueError, RuntimeError) as exc:
        return str(exc)
    return None


class KLinearCPU(Op):
    """``x @ W.T + b`` with W kept quantized (see ``repack``). Options: ``threads`` (default
    ``KT_CPU_THREADS`` or all CPUs), ``isa`` (default ``KT_CPU_ISA`` or the best), ``online_quant``
    (``int8``/``int4``, for float or non-exact GGML weights)."""

    name = "KLinearCPU"
    role = "linear"
    devices = ("cpu",)
    ggml_types = repack.STORED_TYPES  # kept as stored (repacked exactly, or as blocks the kernels decode: i-quants, MXFP4, IQ4_NL, TQ2_0); others dequantized, then quantized online

    def __init__(self, module: nn.Module, device="cpu", threads=None, isa=None, online_quant="int8", **kwargs):
        super().__init__(module, device, **kwargs)
        self.in_features = module.in_features
        self.out_features = module.out_features
        self.threads, self.isa = threads, isa
        self.float_bits = repack.online_bits(online_quant)
        self.weight = None
        self._runtime = None  # resolved on first use (KT_CPU_ISA / KT_CPU_THREADS read then)
        self._torch_threads = None
        self._siblings = None  # fusion.Siblings: the declared group of linears on the same input
        self._bias = None  # the bias buffer, also held here (a buffer lookup goes through nn.Module.__getattr__)
        self._exact = False  # the output head: int8 activations plus their residual at every call (Runtime.act_residual)
        self.register_buffer("bias", None, persistent=False)

    @classmethod
    def available(cls, device=None) -> str | None:
        return _cpu_reason(cls.name, device)

    def load(self, weights: Mapping[str, "QuantizedTensor"]) -> None:  # noqa: F821
        if "weight" not in weights:
            raise KeyError(f"{self.name}: no 'weight' tensor given (got {sorted(weights)})")
        qt = weights["weight"]
        check_shape(self.name, qt, (self.out_features, self.in_features))
        if self.in_features % 32:
            raise ValueError(f"{self.name}: tensor '{qt.name}' has {self.in_features} inputs, not a multiple of 32")
        self.ggml_type = qt.ggml_type
        (self.weight,) = repack.pack_matrices(qt, self.float_bits, get_runtime(self.threads, self.isa))
        if weights.get("bias") is not None:
            self.bias = repack.to_float32(weights["bias"]).reshape(self.out_features).clone()
        self._bias = self._buffers["bias"]
        if self._siblings is not None:
            self._siblings.reset()

    def declare_output_head(self) -> None:
        """The logits pick each token: on the integer-dot path this op's calls of any size take the activations'
        int8 rounding residual too (other linears only when prefill-sized; see Runtime.act_residual)."""
        self._exact = True

    def declare_siblings(self, siblings: list) -> None:
        """Decode-sized calls of the ``KLinearCPU`` ops among ``siblings`` run as one fused call (fusion.py)."""
        group = [op for op in siblings if isinstance(op, KLinearCPU)]
        if len(group) < 2 or self not in group:
            self._siblings = None
            return
        leader = group[0]  # one Siblings object for the group, whoever is declared first
        shared = leader._siblings if leader is not self else None
        if shared is None or shared.ops != group:
            shared = fusion.Siblings(group)
        self._siblings = shared

    def _resolve_runtime(self):
        if self.weight is None:
            raise RuntimeError(f"{self.name}: forward before load()")
        self._runtime = get_runtime(self.threads, self.isa)
        self._torch_threads = torch_decode_threads(self._runtime.threads)
        return self._runtime

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # decode calls this hundreds of times per token: no copy, conversion or lookup it can do without
        in_features = self.in_features
        if x.shape[-1] != in_features:
            raise ValueError(f"{self.name}: input has {x.shape[-1]} features, expected {in_features}")
        runtime = self._runtime
        if runtime is None:
            runtime = self._resolve_runtime()
        rows = x.numel() // in_features
        siblings = self._siblings if 0 < rows <= DECODE_ROWS else None
        if siblings is not None:
            if siblings.active:
                y = siblings.take(self, x)
                if y is not None:
                    return y
            if not siblings.active:
                siblings = None
        x2 = x if x.dtype is torch.float32 and x.is_cpu else x.to(device="cpu", dtype=torch.float32)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        share_cores(rows, self._torch_threads)
        if siblings is not None and siblings.plan(runtime):
            return siblings.compute(self, x, x2, rows, runtime)
        y = torch.empty((*x.shape[:-1], self.out_features), dtype=torch.float32)
        if rows:
            runtime.linear(self.weight, rows, x2.data_ptr(), y.data_ptr(), self._exact)
        return self._finish(y, x.dtype)

    @staticmethod
    def fuse_decoder_layers(layers: list, cache_layers: list):
        """Whole decoder layers in one native call per decode step, or why not (see ``decoder.py``)."""
        from .decoder import fuse_decoder_layers

        return fuse_decoder_layers(layers, cache_layers)

    def _finish(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self._bias is not None:
            y += self._bias
        return y if dtype is torch.float32 else y.to(dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, type={getattr(self, 'ggml_type', None)}"


def _cpu_contiguous(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as a contiguous CPU tensor of ``dtype``, without a call into torch when it already is one."""
    if t.dtype is not dtype or not t.is_cpu:
        t = t.to(device="cpu", dtype=dtype)
    return t if t.is_contiguous() else t.contiguous()


def _activation_name(module: nn.Module) -> str:
    act = getattr(module, "act_fn", None)
    kind = type(act).__name__.lower()
    if isinstance(act, nn.SiLU) or kind in ("silu", "siluactivation"):
        return "silu"
    if "gelu" in kind and ("tanh" in kind or "new" in kind or getattr(act, "approximate", "") == "tanh"):
        return "gelu_tanh"
    raise ValueError(f"KExpertsCPU: activation {type(act).__name__} of {type(module).__name__} is not supported "
                     "(SiLU, GELU-tanh)")


class KExpertsCPU(Op):
    """The routed experts of one MoE layer, fused per token group on the CPU pool.

    ``submit(hidden, top_k_index, top_k_weights)`` starts the work and returns at once, so the caller can
    run shared experts or attention on a GPU meanwhile; ``sync()`` returns the ``[T, H]`` output.
    ``forward`` is both. Options as ``KLinearCPU``.
    """

    name = "KExpertsCPU"
    role = "experts"
    devices = ("cpu",)
    ggml_types = repack.STORED_TYPES

    def __init__(self, module: nn.Module, device="cpu", threads=None, isa=None, online_quant="int8", **kwargs):
        super().__init__(module, device, **kwargs)
        self.num_experts, self.hidden_dim, self.intermediate_dim = gated_experts_dims(self.name, module)
        self.activation = _activation_name(module)
        self.threads, self.isa = threads, isa
        self.float_bits = repack.online_bits(online_quant)
        self.layer = None
        self._pending = None
        self._runtime = None  # resolved on first use (KT_CPU_ISA / KT_CPU_THREADS read then)
        self._torch_threads = None

    @classmethod
    def available(cls, device=None) -> str | None:
        return _cpu_reason(cls.name, device)

    def load(self, weights: Mapping[str, "QuantizedTensor"]) -> None:  # noqa: F821
        E, H, I = self.num_experts, self.hidden_dim, self.intermediate_dim
        packed = {}
        for name, shape in (("gate_proj", (E, I, H)), ("up_proj", (E, I, H)), ("down_proj", (E, H, I))):
            if name not in weights:
                raise KeyError(f"{self.name}: no '{name}' tensor given (got {sorted(weights)})")
            check_shape(self.name, weights[name], shape)
            packed[name] = repack.pack_matrices(weights[name], self.float_bits, get_runtime(self.threads, self.isa))
        self.ggml_types_loaded = {n: weights[n].ggml_type for n in packed}
        self.layer = repack.kernels().MoeLayer(packed["gate_proj"], packed["up_proj"], packed["down_proj"],
                                               self.activation)

    def _prepare(self, hidden_states, top_k_index, top_k_weights):
        """``(runtime, x, idx, w, out)``: float32/int64 contiguous CPU tensors, shapes checked."""
        if self.layer is None:
            raise RuntimeError(f"{self.name}: submit before load()")
        T = hidden_states.shape[0]
        x = _cpu_contiguous(hidden_states, torch.float32)
        idx = _cpu_contiguous(top_k_index, torch.int64)
        w = _cpu_contiguous(top_k_weights, torch.float32)
        if x.shape != (T, self.hidden_dim) or idx.shape[0] != T or w.shape != idx.shape:
            raise ValueError(f"{self.name}: expected hidden [T, {self.hidden_dim}], top_k_index and top_k_weights "
                             f"[T, K]; got {tuple(hidden_states.shape)}, {tuple(top_k_index.shape)}, "
                             f"{tuple(top_k_weights.shape)}")
        out = torch.empty(T, self.hidden_dim, dtype=torch.float32)
        if self._runtime is None:
            self._runtime = get_runtime(self.threads, self.isa)
            self._torch_threads = torch_decode_threads(self._runtime.threads)
        return self._runtime, x, idx, w, out

    def submit(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        if self._pending is not None:
            raise RuntimeError(f"{self.name}: submit while a previous submit was not synced")
        rt, x, idx, w, out = self._prepare(hidden_states, top_k_index, top_k_weights)
        # the tensors stay referenced until sync(): the pool reads and writes them meanwhile
        self._pending = (rt, x, idx, w, out, hidden_states.dtype, hidden_states.device)
        if x.shape[0]:
            rt.moe_submit(self.layer, x.shape[0], idx.shape[1], x.data_ptr(), idx.data_ptr(), w.data_ptr(),
                          out.data_ptr())

    def sync(self) -> torch.Tensor:
        if self._pending is None:
            raise RuntimeError(f"{self.name}: sync without submit")
        rt, _x, _idx, _w, out, dtype, device = self._pending
        try:
            rt.sync()
        finally:
            self._pending = None
        return out if dtype is torch.float32 and device.type == "cpu" else out.to(device=device, dtype=dtype)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        # submit + sync, but on the calling thread: no hand-off to the pool's controller
        if self._pending is not None:
            raise RuntimeError(f"{self.name}: forward while a submit was not synced")
        rt, x, idx, w, out = self._prepare(hidden_states, top_k_index, top_k_weights)
        share_cores(x.shape[0], self._torch_threads)
        if x.shape[0]:
            rt.moe(self.layer, x.shape[0], idx.shape[1], x.data_ptr(), idx.data_ptr(), w.data_ptr(), out.data_ptr())
        if hidden_states.dtype is torch.float32 and hidden_states.is_cpu:
            return out
        return out.to(device=hidden_states.device, dtype=hidden_states.dtype)

    # -- stream-ordered contract (decode on a CUDA device, capturable into a CUDA graph): host_launch.py

    graph_capturable = True

    def stream_problem(self, device, tokens: int) -> str | None:
        """``None`` when ``stream_submit``/``stream_sync`` can take ``tokens`` tokens living on ``device``."""
        from . import host_launch

        if tokens > host_launch.STREAM_MAX_TOKENS:
            return f"{self.name}: {tokens} tokens per call take the submit/sync path"
        return host_launch.unavailable_reason(torch.device(device))

    def stream_submit(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        """Queue the experts on the current CUDA stream (inputs stay on the GPU); ``stream_sync`` queues the
        wait and returns the output on the GPU. Neither waits on the host."""
        from .host_launch import StreamExperts

        if self.layer is None:
            raise RuntimeError(f"{self.name}: stream_submit before load()")
        if self._runtime is None:
            self._runtime = get_runtime(self.threads, self.isa)
        if getattr(self, "_stream", None) is None:
            self._stream = StreamExperts(self.name, self.hidden_dim)
        self._stream.submit(self._runtime, self.layer, hidden_states, top_k_index, top_k_weights)

    def stream_sync(self) -> torch.Tensor:
        if getattr(self, "_stream", None) is None:
            raise RuntimeError(f"{self.name}: stream_sync without stream_submit")
        return self._stream.sync()

    def stream_drop(self) -> None:
        """Forget a ``stream_submit`` whose ``stream_sync`` will never come (a failed graph capture)."""
        if getattr(self, "_stream", None) is not None:
            self._stream.drop_pending()

    @staticmethod
    def raise_stream_error() -> None:
        """Raise what a host function of an earlier stream-ordered call met (the stream synchronized since)."""
        from .host_launch import raise_host_error

        raise_host_error()

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
                f"intermediate_dim={self.intermediate_dim}, act={self.activation}")
