"""Sampled tokens' log-probabilities (``ktcore.generate.TokenLogprob``) in the shapes the APIs use: OpenAI's
chat (``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``), OpenAI's legacy completions
(``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset``) and Ollama's
(``[{"token", "logprob", "top_logprobs"}]``). A token's bytes come from llguidance's view of the tokenizer,
which knows each token's exact bytes (a byte-level token may hold part of a UTF-8 character). Only the answer's
tokens are shown: ``AnswerLogprobs`` leaves out a harmony reply's analysis channel and tool calls."""

from __future__ import annotations

from ktcore.constrained import ll_tokenizer
from ktcore.reply_stream import AnswerTokens


class TokenText:
    """Token ids to their bytes and text, for one tokenizer."""

    def __init__(self, tokenizer, vocab_size: int, end_ids):
        self._tokenizer = tokenizer
        self._ll = ll_tokenizer(tokenizer, vocab_size, end_ids)

    def bytes(self, token: int) -> bytes:
        raw = self._ll.decode_bytes([token])
        if raw.startswith(b"\xff"):  # llguidance marks special tokens so; their text is their name
            return self._tokenizer.convert_ids_to_tokens(token).encode()
        return raw

    def text(self, token: int) -> str:
        return self.bytes(token).decode("utf-8", errors="replace")

    def openai_item(self, token: int, logprob: float) -> dict:
        return {"token": self.text(token), "logprob": logprob, "bytes": list(self.bytes(token))}

    def openai_chat(self, items) -> list[dict]:
        return [self.openai_item(i.token_id, i.logprob)
                | {"top_logprobs": [self.openai_item(t, lp) for t, lp in i.top]} for i in items]

    def ollama(self, items) -> list[dict]:
        return [{"token": self.text(i.token_id), "logprob": i.logprob,
                 "top_logprobs": [{"token": self.text(t), "logprob": lp} for t, lp in i.top]} for i in items]

    def openai_legacy(self, items, offset: int) -> dict:
        """The completions shape; ``offset``: where the first token's text starts in the returned text."""
        tokens, offsets = [], []
        for i in items:
            offsets.append(offset)
            tokens.append(self.text(i.token_id))
            offset += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": [i.logprob for i in items],
                "top_logprobs": [{self.text(t): lp for t, lp in i.top} for i in items], "text_offset": offsets}


class AnswerLogprobs:
    """One reply's log-probability items, as they come (``push(items, final)``), cut to its answer's tokens: a
    harmony reply (``harmony``) is read by channel with ``AnswerTokens``; any other reply's items all pass."""

    def __init__(self, token_text: TokenText | None, harmony: bool):
        self._token_text = token_text
        self._tokens = AnswerTokens() if harmony and token_text is not None else None  # None: no logprobs asked

    def push(self, items: list, final: bool = False) -> list:
        if self._tokens is None:
            return items
        return self._tokens.push(items, [self._token_text.text(i.token_id) for i in items], final)
