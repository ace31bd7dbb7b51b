"""Constrained decoding through llguidance: a grammar (a JSON schema, any JSON object, or a Lark grammar)
compiled once per request, and per sequence a matcher that masks each logits row to the tokens the grammar
allows and advances with each accepted token. End tokens are allowed only where the grammar accepts.

``Sampler`` (``ktcore/generate.py``) applies it: ``SamplingParams(constraint=json_constraint(...))``. The
mask is computed on the CPU (where the sampler works) and costs about a millisecond per token.
llguidance is imported on first use, so ``import ktcore`` does not load it.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from typing import Any

import torch

# Compact JSON with the separators models write (", " and ": "): flexible whitespace would let a sampled
# reply wander through newlines and spaces until it runs out of tokens.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # HF tokenizer -> {(vocab, eos): LLTokenizer}


class ConstraintError(ValueError):
    """The grammar or schema cannot be compiled (the message says why)."""


def _llg():
    try:
        import llguidance
        import llguidance.hf
        import llguidance.numpy
    except ImportError as exc:  # pragma: no cover - a base dependency
        raise ConstraintError("constrained decoding needs llguidance: pip install llguidance") from exc
    return llguidance


def ll_tokenizer(tokenizer, vocab_size: int, end_ids):
    """llguidance's view of ``tokenizer`` (built once per tokenizer, vocabulary size and end tokens: ~0.5 s)."""
    llg = _llg()
    key = (int(vocab_size), tuple(sorted(int(i) for i in end_ids)))
    per_tokenizer = _tokenizers.setdefault(tokenizer, {})
    if key not in per_tokenizer:
        try:
            per_tokenizer[key] = llg.hf.from_tokenizer(tokenizer, n_vocab=key[0], eos_token=list(key[1]) or None)
        except ValueError:  # a decoder llguidance does not know: hand it each token's text instead
            per_tokenizer[key] = llg.LLTokenizer(llg.TokenizerWrapper(_TokenTexts(tokenizer, key[0])),
                                                 n_vocab=key[0], eos_token=list(key[1]) or None)
    return per_tokenizer[key]


class _TokenTexts:
    """A tokenizer as llguidance's ``TokenizerWrapper`` reads it: each token's bytes, special ids, encode.
    For tokenizers whose tokens decode alone to whole characters (e.g. the tiny test models')."""

    def __init__(self, tokenizer, vocab_size: int):
        self._tokenizer = tokenizer
        specials = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self.tokens = [tokenizer.decode([i]).encode() if i < len(tokenizer) else b"" for i in range(vocab_size)]
        self.special_token_ids = sorted(i for i in specials if i < vocab_size)
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id

    def __call__(self, text: str) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class Constraint:
    """A compiled grammar for one tokenizer; ``start()`` gives a fresh matcher per sequence."""

    grammar: str
    tokenizer: Any  # llguidance.LLTokenizer
    vocab_size: int

    def start(self) -> GrammarState:
        return GrammarState(self)


def _compile(grammar: str, tokenizer, vocab_size: int, end_ids) -> Constraint:
    llg = _llg()
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ConstraintError(messages[0] if messages else "invalid grammar")
    return Constraint(grammar, ll_tokenizer(tokenizer, vocab_size, end_ids), int(vocab_size))


def json_constraint(tokenizer, vocab_size: int, end_ids, schema: dict | None = None) -> Constraint:
    """Replies that are one JSON value of ``schema`` (``None``: any JSON object)."""
    llg = _llg()
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema or {"type": "object"}),
                                                        defaults=JSON_OPTIONS)
    except ValueError as exc:
        raise ConstraintError(f"invalid JSON schema: {exc}") from exc
    return _compile(grammar, tokenizer, vocab_size, end_ids)


def lark_constraint(tokenizer, vocab_size: int, end_ids, lark: str) -> Constraint:
    """Replies in the language of a Lark grammar (llguidance's dialect: ``%json {...}`` embeds a JSON schema,
    ``<[id]>`` names one token)."""
    return _compile(_llg().LLMatcher.grammar_from_lark(lark), tokenizer, vocab_size, end_ids)


class GrammarState:
    """One sequence's position in the grammar."""

    def __init__(self, constraint: Constraint):
        llg = _llg()
        self._np = llg.numpy
        self.matcher = llg.LLMatcher(constraint.tokenizer, constraint.grammar, log_level=0)
        self.vocab_size = constraint.vocab_size
        self._bitmask = llg.numpy.allocate_token_bitmask(1, constraint.vocab_size)
        self._check()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise ConstraintError(f"grammar error: {self.matcher.get_error()}")

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of the CPU float32 row ``logits`` ``[V]`` with every token the grammar forbids at -inf."""
        self._np.fill_next_token_bitmask(self.matcher, self._bitmask)
        self._check()
        out = logits.clone()
        row = out.numpy()[None, : self.vocab_size]
        self._np.apply_token_bitmask_inplace(row, self._bitmask)
        out[self.vocab_size:] = float("-inf")
        return out

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            self._check()
            raise ConstraintError(f"token {token} does not continue the grammar")

    @property
    def done(self) -> bool:
        """The grammar allows nothing but an end token now."""
        return self.matcher.is_stopped()

