"""Model calls over the paged cache: prefill chunks of one or several sequences (one forward, rows padded to the
longest), and a decode step of a batch, the latter
through a captured CUDA graph per batch bucket (``ktcore.decode_graphs``), or on the CPU through fused decoder
layers (``ktcore.fused_decode``: one sequence in a contiguous run of blocks by ``step``, a batch or a scattered
sequence by ``step_batch``), where they apply; else an eager forward."""

from __future__ import annotations

import torch

from ..generate import _cache_kwarg
from .paged_cache import PagedCache, SeqKV
from .step_profile import phase


class ModelRunner:
    """``cuda_graph``: ``None`` graphs wherever the model runs on CUDA and allows capture; ``False`` never."""

    def __init__(self, model, cache: PagedCache, device: torch.device, max_context: int, max_batch: int,
                 cuda_graph: bool | None = None):
        self.model, self.cache, self.device = model, cache, device
        self.max_context, self.max_batch = int(max_context), int(max_batch)
        self.cuda_graph = cuda_graph
        self._kwarg = _cache_kwarg(model)
        self._graphs = None
        self._fused = None
        self.tokens_fed = 0  # positions fed through the model (prefill and decode)

    # -- plans built once, declined with a reason logged once

    def _plan(self, attr: str, build, what: str):
        plan = getattr(self, attr)
        if plan is None:
            from ..decode_graphs import log_once

            plan = build()
            setattr(self, attr, plan)
            if plan.problem is not None:
                log_once(f"{what} off: {plan.problem}")
        return plan if plan.problem is None else None

    def graph_runner(self):
        if self.cuda_graph is False or self.device.type != "cuda":
            return None
        from ..decode_graphs import DecodeGraphs

        return self._plan("_graphs", lambda: DecodeGraphs(self.model, self.cache, self.max_context, self.device,
                                                          self._kwarg, self.max_batch), "CUDA graphs")

    @property
    def graph_problem(self) -> str | None:
        return None if self._graphs is None else self._graphs.problem

    def fused_runner(self):
        if self.device.type != "cpu":
            return None
        from ..fused_decode import FusedDecode

        return self._plan("_fused", lambda: FusedDecode(self.model, self.cache), "fused decode")

    @property
    def fused_problem(self) -> str | None:
        return None if self._fused is None else self._fused.problem

    # -- calls

    @property
    def prefill_batch_problem(self) -> str | None:
        """Why prefill chunks of several sequences cannot share one forward; ``None`` when they can."""
        if self.cache.state_layers:
            return (f"{type(self.model).__name__} keeps recurrent state (linear attention) that pad tokens would "
                    "advance")
        return None

    @torch.inference_mode()
    def forward(self, token_ids: list[list[int]], kvs: list[SeqKV]) -> torch.Tensor:
        """Eager forward of ``token_ids`` (one list per row; rows of different lengths are padded, see
        ``PagedCache.plan_step``) after what each ``kv`` holds (blocks reserved); float32 logits ``[B, V]`` of each
        row's last token; the lengths advance."""
        rows = [(kv, len(ids)) for kv, ids in zip(kvs, token_ids)]
        new = max(n for _, n in rows)
        keep = 1
        if any(n != new for _, n in rows):
            if self.prefill_batch_problem is not None:
                raise ValueError(f"rows of different lengths in one forward: {self.prefill_batch_problem}")
            token_ids = [ids + [ids[-1]] * (new - len(ids)) for ids in token_ids]
            keep = torch.tensor([[n - 1] for _, n in rows], dtype=torch.long, device=self.device)
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        mask, positions = self.cache.plan_step(rows, self.device)
        try:
            kwargs = {self._kwarg: self.cache}
            if mask is not None:
                kwargs.update(attention_mask=mask, position_ids=positions)
            with phase("model forward"):
                out = self.model(input_ids=ids, use_cache=True, logits_to_keep=keep, **kwargs)
        except BaseException:
            self.cache.abort_step()
            raise
        self.cache.end_step(rows)
        self.tokens_fed += sum(n for _, n in rows)
        return out.logits[:, -1].float()

    def decode(self, tokens: list[int], kvs: list[SeqKV]) -> torch.Tensor:
        """Logits ``[B, V]`` of one new token per sequence (blocks reserved)."""
        graphs = self.graph_runner()
        if graphs is not None:
            logits = graphs.step(tokens, kvs)
            if logits is not None:
                self.tokens_fed += len(tokens)
                return logits
        # the fused plan points into the pools, which the first forward allocates
        fused = self.fused_runner() if self.cache.is_initialized else None
        if fused is not None:
            start = self.cache.contiguous_start(kvs[0]) if len(kvs) == 1 else None
            if start is not None:
                kv = kvs[0]
                logits = fused.step(torch.tensor([tokens], dtype=torch.long), position=kv.length,
                                    slot_offset=start)[:, -1]
            elif fused.batch_problem is None:
                logits = fused.step_batch(tokens, [kv.length for kv in kvs], [kv.blocks for kv in kvs])
            else:
                from ..decode_graphs import log_once

                log_once(f"fused batched decode off: {fused.batch_problem}")
                logits = None
            if logits is not None:
                for kv in kvs:
                    kv.length += 1
                self.tokens_fed += len(kvs)
                return logits
        return self.forward([[t] for t in tokens], kvs)
