"""The engine: sequences in, tokens out, one ``step()`` at a time (synchronous; the server runs it on a thread,
``Generator`` drives it from the caller's thread).

A step asks the scheduler for work (admission, preemption, the prefill chunks of one forward, the decode batch), runs the model
over the paged KV cache and samples the next token of every sequence whose pending tokens are all cached.
Sequences that end are taken out; their full blocks go to the prefix store when there is one.
"""

from __future__ import annotations

import logging
import time

import torch

from ..generate import END_OF_TURN_TOKENS, ContextOverflowError, SamplingParams, model_device
from .model_runner import ModelRunner
from .paged_cache import DEFAULT_BLOCK_SIZE, PagedCache
from .prefix import PrefixReuse
from .scheduler import Scheduler
from .sequence import ReplyText, Sequence
from .step_profile import profiled_step

log = logging.getLogger("ktcore.engine")


def end_token_ids(model, tokenizer) -> set[int]:
    """The model's end tokens (generation config, config, tokenizer) and the chat templates' end-of-turn markers."""
    ids: set[int] = set()
    gen_config = getattr(model, "generation_config", None)
    for value in (getattr(gen_config, "eos_token_id", None), getattr(model.config, "eos_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(i) for i in value)
    if tokenizer is not None:
        ids.update(i for i in (_token_id(tokenizer, t) for t in END_OF_TURN_TOKENS) if i is not None)
        end = _token_id(tokenizer, "<|end|>")
        if end is not None and _token_id(tokenizer, "<|channel|>") is not None:
            ids.discard(end)  # harmony (GPT-OSS): <|end|> ends a message, not the reply
    return ids


def _token_id(tokenizer, token: str) -> int | None:
    """``token``'s id, ``None`` when the vocabulary lacks it: one lookup (``get_vocab()`` would build a dict of
    the whole vocabulary, 0.3 s for Gemma's 262k tokens)."""
    i = tokenizer.convert_tokens_to_ids(token)
    if i is None or (i == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None  # a token not in the vocabulary comes back as the unknown token's id
    return int(i)


DEFAULT_KV_TOKENS = 65536  # the default pool holds this many positions, or one full context if that is more


class EngineCore:
    """Continuous batching over ``model``. ``max_context``: most positions of one sequence (prompt + reply);
    ``kv_blocks``: blocks in the paged cache (default: ``max_concurrency`` full contexts, at most
    ``DEFAULT_KV_TOKENS`` positions unless one context needs more; sequences beyond are preempted and
    recomputed); ``prefix_store``: a ``ktcore.prefix_cache.PrefixStore`` that finished sequences' full blocks go
    to and admissions restore from; ``prefill_budget``: most padded positions of one step's prefill forward
    (several sequences' chunks of at most ``prefill_chunk`` each; default ``prefill_chunk``)."""

    def __init__(self, model, tokenizer, *, max_context: int, max_concurrency: int = 8, prefill_chunk: int = 512,
                 block_size: int = DEFAULT_BLOCK_SIZE, kv_blocks: int | None = None, cuda_graph: bool | None = None,
                 prefix_store=None, prefill_budget: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.max_context = int(max_context)
        self.max_concurrency = int(max_concurrency)
        self.device = model_device(model)
        per_sequence = -(-self.max_context // block_size)
        if kv_blocks is None:
            kv_blocks = max(per_sequence, min(per_sequence * self.max_concurrency, DEFAULT_KV_TOKENS // block_size))
        kv_blocks = int(kv_blocks)
        if kv_blocks < per_sequence:
            raise ValueError(f"kv_blocks={kv_blocks} blocks of {block_size} cannot hold one sequence of "
                             f"max_context={self.max_context}; give at least {per_sequence}")
        self.cache = PagedCache(model, kv_blocks, block_size)
        if self.cache.state_layers:
            # recurrent state (Qwen3-Next's linear attention) lives outside the blocks: no prefix reuse (a block's
            # keys alone do not restore the state); kept per sequence where the cache can, else one at a time
            if not self.cache.states_per_sequence and self.max_concurrency > 1:
                log.warning("%s keeps recurrent state per layer: decoding one sequence at a time",
                            type(model).__name__)
                self.max_concurrency = 1
            prefix_store = None
        self.scheduler = Scheduler(self.cache, self.max_concurrency, prefill_chunk, prefill_budget=prefill_budget)
        self.prefix: PrefixReuse | None = None
        self.set_prefix_store(prefix_store)
        self.runner = ModelRunner(model, self.cache, self.device, self.max_context, self.max_concurrency, cuda_graph)
        problem = self.runner.prefill_batch_problem
        if problem is not None and self.max_concurrency > 1:
            from ..decode_graphs import log_once

            log_once(f"batched prefill off (one sequence's chunk per step): {problem}")
            self.scheduler.max_prefill_rows = 1
        self.eos_ids = end_token_ids(model, tokenizer)
        self.steps = 0
        self.max_batch_seen = 0

    def set_prefix_store(self, store) -> None:
        """Reuse prefixes through ``store`` (a ``PrefixStore``; ``None``: stop reusing)."""
        if store is not None and self.cache.state_layers:
            raise ValueError(f"{type(self.model).__name__} keeps recurrent state outside the KV blocks: "
                             "its prefixes cannot be restored from a prefix store")
        self.prefix = PrefixReuse(self.cache, store) if store is not None else None
        self.scheduler.on_admit = self.prefix.restore if self.prefix is not None else None
        self.scheduler.on_preempt = self.prefix.put if self.prefix is not None else None

    # -- requests

    def check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.max_context:
            raise ContextOverflowError(
                f"the prompt has {len(prompt_ids)} tokens and the context holds {self.max_context} "
                "(shorten the prompt or raise --max-context)")

    def new_sequence(self, prompt_ids: list[int], params: SamplingParams, *, text: bool = True,
                     presence_penalty: float = 0.0, frequency_penalty: float = 0.0) -> Sequence:
        """A sequence for ``prompt_ids`` (checked), not yet added. ``text``: decode its reply into text with
        stop strings applied (``seq.take_text()``)."""
        self.check_prompt(prompt_ids)
        budget = min(params.max_new_tokens, self.max_context - len(prompt_ids))
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        reply = ReplyText(self.tokenizer, params.stop, params.skip_special_tokens) if text else None
        seq = Sequence(prompt_ids, params, budget=budget, stop_ids=stop_ids, text=reply,
                       presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
        if budget <= 0:
            seq.finish_reason = "length"
        return seq

    def add(self, seq: Sequence) -> None:
        seq.admitted_ns = time.perf_counter_ns()
        if not seq.finished:
            self.scheduler.add(seq)

    def finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        """End ``seq`` from outside (cancelled, failed) and free its blocks."""
        if seq.finish_reason is None:
            seq.finish_reason, seq.error = reason, error
        self._retire(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting)

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def waiting(self):
        return self.scheduler.waiting

    # -- one step

    @profiled_step
    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Run one step; returns the sequences that got a token (finished ones included, already taken out)."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        sampled = []
        if batch.prefill:
            if self.cache.state_layers and batch.prefill[0][0].kv.length == 0:
                self.cache.reset_state()  # such models prefill one sequence per step
            logits = self.runner.forward([s.tokens[s.kv.length : s.kv.length + n] for s, n in batch.prefill],
                                         [s.kv for s, _ in batch.prefill])
            for (seq, n), row in zip(batch.prefill, logits):
                seq.prefilled += n
                if seq.pending == 0:
                    sampled.append((seq, row))
        if batch.decode:
            seqs = batch.decode
            logits = self.runner.decode([s.tokens[-1] for s in seqs], [s.kv for s in seqs])
            for s in seqs:
                s.prefilled += 1
            sampled += list(zip(seqs, logits))
            self.max_batch_seen = max(self.max_batch_seen, len(seqs))
        self.steps += 1
        now = time.perf_counter_ns()
        out = []
        for seq, row in sampled:
            try:
                seq.accept(seq.sample(row))
            except Exception as exc:  # a sampler fed non-finite logits: that sequence's failure alone
                log.exception("sequence failed")
                seq.finish_reason, seq.error = "error", f"{type(exc).__name__}: {exc}"
            seq.first_token_ns = seq.first_token_ns or now
            seq.last_token_ns = now
            if seq.finished:
                self._retire(seq)
            out.append(seq)
        return out

    def _retire(self, seq: Sequence) -> None:
        if self.prefix is not None and seq.kv.blocks and seq.finish_reason != "error":
            self.prefix.put(seq)
        self.scheduler.remove(seq)

    def abort_all(self, reason: str, error: str | None = None) -> list[Sequence]:
        """End every sequence (a failed step, a shutdown); returns them."""
        seqs = [*self.scheduler.running, *self.scheduler.waiting]
        for seq in seqs:
            seq.finish_reason, seq.error = seq.finish_reason or reason, error
            self.scheduler.remove(seq)
        return seqs
