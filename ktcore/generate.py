"""Text generation over any causal LM (plain Transformers or injected): the pieces every caller shares, and
``Generator``, a synchronous client of the engine (``ktcore.engine``) for one request at a time.

- ``new_cache(model, max_context)``: a paged KV cache (``ktcore.engine.paged_cache``) for one sequence;
- ``forward_step(model, input_ids, cache, logits_to_keep)``: one model call that appends to such a cache;
- ``Sampler``: turns one row of logits into a token id (greedy, temperature, top-k, top-p, penalty, seed);
- ``TextStream``: turns token ids into text deltas that never change once emitted;
- ``Generator``: one request at a time through the engine, plus ``score`` for teacher forcing.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache

from .engine.paged_cache import ContextOverflowError, new_cache

# End-of-turn markers of common chat templates: generating one ends the reply even when the GGUF's
# eos id names another token (e.g. Gemma's <eos> versus <end_of_turn>). Llama 3.1's <|eom_id|> and GPT-OSS's
# <|call|> end a turn that made a tool call (the caller answers it), <|return|> GPT-OSS's final answer.
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<|end▁of▁sentence|>",
                      "<|eom_id|>", "<|call|>", "<|return|>")


def cache_length(cache: Cache) -> int:
    return int(cache.get_seq_length())


# ---------------------------------------------------------------------------------------------- model calls


def model_device(model) -> torch.device:
    """Where the token ids go: the device of the input embedding."""
    try:
        return model.get_input_embeddings().weight.device
    except AttributeError:
        return next(model.parameters()).device


@torch.inference_mode()
def forward_step(model, input_ids: torch.Tensor, cache: Cache, logits_to_keep: int = 1) -> torch.Tensor:
    """Run ``input_ids`` ``[B, T]`` after what ``cache`` holds; append their keys/values to ``cache``.

    Returns float32 logits ``[B, logits_to_keep, V]`` (``logits_to_keep=0``: all ``T`` positions).
    Positions follow from the cache length, so consecutive calls continue one sequence.
    """
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=logits_to_keep, **{_cache_kwarg(model): cache})
    return out.logits.float()


def _cache_kwarg(model) -> str:
    """Transformers renamed ``past_key_values`` to ``cache`` (the old name still works, with a warning)."""
    name = getattr(model, "_ktcore_cache_kwarg", None)
    if name is None:
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        try:
            model._ktcore_cache_kwarg = name
        except AttributeError:
            pass
    return name


# ---------------------------------------------------------------------------------------------- sampling


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. ``temperature <= 0`` means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    # -- for agents (the server's tools / response_format / logprobs); the defaults change nothing
    constraint: object | None = None  # ktcore.constrained.Constraint: only tokens its grammar allows
    logprobs: int | None = None  # record the sampled token's log-probability and this many top alternatives
    skip_special_tokens: bool = True  # False: special tokens' text stays in the reply (tool-call markers)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")


@dataclass
class TokenLogprob:
    """A sampled token's log-probability under the logits the sampler was given (before repetition penalty,
    temperature, top-k/top-p and any grammar), with the ``top`` most likely ``(id, logprob)``."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


class Sampler:
    """Picks the next token from a logits row; owns the random generator so a seed reproduces a run."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = torch.Generator()
        self.rng.manual_seed(params.seed if params.seed is not None else torch.seed())
        self.grammar = params.constraint.start() if params.constraint is not None else None
        self.last_logprobs: TokenLogprob | None = None  # of the last token, when params.logprobs is set

    def __call__(self, logits: torch.Tensor, context_ids: torch.Tensor | None = None) -> int:
        """``logits`` ``[V]``; ``context_ids`` the ids seen so far (for the repetition penalty)."""
        logits = logits.float().cpu()
        raw = logits
        if self.grammar is not None:
            logits = self.grammar.mask(logits)
        token = self._pick(logits, context_ids)
        if self.grammar is not None:
            self.grammar.accept(token)
        if self.params.logprobs is not None:
            self.last_logprobs = _logprobs(raw, token, self.params.logprobs)
        return token

    def _pick(self, logits: torch.Tensor, context_ids: torch.Tensor | None) -> int:
        p = self.params
        if p.temperature <= 0 and (p.repetition_penalty == 1.0 or context_ids is None):
            # numpy's argmax over the same memory (no copy): one thread, SIMD, no OpenMP region (torch's
            # argmax of a vocabulary-sized row starts one, ~0.1 ms); the same first index of the maximum
            return int(logits.contiguous().numpy().argmax())
        if p.repetition_penalty != 1.0 and context_ids is not None and context_ids.numel():
            # CTRL-style penalty as in Transformers: shrink the logit of every token already seen.
            seen = context_ids.unique().cpu()
            picked = logits[seen]
            logits = logits.clone()
            logits[seen] = torch.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
        best = logits.max()
        if p.temperature <= 0 or not torch.isfinite(best):  # greedy; or nothing is allowed, or NaN logits
            return int(logits.argmax())
        # shifted so the best is 0 before scaling: a tiny temperature cannot overflow finite logits to inf
        logits = (logits - best) / p.temperature
        if 0 < p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = sorted_logits.softmax(-1)
            # Drop a token when the tokens before it already reach top_p. The best always stays: a top_p
            # below float32's smallest number compares as 0 and would otherwise drop every token.
            drop_sorted = (probs.cumsum(-1) - probs) >= p.top_p
            drop_sorted[0] = False
            logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
        if p.min_p > 0.0:  # of the temperature-scaled distribution, as top_p; the best token's logit is 0 here
            logits = logits.masked_fill(logits < math.log(p.min_p), float("-inf"))
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.rng))


def _logprobs(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    logprobs = logits.log_softmax(-1)
    best = torch.topk(logprobs, min(top, logprobs.numel())) if top else None
    pairs = [] if best is None else [(int(i), float(v)) for v, i in zip(best.values, best.indices)]
    return TokenLogprob(token, float(logprobs[token]), pairs)


# ---------------------------------------------------------------------------------------------- text


class TextStream:
    """Token ids in, stable text out.

    A token may end in the middle of a UTF-8 character, and some tokenizers change how a piece reads
    depending on what precedes it; so each new token is decoded together with a few tokens before it and
    only the text past those is emitted, and nothing is emitted while the tail is an incomplete character.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is left undecided at the end (an incomplete character shows as U+FFFD)."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :]


# ---------------------------------------------------------------------------------------------- generator


def encode_prompt(tokenizer, prompt_or_messages) -> list[int]:
    """A string is tokenized as is (with the tokenizer's BOS); a list of ``{"role", "content"}`` messages
    goes through the tokenizer's chat template with the assistant prompt appended."""
    if isinstance(prompt_or_messages, str):
        return list(tokenizer(prompt_or_messages)["input_ids"])
    if tokenizer.chat_template is None:
        raise ValueError("this model's tokenizer has no chat template; pass a plain prompt string")
    text = tokenizer.apply_chat_template(list(prompt_or_messages), add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class Timing:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    cached_tokens: int = 0  # prompt tokens restored from the prefix store instead of computed

    @property
    def prefill_tok_s(self) -> float:
        """Prompt tokens computed per second (restored ones are not)."""
        computed = self.prompt_tokens - self.cached_tokens
        return computed / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second of the decode steps (the first token comes out of the prefill)."""
        steps = self.generated_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0

    def summary(self) -> str:
        cached = f" ({self.cached_tokens} cached)" if self.cached_tokens else ""
        return (
            f"prompt {self.prompt_tokens} tok{cached}, {self.prefill_tok_s:.1f} tok/s | "
            f"generated {self.generated_tokens} tok, {self.decode_tok_s:.1f} tok/s"
        )


@dataclass
class Delta:
    """A piece of the reply. The last delta of a request has ``finish_reason`` ("stop" or "length") and
    ``timing``; its ``text`` may be empty."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    timing: Timing | None = None


class Generator:
    """Generates for one request at a time over ``model``: a synchronous client of the engine
    (``ktcore.engine.core.EngineCore``, one running sequence, a paged KV cache of ``max_context`` positions).

    ``prefill_chunk`` bounds how many prompt tokens go through the model in one call (activation memory).
    ``prefix_store``: a ``ktcore.prefix_cache.PrefixStore`` that keeps the blocks of earlier requests, so a
    prompt that starts like an earlier one (the next turn of a chat) prefills only what is new (``None`` or
    ``False``: none, so repeated prompts are computed again, as benchmarks want; see ``keep_prefixes``).

    ``block_size``: tokens per KV-cache block (default: the engine's); a prefix store's blocks must match it.

    ``cuda_graph``: decode steps replay CUDA graphs (``ktcore.decode_graphs``). ``None`` (default): on
    wherever the model runs on a CUDA device and every op of its decode path allows capture, else eager,
    with the reason logged once (``graph_problem`` holds it); ``False``: always eager. May be changed
    between requests.
    """

    def __init__(self, model, tokenizer, max_context: int = 4096, prefill_chunk: int = 512,
                 cuda_graph: bool | None = None, prefix_store=None, block_size: int | None = None):
        from .engine.core import EngineCore

        self.model = model
        self.tokenizer = tokenizer
        self.max_context = int(max_context)
        self.prefill_chunk = int(prefill_chunk)
        self.device = model_device(model)
        self.engine = EngineCore(model, tokenizer, max_context=self.max_context, max_concurrency=1,
                                 prefill_chunk=self.prefill_chunk, cuda_graph=cuda_graph,
                                 prefix_store=prefix_store or None,
                                 **({"block_size": block_size} if block_size else {}))
        self.cache = self.engine.cache
        self.eos_token_ids = self.engine.eos_ids
        self.last_sequence = None  # the engine's record of the last request (restored / prefilled positions)

    def keep_prefixes(self, store=None) -> None:
        """Keep the blocks of every request in ``store`` (a ``PrefixStore``; default: CPU RAM of the prefix
        cache's default budget) from now on (``kt chat``: each turn prefills only what the conversation so far
        did not compute); a model whose cache holds recurrent state (Qwen3-Next) cannot, and keeps computing
        every prompt."""
        if self.engine.cache.state_layers:
            return
        from .cli.prefix_options import DEFAULT_RAM
        from .placement import parse_size
        from .prefix_cache import PrefixStore

        block = self.engine.cache.block_size
        if store is None:
            store = PrefixStore(ram_bytes=parse_size(DEFAULT_RAM), device=self.device, block_size=block)
        if store.block_size != block:
            raise ValueError(f"the prefix cache's block ({store.block_size} tokens, --prefix-block) must be the "
                             f"KV cache's block ({block} tokens)")
        self.engine.set_prefix_store(store)

    @property
    def cuda_graph(self) -> bool | None:
        return self.engine.runner.cuda_graph

    @cuda_graph.setter
    def cuda_graph(self, value: bool | None) -> None:
        self.engine.runner.cuda_graph = value

    @property
    def graph_problem(self) -> str | None:
        """Why decode steps run eagerly on this CUDA model (``None``: they replay graphs, or not decided yet)."""
        return self.engine.runner.graph_problem

    @property
    def fused_problem(self) -> str | None:
        """Why CPU decode steps run module by module (``None``: fused, or not decided yet)."""
        return self.engine.runner.fused_problem

    def encode(self, prompt_or_messages) -> list[int]:
        return encode_prompt(self.tokenizer, prompt_or_messages)

    # -- the cache's one sequence, outside the engine's requests

    @torch.inference_mode()
    def _solo(self):
        if self.engine.has_work:
            raise RuntimeError("a request is still running on this Generator")
        self.cache.reset()

    def decode_step(self, step_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, 1, V]`` for ``step_ids`` ``[B, 1]`` after what the cache's one sequence holds (filled by
        ``forward_step(model, ids, generator.cache)``), appending to it: fused layers on the CPU where an op
        offers them, else an eager ``forward_step``."""
        if step_ids.shape[0] == 1 and self.cache.is_initialized:
            fused = self.engine.runner.fused_runner()
            if fused is not None:
                return fused.step(step_ids)
        return forward_step(self.model, step_ids, self.cache)

    @torch.inference_mode()
    def score(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Teacher forcing: float32 log-probabilities ``[len(token_ids), V]``; row ``i`` is the model's
        distribution for the token after ``token_ids[: i + 1]``."""
        if len(token_ids) > self.max_context:
            raise ContextOverflowError(f"{len(token_ids)} tokens do not fit in max_context={self.max_context}")
        self._solo()
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)
        rows = []
        for start in range(0, ids.shape[1], self.prefill_chunk):
            logits = forward_step(self.model, ids[:, start : start + self.prefill_chunk], self.cache, logits_to_keep=0)
            rows.append(logits[0].log_softmax(-1).cpu())
        self.cache.reset()
        return torch.cat(rows)

    # -- generation

    def _run(self, prompt_ids: Sequence[int], params: SamplingParams, text: bool):
        """Drive the engine for one request: yields the sequence after each token (``self.last_timing`` filled)."""
        prompt_ids = list(prompt_ids)
        seq = self.engine.new_sequence(prompt_ids, params, text=text)
        self.last_sequence = seq
        timing = self.last_timing = Timing(prompt_tokens=len(prompt_ids))
        if seq.finished:
            return
        self._solo()
        t0 = time.perf_counter()
        self.engine.add(seq)
        try:
            while not seq.finished:
                self.engine.step()
                if not seq.generated:
                    continue
                now = time.perf_counter()
                if len(seq.generated) == 1:
                    timing.prefill_s, t1 = now - t0, now
                    timing.cached_tokens = seq.restored
                timing.generated_tokens = len(seq.generated)
                timing.decode_s = now - t1
                yield seq
        finally:
            if not seq.finished:  # the caller stopped early
                self.engine.finish(seq, "cancelled")

    def generate_ids(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[int]:
        """Token ids as they are sampled, stopping at an end token or ``max_new_tokens`` (stop strings are
        the text layer's business). ``self.last_timing`` is filled as it goes."""
        for seq in self._run(prompt_ids, params, text=False):
            yield seq.generated[-1]

    def generate(self, prompt_or_messages, params: SamplingParams | None = None) -> Iterator[Delta]:
        """Stream the reply as text deltas; the last delta carries ``finish_reason`` and ``timing``.

        Text is emitted only once it is stable: complete UTF-8 characters, and never a tail that might
        still become a stop string (a matched stop string is not part of the output)."""
        params = params or SamplingParams()
        prompt_ids = self.encode(prompt_or_messages)
        pending: list[int] = []
        seq = None
        for seq in self._run(prompt_ids, params, text=True):
            pending.append(seq.generated[-1])
            if seq.finished:
                break
            text = seq.take_text()
            if text:
                yield Delta(text, pending)
                pending = []
        tail = seq.take_text() if seq is not None else ""
        finish = "length" if seq is None else seq.finish_reason
        yield Delta(tail, pending, finish_reason=finish, timing=self.last_timing)

    def complete(self, prompt_or_messages, params: SamplingParams | None = None) -> tuple[str, Delta]:
        """The whole reply at once, with the final delta (finish reason and timing)."""
        parts = []
        for delta in self.generate(prompt_or_messages, params):
            parts.append(delta.text)
        return "".join(parts), delta
