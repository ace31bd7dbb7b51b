"""Text generation over any causal LM (plain Transformers or injected): chunked prefill, decode with a
preallocated KV cache, sampling, stop tokens/strings, streaming text deltas and per-request timing.

The pieces are separate so a server can reuse them:

- ``new_cache(model, max_context)``: a KV cache allocated once for ``max_context`` positions;
- ``forward_step(model, input_ids, cache, logits_to_keep)``: one model call that appends to the cache;
- ``Sampler``: turns one row of logits into a token id (greedy, temperature, top-k, top-p, penalty, seed);
- ``TextStream``: turns token ids into text deltas that never change once emitted;
- ``Generator``: ties them together for one request at a time, plus ``score`` for teacher forcing.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, StaticCache, StaticLayer, StaticSlidingWindowLayer

# End-of-turn markers of common chat templates: generating one ends the reply even when the GGUF's
# eos id names another token (e.g. Gemma's <eos> versus <end_of_turn>). Llama 3.1's <|eom_id|> and GPT-OSS's
# <|call|> end a turn that made a tool call (the caller answers it), <|return|> GPT-OSS's final answer.
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<|end▁of▁sentence|>",
                      "<|eom_id|>", "<|call|>", "<|return|>")


class ContextOverflowError(ValueError):
    """The request does not fit in the KV cache."""


# ---------------------------------------------------------------------------------------------- KV cache


class PrefixKVLayer(StaticLayer):
    """Full-attention layer cache: allocated once for ``max_cache_len`` positions, written in place, and
    handing attention only the filled prefix (Transformers' ``StaticLayer`` hands it all ``max_cache_len``
    positions plus a mask, which makes every decode step pay for the whole context)."""

    is_compileable = False
    # Set by DecodeGraphs around a captured step: write at this device position (a [T] tensor) and hand
    # attention the first graph_length slots (the mask hides those not written yet).
    graph_slot: torch.Tensor | None = None
    graph_length: int | None = None

    def __init__(self, max_cache_len: int, **kwargs):
        super().__init__(max_cache_len=max_cache_len)
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        batch, heads = key_states.shape[:2]
        self.keys = key_states.new_zeros((batch, heads, self.max_cache_len, key_states.shape[-1]))
        self.values = value_states.new_zeros((batch, value_states.shape[1], self.max_cache_len, value_states.shape[-1]))
        self.is_initialized = True

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> int:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.length
        end = start + key_states.shape[-2]
        if end > self.max_cache_len:
            raise ContextOverflowError(
                f"the KV cache holds {self.max_cache_len} positions and this call needs {end} (raise --max-context)"
            )
        # narrow, not [:, :, start:end]: one view op instead of Python's multi-slice indexing, per layer and step
        self.keys.narrow(2, start, end - start).copy_(key_states)
        self.values.narrow(2, start, end - start).copy_(value_states)
        self.length = end
        return end

    def update(self, key_states, value_states, *args, **kwargs):
        if self.graph_slot is not None:
            self.keys.index_copy_(2, self.graph_slot, key_states)
            self.values.index_copy_(2, self.graph_slot, value_states)
            return self.keys[:, :, : self.graph_length], self.values[:, :, : self.graph_length]
        end = self._append(key_states, value_states)
        return self.keys.narrow(2, 0, end), self.values.narrow(2, 0, end)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        self.length = max(0, self.length - abs(tokens_to_remove))


class PrefixSlidingKVLayer(PrefixKVLayer):
    """Sliding-window layer cache: same storage, but attention sees only the last ``sliding_window - 1``
    cached positions plus the new ones (the mask sizes mirror Transformers' ``DynamicSlidingWindowLayer``)."""

    is_sliding = True

    def __init__(self, max_cache_len: int, sliding_window: int, **kwargs):
        super().__init__(max_cache_len=max_cache_len)
        self.sliding_window = sliding_window

    def update(self, key_states, value_states, *args, **kwargs):
        end = self._append(key_states, value_states)
        start = max(0, end - key_states.shape[-2] - (self.sliding_window - 1))
        return self.keys[:, :, start:end], self.values[:, :, start:end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        kv_offset = max(self.length - self.sliding_window + 1, 0)
        return min(self.length, self.sliding_window - 1) + query_length, kv_offset

    def get_max_length(self) -> int:
        return self.sliding_window


def new_cache(model, max_context: int) -> Cache:
    """A KV cache for ``max_context`` positions, laid out per layer as the model's config asks (full,
    sliding, ...). Tensors are allocated on the first call, on the device and dtype of the first keys."""
    layers = StaticCache(config=model.config, max_cache_len=max_context).layers
    swapped = []
    for layer in layers:
        if type(layer) is StaticLayer:
            swapped.append(PrefixKVLayer(max_context))
        elif type(layer) is StaticSlidingWindowLayer:
            # StaticSlidingWindowLayer stores min(window, max_context) as its max_cache_len.
            swapped.append(PrefixSlidingKVLayer(max_context, sliding_window=layer.max_cache_len))
        else:
            swapped.append(layer)
    return Cache(layers=swapped)


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
        if p.repetition_penalty != 1.0 and context_ids is not None and context_ids.numel():
            # CTRL-style penalty as in Transformers: shrink the logit of every token already seen.
            seen = context_ids.unique().cpu()
            picked = logits[seen]
            logits = logits.clone()
            logits[seen] = torch.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
        if p.temperature <= 0:
            return int(logits.argmax())
        logits = logits / p.temperature
        if 0 < p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            # Drop a token when the tokens before it already reach top_p (the first one always stays).
            drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= p.top_p
            logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
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


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


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

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second of the decode steps (the first token comes out of the prefill)."""
        steps = self.generated_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0

    def summary(self) -> str:
        return (
            f"prompt {self.prompt_tokens} tok, {self.prefill_tok_s:.1f} tok/s | "
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
    """Generates for one request at a time over ``model`` with a KV cache of ``max_context`` positions.

    ``prefill_chunk`` bounds how many prompt tokens go through the model in one call (activation memory).
    The cache is allocated once and reused across requests.

    ``cuda_graph``: decode steps replay CUDA graphs (``ktcore.decode_graphs``). ``None`` (default): on
    wherever the model runs on a CUDA device and every op of its decode path allows capture, else eager,
    with the reason logged once (``graph_problem`` holds it); ``False``: always eager. May be changed
    between requests.
    """

    def __init__(self, model, tokenizer, max_context: int = 4096, prefill_chunk: int = 512,
                 cuda_graph: bool | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_context = int(max_context)
        self.prefill_chunk = int(prefill_chunk)
        self.device = model_device(model)
        self.cache = new_cache(model, self.max_context)
        self.eos_token_ids = self._end_token_ids()
        self.cuda_graph = cuda_graph
        self._graphs = None
        self._fused = None

    # -- inputs

    def _end_token_ids(self) -> set[int]:
        ids: set[int] = set()
        gen_config = getattr(self.model, "generation_config", None)
        for source in (getattr(gen_config, "eos_token_id", None), getattr(self.model.config, "eos_token_id", None),
                       getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif source is not None:
                ids.update(int(i) for i in source)
        vocab = self.tokenizer.get_vocab() if self.tokenizer is not None else {}
        ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
        return ids

    def encode(self, prompt_or_messages) -> list[int]:
        return encode_prompt(self.tokenizer, prompt_or_messages)

    # -- model calls

    def _prefill(self, ids: torch.Tensor, logits_to_keep: int = 1) -> torch.Tensor:
        """Feed ``ids`` ``[1, T]`` in chunks; returns the logits of the last chunk (``logits_to_keep`` rows)."""
        logits = None
        for start in range(0, ids.shape[1], self.prefill_chunk):
            logits = forward_step(self.model, ids[:, start : start + self.prefill_chunk], self.cache, logits_to_keep)
        return logits

    def _plan(self, attr: str, build, what: str):
        """The decode plan in ``attr`` (built once by ``build()``), or ``None`` where it declined (logged once)."""
        plan = getattr(self, attr)
        if plan is None:
            from .decode_graphs import log_once

            plan = build()
            setattr(self, attr, plan)
            if plan.problem is not None:
                log_once(f"{what} off: {plan.problem}")
        return plan if plan.problem is None else None

    def _graph_runner(self):
        if self.cuda_graph is False or self.device.type != "cuda":
            return None
        from .decode_graphs import DecodeGraphs

        return self._plan("_graphs", lambda: DecodeGraphs(self.model, self.cache, self.max_context, self.device,
                                                          _cache_kwarg(self.model)), "CUDA graphs")

    @property
    def graph_problem(self) -> str | None:
        """Why decode steps run eagerly on this CUDA model (``None``: they replay graphs, or not decided yet)."""
        return None if self._graphs is None else self._graphs.problem

    def _fused_runner(self):
        """The fused-layer decode (``ktcore.fused_decode``) for one sequence on the CPU, where an op offers it."""
        if self.device.type != "cpu":
            return None
        from .fused_decode import FusedDecode

        return self._plan("_fused", lambda: FusedDecode(self.model, self.cache), "fused decode")

    @property
    def fused_problem(self) -> str | None:
        """Why CPU decode steps run module by module (``None``: fused, or not decided yet)."""
        return None if self._fused is None else self._fused.problem

    def decode_step(self, step_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, 1, V]`` for ``step_ids`` ``[B, 1]`` after what the cache holds, appending to it:
        a graph replay where graphs are on, fused layers on the CPU where an op offers them, else an eager
        ``forward_step``."""
        runner = self._graph_runner()
        if runner is not None:
            logits = runner.step(step_ids, cache_length(self.cache))
            if logits is not None:
                return logits
        if step_ids.shape[0] == 1:
            fused = self._fused_runner()
            if fused is not None:
                return fused.step(step_ids)
        return forward_step(self.model, step_ids, self.cache)

    @torch.inference_mode()
    def score(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Teacher forcing: float32 log-probabilities ``[len(token_ids), V]``; row ``i`` is the model's
        distribution for the token after ``token_ids[: i + 1]``."""
        if len(token_ids) > self.max_context:
            raise ContextOverflowError(f"{len(token_ids)} tokens do not fit in max_context={self.max_context}")
        self.cache.reset()
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)
        rows = []
        for start in range(0, ids.shape[1], self.prefill_chunk):
            logits = forward_step(self.model, ids[:, start : start + self.prefill_chunk], self.cache, logits_to_keep=0)
            rows.append(logits[0].log_softmax(-1).cpu())
        self.cache.reset()
        return torch.cat(rows)

    # -- generation

    def generate_ids(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[int]:
        """Token ids as they are sampled, stopping at an end token or ``max_new_tokens`` (stop strings are
        the text layer's business). ``self.last_timing`` is filled as it goes."""
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.max_context:
            raise ContextOverflowError(
                f"the prompt has {len(prompt_ids)} tokens and the context holds {self.max_context} "
                "(shorten the prompt or raise --max-context)"
            )
        budget = min(params.max_new_tokens, self.max_context - len(prompt_ids))
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        sampler = Sampler(params)
        timing = self.last_timing = Timing(prompt_tokens=len(prompt_ids))
        self.cache.reset()
        if budget == 0:
            return
        context = torch.tensor(prompt_ids, dtype=torch.long)
        t0 = time.perf_counter()
        logits = self._prefill(context.to(self.device)[None])
        token = sampler(logits[0, -1], context)
        timing.prefill_s = time.perf_counter() - t0
        timing.generated_tokens = 1
        t1 = time.perf_counter()
        step_ids = torch.empty((1, 1), dtype=torch.long, device=self.device)
        penalized = params.repetition_penalty != 1.0  # only the penalty reads the context
        while True:
            yield token
            timing.decode_s = time.perf_counter() - t1
            if token in stop_ids or timing.generated_tokens >= budget:
                return
            if penalized:
                context = torch.cat([context, torch.tensor([token])])
            step_ids.fill_(token)
            logits = self.decode_step(step_ids)
            token = sampler(logits[0, -1], context if penalized else None)
            timing.generated_tokens += 1
            timing.decode_s = time.perf_counter() - t1

    def generate(self, prompt_or_messages, params: SamplingParams | None = None) -> Iterator[Delta]:
        """Stream the reply as text deltas; the last delta carries ``finish_reason`` and ``timing``.

        Text is emitted only once it is stable: complete UTF-8 characters, and never a tail that might
        still become a stop string (a matched stop string is not part of the output)."""
        params = params or SamplingParams()
        prompt_ids = self.encode(prompt_or_messages)
        stream = TextStream(self.tokenizer, params.skip_special_tokens)
        stops = [s for s in params.stop if s]
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        text = ""  # stable text decoded so far
        emitted = 0  # how much of it has been handed out
        pending_ids: list[int] = []
        finish = "length"
        for token in self.generate_ids(prompt_ids, params):
            pending_ids.append(token)
            if token in stop_ids:
                finish = "stop"
                break
            text += stream.push(token)
            if stops:
                hit = min((i for i in (text.find(s, max(0, emitted - len(s) + 1)) for s in stops) if i >= 0), default=-1)
                if hit >= 0:
                    # Everything before the stop string is final; the stop string itself is dropped.
                    finish, text = "stop", text[:hit]
                    break
                safe = len(text) - _held_back(text[emitted:], stops)
            else:
                safe = len(text)
            if safe > emitted:
                yield Delta(text[emitted:safe], pending_ids)
                emitted, pending_ids = safe, []
        else:
            text += stream.flush()
        tail = text[emitted:]
        timing = getattr(self, "last_timing", Timing(prompt_tokens=len(prompt_ids)))
        yield Delta(tail, pending_ids, finish_reason=finish, timing=timing)

    def complete(self, prompt_or_messages, params: SamplingParams | None = None) -> tuple[str, Delta]:
        """The whole reply at once, with the final delta (finish reason and timing)."""
        parts = []
        for delta in self.generate(prompt_or_messages, params):
            parts.append(delta.text)
        return "".join(parts), delta
