"""Decode steps through fused decoder layers: the CPU's counterpart of ``decode_graphs``.

A decode step of a small model on a few CPU cores spends more time in Python (about ten module calls and
forty torch ops per layer) than in its kernels. An op whose plugin can run a whole decoder layer natively
offers that through a class attribute ``fuse_decoder_layers(layers, cache_layers)`` (duck-typed, like the
experts' ``submit``/``sync``): given the model's decoder layers and their ``PagedLayer`` caches (block pools,
slots ``[1, heads, slots, dim]``), it returns an object with ``step(hidden, position_embeddings, position,
slot_offset=0)`` that runs every layer on ``hidden`` ``[1, 1, H]`` (float32, contiguous, updated in place) with
what the model's rotary module returns for ``position``, writing each layer's keys and values at slot
``slot_offset + position`` of its pool and attending over slots ``slot_offset .. slot_offset + position``; or a
string saying why it cannot. So the sequence's blocks must be one contiguous run of the pool: the engine's
allocator hands out the lowest free blocks, so a sequence alone (``kt run``, ``kt chat``) always has one; a
sequence whose blocks are scattered decodes through the module path.

The object may also offer ``step_batch(hidden, position_embeddings, positions, tables, block_size)``: B
sequences' tokens together (``hidden`` ``[B, 1, H]``, ``positions`` and ``tables`` int32 ``[B]`` and ``[B,
width]``: each row's blocks, read and written wherever they lie), and ``batch_problem`` (why not, or ``None``).
``FusedDecode.step_batch`` uses it for a CPU batch, and for one sequence whose blocks are scattered.

``FusedDecode`` then runs a step as: embedding -> rotary tables -> the fused layers -> final norm -> head, each
of the first and last a plain module call. Without a position it decodes the cache's one sequence (no plan,
``new_cache``) and advances its lengths. It applies where the model's forward
is exactly that (``PLAIN_CAUSAL_LMS``), for one sequence, on the CPU; else the ``Generator`` calls the model as
usual and logs the reason once. The first op found inside layer 0 that offers ``fuse_decoder_layers`` is asked.
"""

from __future__ import annotations

import torch
from torch import nn

from .engine.step_profile import phase
from .modules import KModule

# Causal LMs whose forward for one new token is: embed_tokens -> rotary_emb -> layers (pre-norm, full
# attention through the cache) -> norm -> lm_head, nothing else (no embedding scale, logit soft-capping, ...).
PLAIN_CAUSAL_LMS = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                              "DeepseekV2ForCausalLM"})


def fusing_provider(layer: nn.Module):
    """``fuse_decoder_layers`` of the first generate op inside ``layer`` that offers it, or ``None``."""
    for module in layer.modules():
        if isinstance(module, KModule) and "generate_op" in module._modules:
            fuse = getattr(type(module._modules["generate_op"]), "fuse_decoder_layers", None)
            if callable(fuse):
                return fuse
    return None


class FusedDecode:
    """Decode steps of ``model`` over ``cache`` through fused layers; ``problem`` says why not (then unused)."""

    def __init__(self, model: nn.Module, cache):
        self.model = model
        self.cache = cache
        self.fused = None
        self.problem = self._plan()
        self._position_ids = torch.zeros((1, 1), dtype=torch.long)

    def _plan(self) -> str | None:
        from .engine.paged_cache import PagedLayer

        model = self.model
        if type(model).__name__ not in PLAIN_CAUSAL_LMS:
            return f"{type(model).__name__} is not among the models fused decoding knows ({sorted(PLAIN_CAUSAL_LMS)})"
        if getattr(model, "_ktcore_transfer_hooks", None):
            return "the model moves layers between devices (transfer_map)"
        base = model.model
        layers = list(base.layers[: model.config.num_hidden_layers])
        if not layers:
            return "the model has no layers"
        cache_layers = list(getattr(self.cache, "layers", ()))
        if len(cache_layers) != len(layers) or any(type(c) is not PagedLayer for c in cache_layers):
            return "the cache is not one full-attention PagedLayer per layer"
        if any(p.device.type != "cpu" for p in model.parameters()):
            return "the model has parameters off the CPU"
        provider = fusing_provider(layers[0])
        if provider is None:
            return "no op of the first decoder layer offers fuse_decoder_layers"
        fused = provider(layers, cache_layers)
        if isinstance(fused, str):
            return fused
        self.fused = fused
        return None

    @property
    def batch_problem(self) -> str | None:
        """Why ``step_batch`` cannot run, or ``None``."""
        if self.fused is None:
            return self.problem
        if not callable(getattr(self.fused, "step_batch", None)):
            return f"{type(self.fused).__name__} has no step_batch"
        return getattr(self.fused, "batch_problem", None)

    @torch.inference_mode()
    def step_batch(self, tokens: list[int], positions: list[int], tables: list[list[int]]) -> torch.Tensor:
        """Logits ``[B, V]`` (float32) of ``tokens[b]`` at ``positions[b]`` of the sequence whose blocks (of the
        cache's ``block_size`` slots) are ``tables[b]``, reserved past that position; the caller advances lengths."""
        base = self.model.model
        block_size = self.cache.block_size
        width = max(len(t) for t in tables)
        for p, t in zip(positions, tables):
            if p >= len(t) * block_size:
                raise ValueError(f"fused decode: position {p} is past the {len(t)} blocks reserved for it")
        table = torch.zeros((len(tables), width), dtype=torch.int32)
        for b, t in enumerate(tables):
            table[b, : len(t)] = torch.tensor(t, dtype=torch.int32)
        position_ids = torch.tensor(positions, dtype=torch.long).view(-1, 1)
        hidden = base.embed_tokens(torch.tensor(tokens, dtype=torch.long).view(-1, 1))
        if hidden.dtype is not torch.float32 or not hidden.is_contiguous():
            hidden = hidden.to(torch.float32).contiguous()
        self.fused.step_batch(hidden, base.rotary_emb(hidden, position_ids), position_ids.view(-1).to(torch.int32),
                              table, block_size)
        return self.model.lm_head(base.norm(hidden)).float()[:, -1]

    @torch.inference_mode()
    def step(self, step_ids: torch.Tensor, position: int | None = None, slot_offset: int = 0) -> torch.Tensor:
        """Logits ``[1, 1, V]`` (float32) for ``step_ids`` ``[1, 1]`` at ``position`` of the sequence whose
        blocks start at slot ``slot_offset`` (the caller advances its length); without ``position``, after what
        the cache's one sequence holds."""
        model, base = self.model, self.model.model
        cache_layers = self.cache.layers
        solo = position is None
        if solo:
            position = cache_layers[0].length
        if slot_offset + position >= cache_layers[0].max_cache_len:
            from .generate import ContextOverflowError

            raise ContextOverflowError(f"the KV cache holds {cache_layers[0].max_cache_len} positions and this call "
                                       f"needs {position + 1} (raise --max-context)")
        with phase("embed + rope"):
            hidden = base.embed_tokens(step_ids)
            if hidden.dtype is not torch.float32 or not hidden.is_contiguous():
                hidden = hidden.to(torch.float32).contiguous()
            self._position_ids.fill_(position)
            rope = base.rotary_emb(hidden, self._position_ids)
        with phase("fused layers"):
            self.fused.step(hidden, rope, position, slot_offset)
        if solo:
            for layer in cache_layers:
                layer.length = position + 1
        with phase("output head"):
            return model.lm_head(base.norm(hidden)).float()
