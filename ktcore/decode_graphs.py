"""CUDA-graph capture of the decode step (one token per sequence) over the paged KV cache.

A decode step through an injected model is hundreds of small kernels, each launched from Python; captured
once into a CUDA graph, a step is one ``replay()``. ``DecodeGraphs`` does that for the engine's decode batches:

- one graph per (batch bucket, attended length), captured on first use: the batch is padded up to a power of
  two (at most the engine's ``max_batch``), the length is the smallest power of two >= 256 (at most
  ``max_context``, a whole number of blocks) that covers every row's position;
- static inputs: token ids ``[Bb, 1]``, positions ``[Bb]`` and block tables ``[Bb, length / block_size]``
  (padded rows and blocks name the cache's scratch block); inside the graph the slots are computed from the
  tables (``PagedCache.graph_plan``), the new keys written at each row's position (``index_copy_``), each row's
  slots gathered right-padded to the length, and a 4-D mask hides the slots past its position;
- routed experts on the CPU take their stream-ordered path (``KExperts.stream_path``): copies to pinned
  memory and host functions inside the graph, no Python.

Capture needs every op of the decode path to declare ``graph_capturable`` (see ``ktcore.ops.Op`` and
docs/ARCHITECTURE.md) and every cache layer to be full attention (the graph hands attention its own mask);
``capture_problem`` says what is missing, and the engine then stays eager and logs the reason once. A capture
that fails anyway (a module with a host read) is logged the same way.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .modules import KAttention, KExperts, KModule, is_stream_experts_op
from .ops import Op

log = logging.getLogger("ktcore.generate")

MIN_GRAPH_LENGTH = 256
_logged: set[str] = set()


def log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.warning(message)


def graph_length(position: int, max_context: int) -> int:
    """Cache slots a graph for ``position`` attends over (a power of two, at least 256, at most max_context)."""
    length = MIN_GRAPH_LENGTH
    while length <= position:
        length *= 2
    return min(length, max_context)


def batch_bucket(batch: int, max_batch: int) -> int:
    """The batch size a graph is captured for: the smallest power of two >= ``batch`` (at most ``max_batch``)."""
    bucket = 1
    while bucket < batch:
        bucket *= 2
    return max(batch, min(bucket, max_batch))


def same_device(a: torch.device, b: torch.device) -> bool:
    """``a`` and ``b`` name the same device (an index left out means device 0). A graph captures the work
    of one device's stream: work queued on another GPU would run once at capture and never on replay."""
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def op_capture_problem(op: Op, device: torch.device) -> str | None:
    """Why ``op``'s forward (its decode call) cannot be captured on ``device``, or ``None``."""
    if not getattr(op, "graph_capturable", False):
        return f"{op.name} does not declare graph_capturable"
    if same_device(op.device, device):
        return None
    if op.device.type == "cpu" and op.role == "experts" and is_stream_experts_op(op):
        why = op.stream_problem(device, 1)
        return None if why is None else f"{op.name}: {why}"
    return f"{op.name} runs on {op.device}, not on {device} (and has no stream-ordered path)"


def capture_problem(model: nn.Module, cache, device: torch.device) -> str | None:
    """Why the decode step of ``model`` with ``cache`` cannot be captured on ``device``, or ``None``."""
    if device.type != "cuda":
        return f"the model's inputs live on {device}, not on a CUDA device"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return model_capture_problem(model, cache, device)


def model_capture_problem(model: nn.Module, cache, device: torch.device) -> str | None:
    """The model's and cache's part of ``capture_problem`` (no look at the CUDA runtime)."""
    from .engine.paged_cache import PagedLayer

    for i, layer in enumerate(getattr(cache, "layers", ())):
        if type(layer) is not PagedLayer:
            return f"cache layer {i} is {type(layer).__name__} (only full-attention layers are captured)"
    injected_attention = True
    for name, module in model.named_modules():
        if isinstance(module, Op):
            continue
        if isinstance(module, KModule):
            if not module.uses_ops:
                continue
            op = module.pick(1)
            why = op_capture_problem(op, device)
            if why:
                return f"{name or 'model'}: {why}"
            if isinstance(module, KExperts) and op.device.type == "cpu" and not module.stream_ordered:
                return f"{name}: KExperts.stream_ordered is off"
            continue
        if type(module).__name__.endswith("Attention") and not isinstance(module, KAttention):
            injected_attention = False
        for tname, tensor in (*module._parameters.items(), *module._buffers.items()):
            if tensor is not None and not tensor.is_meta and not same_device(tensor.device, device):
                return f"{name}.{tname} lives on {tensor.device}, not on {device}: the step would leave the graph's device"
    impl = getattr(model.config, "_attn_implementation", None)
    if not injected_attention and impl not in ("sdpa", "eager"):
        return f"attention implementation {impl!r} takes no custom mask (sdpa or eager do)"
    return None


def _mask_kind(model: nn.Module) -> torch.dtype | None:
    """``None``: a boolean mask (True = attend); a float dtype: an additive mask (Transformers' eager
    attention adds the mask to the scores)."""
    if getattr(model.config, "_attn_implementation", None) == "eager":
        return model.dtype
    return None


class _Graph:
    """A captured step and every tensor it reads or writes outside its own pool (kept alive here: the
    graph holds their addresses), plus a pinned copy of the logits and an event the host sleeps on."""

    def __init__(self, graph, ids, positions, tables, logits):
        self.graph, self.ids, self.positions, self.tables, self.logits = graph, ids, positions, tables, logits
        self.host_logits = torch.empty(logits.shape, dtype=logits.dtype, pin_memory=True)
        # a blocking event: waiting for the step sleeps instead of spinning on a core the CPU experts use
        self.done = torch.cuda.Event(blocking=True)


class DecodeGraphs:
    """Captured decode steps of one model over one paged cache (``step`` returns ``None`` when it cannot, and
    ``problem`` then says why)."""

    def __init__(self, model: nn.Module, cache, max_context: int, device: torch.device, cache_kwarg: str,
                 max_batch: int = 1):
        self.model, self.cache, self.max_context, self.device = model, cache, int(max_context), device
        self.cache_kwarg = cache_kwarg
        self.max_batch = int(max_batch)
        self.problem = capture_problem(model, cache, device)
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool = None
        self._stream_checks = []
        if self.problem is None:
            prepared = set()
            for module in model.modules():
                if isinstance(module, KModule) and module.uses_ops:
                    for op in module.ops():
                        if id(op) not in prepared:
                            prepared.add(id(op))
                            op.prepare_capture(self.max_context)
                            check = getattr(op, "raise_stream_error", None)
                            if callable(check) and type(op) not in {type(o) for o in self._stream_checks}:
                                self._stream_checks.append(op)

    def static_inputs(self, tokens: list[int], kvs, batch: int, length: int, device) -> tuple[torch.Tensor, ...]:
        """``(ids [batch, 1], positions [batch], tables [batch, length / block_size])`` for the rows ``kvs``
        (their blocks reserved for the new token), padded to ``batch`` rows with the scratch block."""
        cache = self.cache
        scratch = cache.scratch_slot // cache.block_size
        width = -(-length // cache.block_size)
        tables = torch.full((batch, width), scratch, dtype=torch.long)
        positions = torch.zeros(batch, dtype=torch.long)
        ids = torch.zeros((batch, 1), dtype=torch.long)
        for row, (token, kv) in enumerate(zip(tokens, kvs)):
            tables[row, : len(kv.blocks)] = torch.tensor(kv.blocks[:width])
            positions[row] = kv.length
            ids[row, 0] = token
        return ids.to(device), positions.to(device), tables.to(device)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """The captured function: one decode step of every row, from device tensors only."""
        visible = self.cache.graph_plan(positions, tables)
        dtype = _mask_kind(self.model)
        mask = visible[:, None, None, :]
        if dtype is not None:
            mask = torch.zeros(mask.shape, dtype=dtype, device=ids.device).masked_fill(~mask, torch.finfo(dtype).min)
        try:
            out = self.model(input_ids=ids, position_ids=positions[:, None], attention_mask=mask, use_cache=True,
                             logits_to_keep=1, **{self.cache_kwarg: self.cache})
        finally:
            self.cache.abort_step()
        return out.logits.float()

    def _capture(self, ids, positions, tables) -> _Graph:
        dev = self.device
        # warm-up runs (kernel tuning, lazy buffers) are real steps: they write the same cache slots with the
        # same values, so running this step three times instead of once changes nothing
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(ids, positions, tables)
        torch.cuda.current_stream(dev).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(ids, positions, tables)
        return _Graph(graph, ids, positions, tables, logits)

    def _drop_pending(self) -> None:
        for module in self.model.modules():
            if isinstance(module, KExperts):
                module.drop_pending()

    @torch.inference_mode()
    def step(self, tokens: list[int], kvs) -> torch.Tensor | None:
        """Logits ``[B, V]`` of one new token per row (``kvs``: the rows' ``SeqKV``, blocks reserved), their
        lengths advanced; ``None`` if graphs are off or the step does not fit one. The logits are float32 in
        pinned host memory, a buffer the next step overwrites."""
        if self.problem is not None:
            return None
        for op in self._stream_checks:
            op.raise_stream_error()  # from the previous step, which the caller has synchronized with
        if not self.cache.is_initialized:
            return None  # nothing was prefilled yet: the cache has no storage to capture
        rows = len(kvs)
        batch = batch_bucket(rows, self.max_batch)
        length = graph_length(max(kv.length for kv in kvs), self.max_context)
        length = -(-length // self.cache.block_size) * self.cache.block_size
        if any(kv.length >= length for kv in kvs):
            return None  # past the last bucket: the eager step
        ids, positions, tables = self.static_inputs(tokens, kvs, batch, length, self.device)
        entry = self._graphs.get((batch, length))
        if entry is None:
            try:
                entry = self._graphs[(batch, length)] = self._capture(ids, positions, tables)
            except Exception as exc:  # noqa: BLE001 - any failure means: stay eager, say why
                self._drop_pending()
                self.problem = f"capturing the decode step failed: {type(exc).__name__}: {exc}"
                log_once(f"CUDA graphs off: {self.problem}")
                return None
        else:
            entry.ids.copy_(ids, non_blocking=True)
            entry.positions.copy_(positions, non_blocking=True)
            entry.tables.copy_(tables, non_blocking=True)
        entry.graph.replay()
        entry.host_logits.copy_(entry.logits, non_blocking=True)
        entry.done.record()
        entry.done.synchronize()
        for kv in kvs:
            kv.length += 1
        return entry.host_logits[:rows, -1]
