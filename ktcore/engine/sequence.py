"""One request inside the engine: its tokens, sampler, budget, stop conditions and reply text."""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC

import torch

from ..generate import Sampler, SamplingParams, TextStream
from .paged_cache import SeqKV
from .step_profile import timed


def held_back(text: str, stops: SequenceABC[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
    for n in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        tail = text[-n:]
        if any(s.startswith(tail) for s in stops):
            return n
    return 0


class ReplyText:
    """Token ids in, reply text out: stable text (``TextStream``) minus any stop string and what follows it;
    a tail that may still grow into a stop string is held back until it cannot, or the reply ends."""

    def __init__(self, tokenizer, stops: SequenceABC[str] = (), skip_special_tokens: bool = True):
        self.stream = TextStream(tokenizer, skip_special_tokens)
        self.stops = [s for s in stops if s]
        self.unsent = ""

    @timed("detokenize")
    def push(self, token: int) -> tuple[str, bool]:
        """``(text to emit, whether a stop string ended the reply)``."""
        return self._take(self.stream.push(token), final=False)

    @timed("detokenize")
    def finish(self) -> str:
        """The rest of the text at the end of the reply (an end token or the budget)."""
        return self._take(self.stream.flush(), final=True)[0]

    def _take(self, text: str, final: bool) -> tuple[str, bool]:
        self.unsent += text
        if self.stops:
            hits = [i for i in (self.unsent.find(s) for s in self.stops) if i >= 0]
            if hits:
                out, self.unsent = self.unsent[: min(hits)], ""
                return out, True
        hold = 0 if final or not self.stops else held_back(self.unsent, self.stops)
        out = self.unsent[: len(self.unsent) - hold]
        self.unsent = self.unsent[len(self.unsent) - hold:]
        return out, False


class Sequence:
    """A request's state. ``tokens`` is the prompt then the generated tokens; ``kv.length`` of them are in the
    cache, so ``pending`` tokens go through the model next (many: prefill, also after a preemption; one:
    decode). ``finish_reason`` is set once it ends ("stop", "length", "cancelled", "error")."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, *, budget: int, stop_ids: set[int],
                 text: ReplyText | None = None, presence_penalty: float = 0.0, frequency_penalty: float = 0.0):
        self.prompt_ids = list(prompt_ids)
        self.tokens = list(prompt_ids)
        self.params = params
        self.budget = budget
        self.stop_ids = stop_ids
        self.text = text
        self.presence_penalty = presence_penalty
        self.frequency_penalty = frequency_penalty
        self.sampler = Sampler(params)
        self.kv = SeqKV()
        self.generated: list[int] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.out_text = ""  # reply text not yet taken by the caller
        self.logprobs: list = []  # TokenLogprob of accepted tokens not yet taken (params.logprobs)
        self.restored = 0  # prompt positions restored from the prefix store
        self.prefilled = 0  # positions fed through the model
        self.preemptions = 0
        self.first_token_ns = 0
        self.last_token_ns = 0
        self.admitted_ns = 0
        self.put_blocks = 0  # full blocks already offered to the prefix store

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.kv.length

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @timed("sampling")
    def sample(self, logits: torch.Tensor) -> int:
        logits = logits.float().cpu()
        if self.generated and (self.presence_penalty or self.frequency_penalty):
            # OpenAI's penalties: subtract per-token count * frequency + (count > 0) * presence
            counts = torch.bincount(torch.tensor(self.generated), minlength=logits.numel())[: logits.numel()].float()
            logits = logits - counts * self.frequency_penalty - (counts > 0).float() * self.presence_penalty
        context = None
        if self.params.repetition_penalty != 1.0:
            context = torch.tensor(self.tokens, dtype=torch.long)
        return self.sampler(logits, context)

    def accept(self, token: int) -> None:
        """Record a sampled token: its text (and log-probabilities, when asked for), and the end at an end token,
        a stop string or the budget."""
        self.generated.append(token)
        if self.sampler.last_logprobs is not None and token not in self.stop_ids:
            self.logprobs.append(self.sampler.last_logprobs)
        if token in self.stop_ids:
            if self.text is not None:
                self.out_text += self.text.finish()
            self.finish_reason = "stop"
            return
        self.tokens.append(token)
        out_of_budget = len(self.generated) >= self.budget
        if self.text is not None:
            text, stopped = self.text.push(token)
            self.out_text += text
            if stopped:
                self.finish_reason = "stop"
                return
            if out_of_budget:
                self.out_text += self.text.finish()
        if out_of_budget:
            self.finish_reason = "length"

    def take_text(self) -> str:
        text, self.out_text = self.out_text, ""
        return text

    def take_logprobs(self) -> list:
        """The ``TokenLogprob`` of the tokens accepted since the last call."""
        taken, self.logprobs = self.logprobs, []
        return taken
